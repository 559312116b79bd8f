"""Time-to-accuracy benchmark: wall-clock training time until the test accuracy first reaches a target,
per normalization, over several seeds, optionally against a plain reference recipe.

    python -m benchmarks.time_to_accuracy --norm bn gn ln --seeds 3 --baseline --data PATH
    python -m benchmarks.time_to_accuracy --norm bn --seeds 1 --limit 2000 --epochs 1 --no-warmup   # smoke run

Every run is the real training code path (fastcifar.train.train, as `python -m fastcifar.train` runs it),
in its own folder DIR/runs/<norm>-s<seed>/, with the recipe's own settings: the preset decides the
schedule and whether training stops at the target. Time-to-target is the run's cumulative training time
(torch.compile included, evaluation excluded) at the end of the first epoch whose test accuracy reaches
the target. A run that raises, or that never reaches the target, is a failure and contributes no time:
medians are over the runs that reached it, and the failures are counted.

Runs are interleaved (seed 0 of every norm, then seed 1, ...) so that a slow stretch on a shared
machine does not land on one norm only. Before the timed runs, an untimed one-epoch warm-up job on a
small subset pays the process's one-time costs (CUDA context, cuDNN and oneDNN initialization, numba
JIT in ffcv) that would otherwise be charged to whichever run came first; --no-warmup skips it.
The warm-up does not compile. With --compile, each run compiles afresh (dynamo is reset between runs),
but inductor's on-disk cache persists: the first seed of each norm compiles cold (unless an earlier
invocation left that cache warm) and its later seeds reuse the generated kernels, as a second process
would; the per-run compile times in results.json show the difference.

Writes DIR/results.json, DIR/results.md (the same numbers as a table) and DIR/time_to_accuracy.png;
both files are rewritten after every run, so an interrupted suite keeps what it finished.
"""
import argparse
import gc
import json
import os
import shlex
import shutil
import statistics
import sys
import time
import traceback

import torch

from fastcifar import train as T
from fastcifar.data import DataError, prepare_betons, resolve_source
from fastcifar.evaluate import pick_device
from fastcifar.models import NORMS

from .common import (atomic_write_json, atomic_write_text, dataset_line, dataset_record, environment, fmt,
                     machine_line, markdown_table, save_figure_atomic, set_all_threads)

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
                   help="train with --compile (default: on with CUDA, off on the CPU, where compiling costs "
                        "minutes that a short run cannot earn back)")
    p.add_argument("--preset", choices=sorted(T.PRESETS), help="training preset (default: the trainer's)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    p.add_argument("--limit", type=int, help="train and test on a fixed spread of N images each (smoke runs; "
                                             "such times are not CIFAR-10 results)")
    p.add_argument("--threads", type=int, help="torch CPU threads for every run, the baseline included "
                                               "(default: all cores)")
    p.add_argument("--train-args", default="", metavar="'ARGS'",
                   help="more flags for every training run, e.g. --train-args='--cutout 8' (with '=': "
                        "argparse takes a lone value that starts with -- for an option)")
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
    return args


# ---------------------------------------------------------------- one run

def train_argv(args, norm, seed, data, out, device):
    argv = ["--norm", norm, "--seed", str(seed), "--target-acc", str(args.target), "--device", device.type,
            "--data", data, "--out", out]
    argv += ["--amp"] if args.amp else []
    argv += ["--compile"] if args.compile else []
    argv += ["--preset", args.preset] if args.preset else []
    argv += ["--epochs", str(args.epochs)] if args.epochs else []
    argv += ["--limit", str(args.limit)] if args.limit else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += [] if args.progress else ["--quiet"]
    argv += [] if args.run_plots else ["--no-plots"]
    return argv + shlex.split(args.train_args)


RUN_KEYS = ("params", "within_budget", "device", "amp", "compile", "fused_norm", "preset", "batch_size", "lr",
            "tta", "whiten_fit_time_s", "epochs_planned", "epochs_run", "torch_threads", "time_to_target_s",
            "epochs_to_target", "final_test_acc", "best_test_acc", "compile_time_s", "eval_time_s", "history")


def run_one(norm, seed, argv, out, target):
    """One training job; never raises (but for Ctrl-C): a failure is recorded, not thrown."""
    shutil.rmtree(out, ignore_errors=True)  # this run's own folder: no stale metrics or checkpoint mixed in
    fresh_process_state()
    rec = {"norm": norm, "seed": seed, "out": out, "train_argv": argv}
    t0 = time.perf_counter()
    try:
        metrics = T.train(T.parse_args(argv))
    except Exception as e:  # noqa: BLE001  one broken run must not end the suite
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
        partial = _read_json(os.path.join(out, "metrics.json"))  # e.g. the non-finite-loss guard wrote one
        rec.update({k: partial[k] for k in ("history", "params") if k in partial})
        rec["time_to_target_s"] = None
    else:
        rec.update({k: metrics.get(k) for k in RUN_KEYS})
        rec["train_time_s"] = metrics["history"][-1]["train_time_s"] if metrics["history"] else None
        if metrics.get("time_to_target_s") is not None:
            rec["status"] = "reached"
        else:
            rec.update(status="not_reached", time_to_target_s=None,
                       error=f"did not reach {100 * target:g}% in {metrics.get('epochs_run')} epoch(s) "
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


def _read_json(path):
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


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
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def summarize_norm(runs):
    reached = [r for r in runs if r["status"] == "reached"]
    trained = [r for r in runs if r["status"] != "failed"]  # finished training, target or not
    n_ok = len(reached)
    return {
        "runs": len(runs), "reached": n_ok, "not_reached": sum(r["status"] == "not_reached" for r in runs),
        "failed": sum(r["status"] == "failed" for r in runs), "failures": len(runs) - n_ok,
        "status": "ok" if n_ok == len(runs) else "partial" if n_ok else "failed",
        "params": next((r["params"] for r in runs if r.get("params") is not None), None),
        "time_to_target_s": _spread([r["time_to_target_s"] for r in reached]),
        "epochs_to_target": _spread([r["epochs_to_target"] for r in reached]),
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


def collect(args, env, ds, runs, baseline, state):
    norms = {}
    for n in args.norm:
        mine = [r for r in runs if r["norm"] == n]
        if mine:
            norms[n] = summarize_norm(mine)
            norms[n]["speedup_vs_baseline"] = speedup(baseline, norms[n])
    bl = None
    if baseline is not None:
        bl = {k: v for k, v in baseline.items() if k != "traceback"}
    failed_any = any(s["status"] != "ok" for s in norms.values())
    return {
        "benchmark": "time_to_accuracy", "state": state, "environment": env, "dataset": ds,
        "settings": {"norms": args.norm, "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
                     "target_acc": args.target, "device": env["device"], "amp": args.amp, "compile": args.compile,
                     "preset": args.preset or T.parse_args([]).preset, "epochs": args.epochs, "limit": args.limit,
                     "train_args": args.train_args, "threads": args.threads, "baseline": args.baseline, "baseline_epochs": args.baseline_epochs,
                     "warmup": args.warmup},
        "status": "no runs" if not norms else "failed" if all(s["status"] == "failed" for s in norms.values())
        else "partial" if failed_any else "ok",
        "norms": norms, "baseline": bl, "runs": [{k: v for k, v in r.items() if k != "traceback"} for r in runs],
    }


# ---------------------------------------------------------------- report

TABLE_HEADER = ["recipe", "params", "reached / runs", "time to target, median (s)", "min (s)", "max (s)",
                "epochs to target, median", "final test acc (%)", "best test acc (%)", "compile (s)", "eval (s)",
                "speed-up vs baseline"]


def _acc(ms):
    if ms["mean"] is None:
        return "n/a"
    return f"{100 * ms['mean']:.2f}" + (f" ± {100 * ms['std']:.2f}" if ms["std"] is not None else "")


def _g(x):
    return "n/a" if x is None else f"{x:g}"


def table_rows(results):
    rows = []
    for n, s in results["norms"].items():
        t = s["time_to_target_s"]
        rows.append([n, s["params"] if s["params"] is not None else "n/a", f"{s['reached']} / {s['runs']}",
                     fmt(t["median"]), fmt(t["min"]), fmt(t["max"]), _g(s["epochs_to_target"]["median"]),
                     _acc(s["final_test_acc"]), _acc(s["best_test_acc"]), fmt(s["compile_time_s"]),
                     fmt(s["eval_time_s"]), fmt_speedup(s.get("speedup_vs_baseline"))])
    b = results.get("baseline")
    if b:
        trained = b["status"] != "failed"
        one = lambda k: {"mean": b.get(k), "std": None} if trained else {"mean": None}  # noqa: E731
        t = b.get("time_to_target_s")
        rows.append(["baseline", b.get("params", "n/a"), f"{int(b['status'] == 'reached')} / 1", fmt(t), fmt(t),
                     fmt(t), _g(b.get("epochs_to_target")), _acc(one("final_test_acc")), _acc(one("best_test_acc")),
                     fmt(b.get("compile_time_s")), fmt(b.get("eval_time_s")), "1.00x" if t is not None else "n/a"])
    return rows


def render_markdown(results):
    env, ds, st = results["environment"], results["dataset"], results["settings"]
    target = f"{100 * st['target_acc']:g}%"
    lines = [f"# Time to {target} test accuracy", "",
             f"- Command: `{env['command']}`",
             f"- Date: {env['date']}",
             f"- Machine: {machine_line(env)}",
             f"- Dataset: {dataset_line(ds)}",
             f"- Code: git {env.get('git_commit') or 'unknown'}" + (" (with uncommitted changes)" if env.get("git_dirty") else ""),
             f"- Versions: torch {env['torch']}, torchvision {env['torchvision']}, triton {env['triton']}, "
             f"ffcv {env['ffcv']}, python {env['python']}",
             f"- Settings: device {st['device']}, amp {'on' if st['amp'] else 'off'}, compile "
             f"{'on' if st['compile'] else 'off'}, preset {st['preset']}, epochs {st['epochs'] or 'from the preset'}, "
             f"seeds {', '.join(map(str, st['seeds']))}" + (f", extra training flags `{st['train_args']}`" if st["train_args"] else ""),
             f"- Status: {results['status']}" + ("" if results["state"] == "complete" else f" ({results['state']})"),
             "",
             markdown_table(TABLE_HEADER, table_rows(results)),
             "",
             f"Time to target: cumulative training time at the end of the first epoch whose test accuracy reaches "
             f"{target}, torch.compile included, evaluation excluded; median, min and max over the runs that reached "
             "it. Accuracies: mean ± sample standard deviation over the runs that finished training. Compile: "
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
    if errors:
        lines += ["", "## Runs that did not reach the target", ""]
        lines += [f"- {n} seed {e['seed']}: {e['status']}: {e['error']}" for n, e in errors]
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = []
    for i, n in enumerate(results["settings"]["norms"]):
        first = True
        for r in (r for r in results["runs"] if r["norm"] == n and r.get("history")):
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

def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
    except DataError as e:
        sys.exit(f"error: {e}")
    if args.compile is None:
        args.compile = device.type == "cuda"
    os.makedirs(args.out, exist_ok=True)
    try:
        beton_dir, manifest = prepare_betons(resolve_source(args.data), args.beton_dir)
    except DataError as e:
        sys.exit(f"error: {e}")
    set_all_threads(args.threads)  # ffcv's import dropped torch to one thread; training sets all of them again
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    plan = [(n, s, os.path.join(args.out, "runs", f"{n}-s{s}")) for s in seeds for n in args.norm]
    plan = [(n, s, o, train_argv(args, n, s, beton_dir, o, device)) for n, s, o in plan]
    for *_, argv_ in plan:  # a bad --train-args stops here, before an hour of runs, not after
        T.parse_args(argv_)
    env = environment(device, PROG, argv)
    ds = dataset_record(manifest, args.limit, args.dataset_label)
    print(f"time to {100 * args.target:g}%: {len(plan)} runs ({', '.join(args.norm)} x {args.seeds} seeds)"
          f"{' + baseline' if args.baseline else ''} on {env['device_name']}; {dataset_line(ds)}", flush=True)

    runs, baseline, state = [], None, "running"
    try:
        if args.warmup:
            limit = min(WARMUP_IMAGES, args.limit or WARMUP_IMAGES)
            wout = os.path.join(args.out, "runs", "warmup")
            wargv = train_argv(args, args.norm[0], args.first_seed, beton_dir, wout, device)
            wargv = [a for a in wargv if a != "--compile"] + ["--limit", str(limit), "--epochs", "1", "--no-plots"]
            print(f"warm-up (untimed): {args.norm[0]}, 1 epoch on {limit} images", flush=True)
            w = run_one(args.norm[0], args.first_seed, wargv, wout, args.target)
            if w["status"] == "failed":
                print(f"warm-up failed ({w['error']}); the timed runs go ahead", flush=True)
        for i, (norm, seed, out, argv_) in enumerate(plan, 1):
            print(f"[{i}/{len(plan)}] {norm} seed {seed}: training -> {out}", flush=True)
            rec = run_one(norm, seed, argv_, out, args.target)
            runs.append(rec)
            print(f"[{i}/{len(plan)}] {norm} seed {seed}: {describe(rec, args.target)}", flush=True)
            write_outputs(collect(args, env, ds, runs, baseline, state), args.out, with_plot=False)
        if args.baseline:
            out = os.path.join(args.out, "runs", f"baseline-s{args.first_seed}")
            print(f"[baseline] reference recipe, at most {args.baseline_epochs} epochs -> {out}", flush=True)
            baseline = run_baseline(args, beton_dir, device, out)
            print(f"[baseline] {describe(baseline, args.target)}", flush=True)
        state = "complete"
    except KeyboardInterrupt:
        state = "interrupted"
        print("interrupted: writing what finished", file=sys.stderr, flush=True)
    results = collect(args, env, ds, runs, baseline, state)
    write_outputs(results, args.out, with_plot=True)
    print()
    print(render_markdown(results))
    print(f"wrote {os.path.join(args.out, 'results.json')}, results.md and time_to_accuracy.png", flush=True)
    if state == "interrupted":
        return 130
    crashed = any(r["status"] == "failed" for r in runs) or (baseline or {}).get("status") == "failed"
    return 1 if crashed else 0


def describe(rec, target):
    if rec["status"] == "reached":
        return (f"reached {100 * target:g}% at epoch {rec['epochs_to_target']} after {rec['time_to_target_s']:.2f}s "
                f"of training (final {100 * rec['final_test_acc']:.2f}%)")
    if rec["status"] == "not_reached":
        return f"FAILED: {rec['error']}"
    return f"FAILED with an error: {rec['error']}"


if __name__ == "__main__":
    sys.exit(main())
