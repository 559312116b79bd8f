"""Time-to-accuracy benchmark: wall-clock training time until the test accuracy first reaches a target,
per normalization, over several seeds, optionally against a plain reference recipe.

    python -m benchmarks.time_to_accuracy --norm bn gn ln --seeds 3 --baseline --data PATH
    python -m benchmarks.time_to_accuracy --norm bn --seeds 1 --limit 2000 --epochs 1 --no-warmup   # smoke run

Every run is the real training code path, fastcifar.fit on a TrainConfig (what `python -m fastcifar.train`
runs), in its own folder DIR/runs/<norm>-s<seed>/, with the recipe's own settings: the preset decides the
schedule and whether training stops at the target. Time-to-target is the run's cumulative training time
(torch.compile included, evaluation excluded) at the end of the first epoch whose test accuracy reaches
the target; steps-to-target the optimizer steps taken by then. A run that raises, or that never reaches the
target, is a failure and contributes no time: medians are over the runs that reached it, and the failures
are counted.

Runs are interleaved (seed 0 of every norm, then seed 1, ...) so that a slow stretch on a shared
machine does not land on one norm only. Before the timed runs, an untimed one-epoch warm-up job on a
small subset pays the process's one-time costs (CUDA context, cuDNN and oneDNN initialization, numba
JIT in ffcv) that would otherwise be charged to whichever run came first; --no-warmup skips it.
The warm-up does not compile. With --compile, each run compiles afresh (dynamo is reset between runs),
but inductor's on-disk cache persists: the first seed of each norm compiles cold (unless an earlier
invocation left that cache warm) and its later seeds reuse the generated kernels, as a second process
would; the per-run compile times in results.json show the difference.

Settings: --set KEY=VALUE ... gives every run a training setting (a TrainConfig field: lr, batch_size, cutout,
arch, ...); --grid KEY=V1,V2 ... sweeps settings (every combination, for every norm and seed). --seeds 20
reports each norm's success rate ("reached / runs") beside the mean and the minimum final accuracy.

Executors: by default every run trains in this process, one after another. --executor ray runs each
(norm, seed, grid point) as a Ray task, on an embedded local Ray or, with --ray-address ADDR (or
$RAY_ADDRESS), on a running cluster (benchmarks/ray_executor.py). Times are reported only when no two runs
share a machine: the ray executor then keeps one run in flight per machine, with whole GPUs, and an embedded
Ray runs its workers at normal priority (Ray's default is nice 15); each run records its niceness. --accuracy-only
drops the times and lets runs share machines and fractional GPUs (--gpus-per-run 0.25). Betons are converted
once, before any run is scheduled; on a cluster, --beton-dir must name storage every node reads.

Writes DIR/results.json, DIR/results.md (the same numbers as a table) and DIR/time_to_accuracy.png;
both files are rewritten after every run, so an interrupted suite keeps what it finished.
"""
import argparse
import gc
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import sys
import time
import traceback

import torch

from fastcifar import TrainConfig, fit
from fastcifar.config import PRESETS
from fastcifar.data import DataError, prepare_data, resolve_source
from fastcifar.device import ConfigError, pick_device
from fastcifar.models import NORMS

from .common import (atomic_write_json, atomic_write_text, dataset_line, dataset_record, environment, fmt,
                     markdown_table, read_json, report_header, save_figure_atomic, set_all_threads)

PROG = "python -m benchmarks.time_to_accuracy"
WARMUP_IMAGES = 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norm", nargs="+", default=list(NORMS), choices=NORMS, help="norms to time (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per norm (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+SEEDS-1 (default 0)")
    p.add_argument("--target", type=float, default=0.70, help="test accuracy to reach, a fraction (default 0.70)")
    p.add_argument("--data", help="CIFAR-10 source or a folder of converted betons (default: $FASTCIFAR_DATA, "
                                  "else the official download)")
    p.add_argument("--beton-dir", help="where converted betons are cached (default: fastcifar's cache)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto: CUDA if present")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="train with --amp (bf16 autocast; default on)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train with --compile on / off (default: the trainer's auto: on with CUDA, off on the CPU, "
                        "where compiling costs minutes that a short run cannot earn back)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="training preset (default: the trainer's)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    p.add_argument("--limit", type=int, help="train and test on a fixed spread of N images each (smoke runs; "
                                             "such times are not CIFAR-10 results)")
    p.add_argument("--threads", type=int, help="torch CPU threads for every run, the baseline included "
                                               "(default: all cores)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                   help="training settings for every run, e.g. --set cutout=8 batch_size=512 (keys are TrainConfig "
                        "fields: the flags of fastcifar.train with underscores)")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="training settings to sweep: --grid lr=0.1,0.2 batch_size=128,256 runs every combination "
                        "for every norm and seed (keys as for --set, e.g. arch, cutout, epochs)")
    p.add_argument("--points", nargs="+", default=[], metavar="KEY=V,KEY=V",
                   help="grid points given whole, for recipes that differ in several settings: --points "
                        "optimizer=sgd,epochs=3 epochs=2,batch_size=96 (an empty string: the preset as it is); "
                        "run interleaved like --grid's, so their times compare side by side")
    p.add_argument("--accuracy-only", action="store_true",
                   help="report accuracies and success rates but no times, so that runs may share machines and "
                        "GPUs (--executor ray, fractional --gpus-per-run)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (default): one run after another in this process; ray: one Ray task per run")
    p.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--gpus-per-run", type=float, help="GPUs per Ray task (default: 1 on CUDA, else 0; fractions "
                                                      "only with --accuracy-only)")
    p.add_argument("--cpus-per-run", type=int, help="CPUs per Ray task (default 1; with --accuracy-only also the "
                                                    "run's torch threads unless --threads says otherwise)")
    p.add_argument("--baseline", action="store_true",
                   help="also train the reference recipe (benchmarks/baseline.py) on the same device and report "
                        "each norm's speed-up over it")
    p.add_argument("--baseline-epochs", type=int, default=20, help="the reference recipe's epoch cap (default 20)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="one untimed one-epoch job first (default on)")
    p.add_argument("--progress", action="store_true", help="show training's progress bars (default: --quiet)")
    p.add_argument("--run-plots", action="store_true", help="let each run draw its own curves and grids")
    p.add_argument("--dataset-label", help="how the report names the data (default: guessed from the source)")
    p.add_argument("--out", default=os.path.join("results", "time_to_accuracy"), help="output folder")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.baseline_epochs < 1:
        p.error("--seeds and --baseline-epochs must be at least 1")
    if not 0 < args.target <= 1:
        p.error("--target is a fraction in (0, 1]")
    if (args.limit is not None and args.limit < 1) or (args.threads is not None and args.threads < 1):
        p.error("--limit and --threads must be at least 1")
    args.norm = list(dict.fromkeys(args.norm))
    try:
        if args.grid and args.points:
            raise ValueError("--grid and --points: give one of them")
        args.configs = parse_points(args.points) if args.points else parse_grid(args.grid)
        args.fixed = parse_settings(args.settings)
    except ValueError as e:
        p.error(str(e))
    if args.executor == "local":
        given = [f for f, v in (("--gpus-per-run", args.gpus_per_run), ("--cpus-per-run", args.cpus_per_run),
                                ("--ray-address", args.ray_address)) if v is not None]
        if given:
            p.error(f"{', '.join(given)}: only with --executor ray")
    if (args.gpus_per_run is not None and args.gpus_per_run < 0) or (args.cpus_per_run is not None
                                                                     and args.cpus_per_run < 1):
        p.error("--gpus-per-run must be at least 0 and --cpus-per-run at least 1")
    if not args.accuracy_only and args.gpus_per_run is not None and args.gpus_per_run != int(args.gpus_per_run):
        p.error(f"--gpus-per-run {args.gpus_per_run:g} shares a GPU between runs, and runs that share a device slow "
                "each other, so their times to target would be wrong; add --accuracy-only to sweep accuracy "
                "without times")
    if args.accuracy_only and args.baseline:
        p.error("--baseline reports speed-ups, which need times: drop --accuracy-only or --baseline")
    return args


# settings the harness decides for every run itself, and the flag that sets each
HARNESS_FLAGS = {"norm": "--norm", "seed": "--seeds/--first-seed", "out": "--out", "data": "--data",
                 "beton_dir": "--beton-dir", "device": "--device", "target_acc": "--target"}


def parse_value(text):
    """A setting's value as typed: a JSON number, true/false or null, else the text itself ("deep", "flip")."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _setting(item, option):
    key, sep, values = item.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not values:
        raise ValueError(f"{option} takes KEY={'V1,V2,...' if option == '--grid' else 'VALUE'} items, got {item!r}")
    if key in HARNESS_FLAGS:
        raise ValueError(f"{option} {key}: the harness sets it itself (use {HARNESS_FLAGS[key]})")
    return key, [parse_value(v) for v in dict.fromkeys(values)]


def parse_settings(items):
    """['cutout=8', 'batch_size=512'] -> {'cutout': 8, 'batch_size': 512}."""
    out = {}
    for item in items:
        key, values = _setting(item, "--set")
        if len(values) != 1 or key in out:
            raise ValueError(f"--set {key}: one value, once (sweep values with --grid)")
        out[key] = values[0]
    return out


def parse_grid(items):
    """['lr=0.1,0.2', 'batch_size=128,256'] -> the product as [{'lr': 0.1, 'batch_size': 128}, ...]."""
    axes = {}
    for item in items:
        key, values = _setting(item, "--grid")
        if key in axes:
            raise ValueError(f"--grid names {key} twice")
        axes[key] = values
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def parse_points(items):
    """['optimizer=sgd,epochs=3', ''] -> [{'optimizer': 'sgd', 'epochs': 3}, {}]: one grid point each."""
    points = []
    for item in items:
        point = {}
        for part in filter(None, (x.strip() for x in item.split(","))):
            key, values = _setting(part, "--points")
            if len(values) != 1 or key in point:
                raise ValueError(f"--points {item!r}: each key once, with one value")
            point[key] = values[0]
        if point in points:
            raise ValueError(f"--points gives {item!r} twice")
        points.append(point)
    return points


def group_label(norm, config):
    return " ".join([norm] + [f"{k}={v}" for k, v in config.items()])


def run_name(norm, config, seed):
    parts = [norm] + [re.sub(r"[^A-Za-z0-9.]+", "_", f"{k}{v}") for k, v in config.items()] + [f"s{seed}"]
    return "-".join(parts)


# ---------------------------------------------------------------- one run

def run_settings(args, norm, seed, data, out, device):
    """The TrainConfig settings of one run: the harness's own, then --set's (a grid point's go on top)."""
    threads = args.threads or (args.cpus_per_run if args.executor == "ray" and args.accuracy_only else None)
    chosen = {"compile": None if args.compile is None else "on" if args.compile else "off", "preset": args.preset,
              "epochs": args.epochs, "limit": args.limit, "threads": threads}
    return {"norm": norm, "seed": seed, "target_acc": args.target, "device": device.type, "data": data, "out": out,
            "amp": args.amp, "quiet": not args.progress, "plots": args.run_plots,
            **{k: v for k, v in chosen.items() if v is not None}, **args.fixed}


RUN_KEYS = ("params", "within_budget", "device", "amp", "precision", "compile", "fused_norm", "fused_norm_fallback",
            "preset", "batch_size", "lr", "optimizer", "muon_lr", "muon_ns_steps", "tta", "whiten_fit_time_s",
            "epochs_planned", "epochs_run", "steps_per_epoch", "torch_threads", "time_to_target_s", "epochs_to_target",
            "steps_to_target", "final_test_acc", "best_test_acc", "compile_time_s", "eval_time_s", "history")


def run_one(config):
    """One training run of a serialized TrainConfig (its to_dict()); never raises (but for Ctrl-C): a failure
    is recorded, not thrown."""
    rec = {"norm": config.get("norm"), "seed": config.get("seed"), "out": config.get("out"), "train_config": config}
    shutil.rmtree(config["out"], ignore_errors=True)  # this run's own folder: no stale metrics or checkpoint mixed in
    fresh_process_state()
    t0 = time.perf_counter()
    try:
        cfg = TrainConfig.from_dict(config)
        metrics = fit(cfg).metrics
    except Exception as e:  # noqa: BLE001  one broken run must not end the suite
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
        partial = read_json(os.path.join(config["out"], "metrics.json")) or {}  # e.g. the non-finite-loss guard's
        rec.update({k: partial[k] for k in ("history", "params") if k in partial})
        rec["time_to_target_s"] = None
    else:
        rec.update({k: metrics.get(k) for k in RUN_KEYS})
        rec["train_time_s"] = metrics["history"][-1]["train_time_s"] if metrics["history"] else None
        if metrics.get("time_to_target_s") is not None:
            rec["status"] = "reached"
        else:
            rec.update(status="not_reached", time_to_target_s=None,
                       error=f"did not reach {100 * cfg.target_acc:g}% in {metrics.get('epochs_run')} epoch(s) "
                             f"(best {100 * (metrics.get('best_test_acc') or 0):.2f}%)")
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def fresh_process_state():
    """As far as one process allows, start each run as a new process would. Dynamo keeps compiled frames
    per code object: every run's Net.forward is the same one, so without a reset later runs would reuse,
    or after cache_size_limit recompiles silently stop compiling, and their compile time would be wrong."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_baseline(args, beton_dir, device, out):
    from .baseline import train_baseline
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    fresh_process_state()
    t0 = time.perf_counter()
    try:
        m = train_baseline(beton_dir, device, target=args.target, epochs=args.baseline_epochs, limit=args.limit,
                           seed=args.first_seed, threads=args.threads)
    except Exception as e:  # noqa: BLE001
        rec = {"recipe": "baseline", "status": "failed", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=8), "time_to_target_s": None}
    else:
        rec = dict(m, status="reached" if m["time_to_target_s"] is not None else "not_reached")
        if rec["status"] == "not_reached":
            rec["error"] = (f"did not reach {100 * args.target:g}% in {m['epochs_run']} epoch(s) "
                            f"(best {100 * m['best_test_acc']:.2f}%)")
    rec.update(out=out, wall_s=time.perf_counter() - t0)
    atomic_write_json(os.path.join(out, "metrics.json"), rec)
    return rec


# ---------------------------------------------------------------- summaries

def _spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else \
        {"median": None, "min": None, "max": None}


def _mean_std(xs):
    return {"mean": statistics.fmean(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs) if xs else None, "n": len(xs)}


def summarize_norm(runs, timed=True):
    reached = [r for r in runs if r["status"] == "reached"]
    trained = [r for r in runs if r["status"] != "failed"]  # finished training, target or not
    n_ok = len(reached)
    return {
        "norm": runs[0]["norm"], "config": runs[0].get("config", {}),
        "runs": len(runs), "reached": n_ok, "success_rate": n_ok / len(runs), "not_reached": sum(r["status"] == "not_reached" for r in runs),
        "failed": sum(r["status"] == "failed" for r in runs), "failures": len(runs) - n_ok,
        "status": "ok" if n_ok == len(runs) else "partial" if n_ok else "failed",
        "params": next((r["params"] for r in runs if r.get("params") is not None), None),
        # with --accuracy-only runs may have shared a machine: their times are kept per run, never summarized
        "time_to_target_s": _spread([r["time_to_target_s"] for r in reached] if timed else []),
        "epochs_to_target": _spread([r["epochs_to_target"] for r in reached]),
        "steps_to_target": _spread([r["steps_to_target"] for r in reached if r.get("steps_to_target") is not None]),
        "final_test_acc": _mean_std([r["final_test_acc"] for r in trained]),
        "best_test_acc": _mean_std([r["best_test_acc"] for r in trained]),
        # compile and evaluation are reported apart: compile is inside time-to-target, evaluation is not
        "compile_time_s": _spread([r["compile_time_s"] for r in trained])["median"],
        "eval_time_s": _spread([r["eval_time_s"] for r in trained])["median"],
        "errors": [{"seed": r["seed"], "status": r["status"], "error": r.get("error")} for r in runs
                   if r["status"] != "reached"],
    }


def speedup(baseline, norm_summary):
    """baseline time-to-target / norm median time-to-target. A baseline that never reached the target
    would have needed more than all its training time: the ratio is then a lower bound."""
    t = norm_summary["time_to_target_s"]["median"]
    if baseline is None or t is None or baseline["status"] == "failed":
        return None
    if baseline["status"] == "reached":
        return {"ratio": baseline["time_to_target_s"] / t, "lower_bound": False}
    return {"ratio": baseline["train_time_s"] / t, "lower_bound": True}


def fmt_speedup(s):
    if s is None:
        return "n/a"
    return f"{'>= ' if s['lower_bound'] else ''}{s['ratio']:.2f}x"


def groups(args):
    """(label, norm, config) per summary row: the norm alone without a grid."""
    return [(group_label(n, c), n, c) for c in args.configs for n in args.norm]


def collect(args, env, ds, runs, baseline, state, ray=None):
    norms = {}
    for label, *_ in groups(args):
        mine = [r for r in runs if r.get("group", r["norm"]) == label]
        if mine:
            norms[label] = summarize_norm(mine, timed=not args.accuracy_only)
            norms[label]["speedup_vs_baseline"] = speedup(baseline, norms[label])
    bl = None
    if baseline is not None:
        bl = {k: v for k, v in baseline.items() if k != "traceback"}
    failed_any = any(s["status"] != "ok" for s in norms.values())
    return {
        "benchmark": "time_to_accuracy", "executor": args.executor, "state": state, "environment": env, "dataset": ds,
        "settings": {"norms": args.norm, "groups": [g for g, *_ in groups(args)], "grid": args.grid,
                     "executor": args.executor, "accuracy_only": args.accuracy_only,
                     "ray": None if args.executor != "ray" else dict(
                         ray or {}, address=args.ray_address or os.environ.get("RAY_ADDRESS") or "embedded",
                         gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run),
                     "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
                     "target_acc": args.target, "device": env["device"], "amp": args.amp, "compile": args.compile,
                     "preset": args.preset or TrainConfig.preset, "epochs": args.epochs, "limit": args.limit,
                     "set": args.fixed, "threads": args.threads, "baseline": args.baseline,
                     "baseline_epochs": args.baseline_epochs, "warmup": args.warmup},
        "status": "no runs" if not norms else "failed" if all(s["status"] == "failed" for s in norms.values())
        else "partial" if failed_any else "ok",
        "norms": norms, "baseline": bl, "runs": [{k: v for k, v in r.items() if k != "traceback"} for r in runs],
    }


# ---------------------------------------------------------------- report

TABLE_HEADER = ["recipe", "params", "reached / runs", "time to target, median (s)", "min (s)", "max (s)",
                "epochs to target, median", "steps to target, median", "final test acc (%)", "final test acc, min (%)", "best test acc (%)",
                "compile (s)", "eval (s)", "speed-up vs baseline"]


def _acc(ms):
    if ms["mean"] is None:
        return "n/a"
    return f"{100 * ms['mean']:.2f}" + (f" ± {100 * ms['std']:.2f}" if ms["std"] is not None else "")


def _g(x):
    return "n/a" if x is None else f"{x:g}"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}"


def table_rows(results):
    rows = []
    timed = not results["settings"].get("accuracy_only")
    for n, s in results["norms"].items():
        t = {k: fmt(v) if timed else "not timed" for k, v in s["time_to_target_s"].items()}
        rows.append([n, s["params"] if s["params"] is not None else "n/a", f"{s['reached']} / {s['runs']}",
                     t["median"], t["min"], t["max"], _g(s["epochs_to_target"]["median"]),
                     _g(s.get("steps_to_target", {}).get("median")), _acc(s["final_test_acc"]), _pct(s["final_test_acc"].get("min")), _acc(s["best_test_acc"]),
                     fmt(s["compile_time_s"]), fmt(s["eval_time_s"]), fmt_speedup(s.get("speedup_vs_baseline"))])
    b = results.get("baseline")
    if b:
        trained = b["status"] != "failed"
        one = lambda k: {"mean": b.get(k), "std": None} if trained else {"mean": None}  # noqa: E731
        t = b.get("time_to_target_s")
        rows.append(["baseline", b.get("params", "n/a"), f"{int(b['status'] == 'reached')} / 1", fmt(t), fmt(t),
                     fmt(t), _g(b.get("epochs_to_target")), _g(b.get("steps_to_target")), _acc(one("final_test_acc")),
                     _pct(b.get("final_test_acc") if trained else None), _acc(one("best_test_acc")),
                     fmt(b.get("compile_time_s")), fmt(b.get("eval_time_s")), "1.00x" if t is not None else "n/a"])
    return rows


def render_markdown(results):
    env, ds, st = results["environment"], results["dataset"], results["settings"]
    target = f"{100 * st['target_acc']:g}%"
    threads = sorted({r["torch_threads"] for r in results["runs"] if r.get("torch_threads")})
    lines = [*report_header(
                 f"Time to {target} test accuracy", env, f"Dataset: {dataset_line(ds)}",
                 f"Settings: device {st['device']}, amp {'on' if st['amp'] else 'off'}, compile "
                 f"{ {True: 'on', False: 'off'}.get(st['compile'], 'auto')}, preset {st['preset']}, "
                 f"epochs {st['epochs'] or 'from the preset'}, seeds {', '.join(map(str, st['seeds']))}"
                 + (f", settings `{' '.join(f'{k}={v}' for k, v in st['set'].items())}`" if st.get("set") else "")
                 + (f", grid `{' '.join(st['grid'])}`" if st.get("grid") else ""),
                 threads=("-".join(map(str, (threads[0], threads[-1]))) if len(threads) > 1 else threads[0])
                 if threads else None),
             f"- Executor: {executor_line(st, results['runs'])}",
             f"- Status: {results['status']}" + ("" if results["state"] == "complete" else f" ({results['state']})"),
             "",
             markdown_table(TABLE_HEADER, table_rows(results)),
             "",
             f"Time to target: cumulative training time at the end of the first epoch whose test accuracy reaches "
             f"{target}, torch.compile included, evaluation excluded; median, min and max over the runs that reached "
             "it" + ("" if not st.get("accuracy_only") else " (not timed here: with --accuracy-only runs may share "
                     "a machine or a GPU and slow each other)") + "; steps to target: the optimizer steps taken by "
             "then. Machine: the runs' own torch threads. Reached / runs: the success rate over every run "
             "started, failed ones included. Accuracies: mean ± sample standard deviation, and the minimum, over "
             "the runs that finished training. Compile: "
             "median compile time per run (part of time to target). Eval: median total evaluation time per run "
             "(not part of it). Speed-up: baseline time to target / the norm's median time to target."]
    if results.get("baseline"):
        b = results["baseline"]
        lines.append("")
        lines.append("Baseline: the reference recipe in benchmarks/baseline.py (46,024-parameter BatchNorm "
                     "network, torchvision DataLoader with 2 workers, batch 128, SGD lr 0.01 momentum 0.9, "
                     f"fp32 eager, at most {st['baseline_epochs']} epoch(s)), same device, seed {st['seeds'][0]}.")
        if b["status"] == "not_reached":
            lines.append(f"The baseline {b.get('error')}; its total training time, "
                         f"{fmt(b.get('train_time_s'))} s, stands in for its time to target, so every speed-up "
                         "is a lower bound (>=).")
        elif b["status"] == "failed":
            lines.append(f"It failed ({b.get('error')}), so there are no speed-ups.")
    errors = [(n, e) for n, s in results["norms"].items() for e in s["errors"]]
    where = [r for r in results["runs"] if (r.get("where") or {}).get("executor") == "ray"]
    if where:
        lines += ["", "## Where each run ran", "", markdown_table(
            ["run", "status", "Ray node", "host", "pid", "nice"],
            [[os.path.basename(r["out"]), r["status"], (r["where"]["node_id"] or "n/a")[:12], r["where"]["host"] or "n/a",
              r["where"]["pid"] or "n/a", _g(r["where"].get("niceness"))] for r in where])]
    if errors:
        lines += ["", "## Runs that did not reach the target", ""]
        lines += [f"- {n} seed {e['seed']}: {e['status']}: {e['error']}" for n, e in errors]
    return "\n".join(lines) + "\n"


def executor_line(st, runs=()):
    ex = st.get("executor", "local")
    if ex == "local":
        line = "local (one run after another, in one process)"
    else:
        ray = st["ray"]
        line = (f"ray at {ray['address']}, {_g(ray['gpus_per_run'])} GPU(s) and {_g(ray['cpus_per_run'])} CPU(s) "
                "per run, " + ("runs may share machines" if st.get("accuracy_only") else "one run per machine at a time"))
    nice = sorted({r["where"]["niceness"] for r in runs if (r.get("where") or {}).get("niceness") is not None})
    if nice:
        line += f", runs at nice {', '.join(map(str, nice))}"
        if nice != [0] and not st.get("accuracy_only"):
            line += (" (**below normal priority**: other load on the machine slows these timed runs; start Ray "
                     "with RAY_worker_niceness=0)")
    return line + (", accuracy only (no times)" if st.get("accuracy_only") else "")


def success_lines(results):
    """One console line per row: the success rate and the accuracy spread beside the median time."""
    target = f"{100 * results['settings']['target_acc']:g}%"
    out = []
    for n, s in results["norms"].items():
        acc, t = s["final_test_acc"], s["time_to_target_s"]["median"]
        out.append(f"{n}: {s['reached']}/{s['runs']} runs reached {target}; final test acc "
                   + (f"mean {100 * acc['mean']:.2f}%, min {100 * acc['min']:.2f}%" if acc["mean"] is not None
                      else "n/a") + (f"; median time to target {t:.2f} s" if t is not None else ""))
    return out


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = []
    for i, n in enumerate(results["settings"].get("groups") or results["settings"]["norms"]):
        first = True
        for r in (r for r in results["runs"] if r.get("group", r["norm"]) == n and r.get("history")):
            t = [h["train_time_s"] for h in r["history"]]
            a = [100 * h["test_acc"] for h in r["history"]]
            xs += t
            ax.plot(t, a, "-o", color=colors[i % len(colors)], lw=1, ms=3, alpha=0.7, label=n if first else None)
            first = False
    b = results.get("baseline")
    if b and b.get("history"):
        t = [h["train_time_s"] for h in b["history"]]
        xs += t
        ax.plot(t, [100 * h["test_acc"] for h in b["history"]], "--s", color="black", lw=1.2, ms=3,
                label="baseline")
    target = 100 * results["settings"]["target_acc"]
    ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target:g}%")
    pos = [x for x in xs if x > 0]
    if pos and max(pos) / min(pos) > 20:  # a slow baseline would squeeze the fast runs against the axis
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)
    ax.set_ylim(0, 100)
    ax.set_xlabel("cumulative training time (s; compile included, evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    env = results["environment"]
    ds = results["dataset"]
    subset = f", {ds['images_used']['train']}-image subset" if ds.get("limit") else ""
    ax.set_title(f"{ds['name']}{subset} on {env['gpu_name'] or 'CPU'}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def write_outputs(results, out, with_plot):
    atomic_write_json(os.path.join(out, "results.json"), results)
    atomic_write_text(os.path.join(out, "results.md"), render_markdown(results))
    if with_plot:
        plot(results, os.path.join(out, "time_to_accuracy.png"))


# ---------------------------------------------------------------- main

def plan_jobs(args, beton_dir, device):
    """Interleaved: seed 0 of every grid point and norm, then seed 1, ... Each job's argument is its run's
    TrainConfig, serialized; building it checks every setting, so a bad --set or --grid stops here, before an
    hour of runs, not after (ConfigError)."""
    jobs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for label, norm, config in groups(args):
            out = os.path.join(args.out, "runs", run_name(norm, config, seed))
            cfg = TrainConfig.resolve(**{**run_settings(args, norm, seed, beton_dir, out, device), **config})
            jobs.append({"args": (cfg.to_dict(),),
                         "record": {"norm": norm, "seed": seed, "group": label, "config": config, "out": out}})
    return jobs


def warmup_config(cfg, out):
    """The untimed warm-up of a run's config: one epoch on a small subset (at least two of its batches, so that
    the fused kernel is autotuned at the run's training shapes), never compiled nor captured."""
    images = max(WARMUP_IMAGES, 2 * cfg.batch_size)
    return cfg.replace(epochs=1, limit=min(images, cfg.limit or images), compile="off", cuda_graphs=False,
                       plots=False, out=out)


def warmup_job(args, jobs):
    cfg = warmup_config(TrainConfig.from_dict(jobs[0]["args"][0]), os.path.join(args.out, "runs", "warmup"))
    return (cfg.to_dict(),), cfg.limit


def ray_resources(args, device):
    gpus = args.gpus_per_run if args.gpus_per_run is not None else float(device.type == "cuda")
    if device.type == "cuda" and gpus == 0:
        sys.exit("error: --device cuda with --gpus-per-run 0: Ray hides every GPU from a task that asks for none")
    return args.cpus_per_run or 1, gpus


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        os.makedirs(args.out, exist_ok=True)
        # once, here, before any job is scheduled: every run (and every Ray worker) reads the same folder
        prepared = prepare_data(resolve_source(args.data), args.beton_dir)  # betons, or arrays without ffcv
        beton_dir, manifest = prepared.folder, prepared.manifest
        if args.executor == "ray":
            args.cpus_per_run, args.gpus_per_run = ray_resources(args, device)
            # a Ray worker's working directory is not the driver's
            args.out, beton_dir = os.path.abspath(args.out), os.path.abspath(beton_dir)
        jobs = plan_jobs(args, beton_dir, device)
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    set_all_threads(args.threads)  # ffcv's import dropped torch to one thread; training sets all of them again
    env = environment(device, PROG, argv)
    ds = dataset_record(manifest, args.limit, args.dataset_label)
    grid = f" x {len(args.configs)} grid points" if args.grid else ""
    print(f"time to {100 * args.target:g}%: {len(jobs)} runs ({', '.join(args.norm)} x {args.seeds} seeds{grid})"
          f"{' + baseline' if args.baseline else ''} on {env['device_name']}, executor {args.executor}; "
          f"{dataset_line(ds)}", flush=True)

    done, baseline, state, ray = {}, None, "running", {}

    def report(i, rec):
        rec = done[i] = {**jobs[i]["record"], **rec}
        r = jobs[i]["record"]
        w = rec.get("where") or {}
        at = f" [ray node {(w.get('node_id') or '?')[:8]}, pid {w.get('pid')}]" if w.get("executor") == "ray" else ""
        print(f"[{len(done)}/{len(jobs)}] {r['group']} seed {r['seed']}: {describe(rec, args.target)}{at}", flush=True)
        write_outputs(collect(args, env, ds, [done[j] for j in sorted(done)], baseline, state, ray), args.out,
                      with_plot=False)

    try:
        if args.executor == "ray":
            run_ray(args, jobs, report, ray)
        else:
            run_local(args, jobs, report)
        if args.baseline:
            out = os.path.join(args.out, "runs", f"baseline-s{args.first_seed}")
            print(f"[baseline] reference recipe, at most {args.baseline_epochs} epochs -> {out}", flush=True)
            baseline = run_baseline(args, beton_dir, device, out)
            print(f"[baseline] {describe(baseline, args.target)}", flush=True)
        state = "complete"
    except KeyboardInterrupt:
        state = "interrupted"
        print("interrupted: writing what finished", file=sys.stderr, flush=True)
    runs = [done[j] for j in sorted(done)]
    results = collect(args, env, ds, runs, baseline, state, ray)
    write_outputs(results, args.out, with_plot=True)
    print()
    print(render_markdown(results))
    print("\n".join(success_lines(results)))
    print(f"wrote {os.path.join(args.out, 'results.json')}, results.md and time_to_accuracy.png", flush=True)
    if state == "interrupted":
        return 130
    crashed = any(r["status"] == "failed" for r in runs) or (baseline or {}).get("status") == "failed"
    return 1 if crashed else 0


def run_local(args, jobs, report):
    if args.warmup:
        wjob, limit = warmup_job(args, jobs)
        print(f"warm-up (untimed): {args.norm[0]}, 1 epoch on {limit} images", flush=True)
        w = run_one(*wjob)
        if w["status"] == "failed":
            print(f"warm-up failed ({w['error']}); the timed runs go ahead", flush=True)
    where = {"executor": "local", "node_id": None, "host": socket.gethostname(), "pid": os.getpid(),
             "niceness": os.nice(0)}
    for i, job in enumerate(jobs):
        print(f"[{i + 1}/{len(jobs)}] {job['record']['group']} seed {job['record']['seed']}: training -> "
              f"{job['record']['out']}", flush=True)
        report(i, dict(run_one(*job["args"]), where=where))


def run_ray(args, jobs, report, ray):
    """ray: filled with what the report says of Ray (the worker niceness asked for)."""
    from . import ray_executor as RX
    cpus, gpus, timed = args.cpus_per_run, args.gpus_per_run, not args.accuracy_only
    stop, ray["worker_niceness_asked"] = RX.start(args.ray_address, timed=timed)
    try:
        # a warm-up per worker process matters only where times are reported
        warm = (run_one, warmup_job(args, jobs)[0]) if args.warmup and timed else None
        print(f"ray: {len(jobs)} tasks, {cpus} CPU(s) and {gpus:g} GPU(s) each, "
              + ("one per machine at a time" if timed else "packed as resources allow (accuracy only)"), flush=True)
        RX.run(jobs, run_one, cpus=cpus, gpus=gpus, timed=timed, warmup=warm, on_result=report)
    finally:
        stop()


def describe(rec, target):
    if rec["status"] == "reached":
        return (f"reached {100 * target:g}% at epoch {rec['epochs_to_target']} after {rec['time_to_target_s']:.2f}s "
                f"of training (final {100 * rec['final_test_acc']:.2f}%)")
    if rec["status"] == "not_reached":
        return f"FAILED: {rec['error']}"
    return f"FAILED with an error: {rec['error']}"


if __name__ == "__main__":
    sys.exit(main())
