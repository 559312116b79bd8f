"""Run the whole benchmark suite and collect its outputs in one folder.

    python -m benchmarks --data PATH --out results     # time-to-accuracy, loader, throughput, kernels
    python -m benchmarks --data PATH --norm bn --seeds 1 --no-baseline --parts time_to_accuracy loader

OUT/time_to_accuracy/  results.json, results.md, time_to_accuracy.png, runs/   (benchmarks.time_to_accuracy)
OUT/loader/            loader.json, loader.md                                  (benchmarks.loader)
OUT/throughput/        throughput.json, throughput.md, throughput.png           (benchmarks.throughput)
OUT/kernels/           kernels.json                                            (benchmarks.kernels; needs CUDA)
OUT/summary.json       each part's exit status, error and output folder; OUT/summary.md the same, with the
                       parts' Markdown reports appended

A part that fails (an exception, a non-zero exit, a missing module) is recorded and the next one runs.
"""
import argparse
import contextlib
import importlib
import os
import sys
import time
import traceback

from fastcifar.device import ConfigError

from .common import atomic_write_json, atomic_write_text, environment, markdown_table, pick_device, report_header

PROG = "python -m benchmarks"
PARTS = ("time_to_accuracy", "loader", "throughput", "kernels")
REPORTS = {"time_to_accuracy": "results.md", "loader": "loader.md", "throughput": "throughput.md"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results", help="output folder, one subfolder per part (default results)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts (default: all)")
    p.add_argument("--data", help="CIFAR-10 source or a folder of betons (time_to_accuracy, loader)")
    p.add_argument("--beton-dir", help="where converted betons are cached (time_to_accuracy, loader)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="(time_to_accuracy, loader; default auto)")
    p.add_argument("--norm", nargs="+", help="norms to time (time_to_accuracy; default all)")
    p.add_argument("--seeds", type=int, help="seeds per norm (time_to_accuracy; default 3)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="train the reference recipe too (time_to_accuracy; default on)")
    p.add_argument("--limit", type=int, help="a fixed spread of N images (time_to_accuracy, loader; smoke runs)")
    p.add_argument("--epochs", type=int, help="training epochs (time_to_accuracy; smoke runs)")
    p.add_argument("--time-to-accuracy-args", default="", metavar="'ARGS'",
                   help="more flags for benchmarks.time_to_accuracy, as --time-to-accuracy-args='--no-warmup' "
                        "(with '=')")
    p.add_argument("--loader-args", default="", metavar="'ARGS'", help="more flags for benchmarks.loader")
    p.add_argument("--throughput-args", default="", metavar="'ARGS'", help="more flags for benchmarks.throughput")
    p.add_argument("--kernels-args", default="", metavar="'ARGS'", help="more flags for benchmarks.kernels")
    args = p.parse_args(argv)
    args.parts = list(dict.fromkeys(args.parts))
    return args


def part_argv(args, part):
    import shlex
    out = ["--out", os.path.join(args.out, part)]
    if part == "kernels":
        return out + shlex.split(args.kernels_args)
    if part == "throughput":
        return out + (["--device", args.device] if args.device else []) + shlex.split(args.throughput_args)
    common = [x for k in ("data", "beton_dir", "device") if getattr(args, k)
              for x in (f"--{k.replace('_', '-')}", getattr(args, k))]
    common += ["--limit", str(args.limit)] if args.limit else []
    if part == "loader":
        return out + common + shlex.split(args.loader_args)
    harness = out + common
    harness += ["--norm", *args.norm] if args.norm else []
    harness += ["--seeds", str(args.seeds)] if args.seeds else []
    harness += ["--epochs", str(args.epochs)] if args.epochs else []
    harness += ["--baseline"] if args.baseline else []
    return harness + shlex.split(args.time_to_accuracy_args)


def run_part(part, argv):
    """Import lazily (the kernels module belongs to another piece of work and may be absent or broken)."""
    rec = {"part": part, "argv": argv, "out": argv[1]}
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(f"benchmarks.{part}")
    except Exception as e:  # noqa: BLE001
        rec.update(status="missing", error=f"cannot import benchmarks.{part}: {type(e).__name__}: {e}")
        return rec
    try:
        rc = mod.main(argv)
    except SystemExit as e:  # argparse errors and the parts' "error: ..." exits
        rc = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            rec["error"] = str(e.code)
            print(e.code, file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        rc = 1
        rec.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
        print(f"{part} failed: {rec['error']}", file=sys.stderr)
    rec.update(returncode=rc or 0, status="ok" if not rc else "failed", wall_s=time.perf_counter() - t0)
    return rec


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = environment("cpu", PROG, argv)
    with contextlib.suppress(ConfigError):  # --device cuda without one: the parts say so themselves
        env = environment(pick_device(args.device or "auto"), PROG, argv)
    summary = {"benchmark": "suite", "environment": env, "parts": []}
    for part in args.parts:
        print(f"=== {part} ===", flush=True)
        try:
            rec = run_part(part, part_argv(args, part))
        except KeyboardInterrupt:
            summary["parts"].append({"part": part, "status": "interrupted"})
            write_summary(summary, args.out)
            return 130
        summary["parts"].append(rec)
        write_summary(summary, args.out)
        print(f"=== {part}: {rec['status']}" + (f" ({rec['error']})" if rec.get("error") else "") + " ===", flush=True)
    write_summary(summary, args.out)
    print(f"wrote {os.path.join(args.out, 'summary.json')} and summary.md")
    return 0 if all(r["status"] == "ok" for r in summary["parts"]) else 1


def write_summary(summary, out):
    summary["status"] = "ok" if all(r["status"] == "ok" for r in summary["parts"]) else "failed"
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    env = summary["environment"]
    lines = [*report_header("Benchmark suite", env), "",
             markdown_table(["part", "status", "output", "note"],
                            [[r["part"], r["status"], r.get("out", ""), r.get("error", "")] for r in summary["parts"]])]
    for r in summary["parts"]:
        report = os.path.join(r.get("out", ""), REPORTS.get(r["part"], ""))
        if r["part"] in REPORTS and os.path.isfile(report):
            with open(report) as f:  # one heading level down, under this file's title
                lines += [""] + ["#" + line if line.startswith("#") else line for line in f.read().splitlines()]
    atomic_write_text(os.path.join(out, "summary.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
