"""python -m benchmarks.gpu_report: the flags, and the report's life (each part in turn, the report rewritten
after every step, the exit status). The package docstring says what each part does."""
import argparse
import contextlib
import os
import subprocess
import sys
import time
import traceback

import torch

from ..common import atomic_write_json, atomic_write_text, environment, machine_line
from . import __doc__ as DOC
from . import kernels_part, tests_part, time_to_target_part
from .render import render_markdown

PROG = "python -m benchmarks.gpu_report"
PARTS = ("tests", "kernels", "time_to_target")
PART_FNS = {"tests": tests_part.run, "kernels": kernels_part.run, "time_to_target": time_to_target_part.run}
KERNEL_DTYPES = ("fp32", "fp16", "bf16")  # benchmarks.kernels.DTYPES, named here: that module imports triton


def parse_args(argv=None):
    from fastcifar.config import PRESETS
    from fastcifar.models import NORMS

    from ..time_to_accuracy import parse_settings
    p = argparse.ArgumentParser(prog=PROG, description=DOC.split("\n\n")[0], epilog=DOC.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for report.md, report.json, logs and runs")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="default: all")
    p.add_argument("--data", help="CIFAR-10 source or beton folder for time_to_target (default: $FASTCIFAR_DATA, "
                                  "else the official download)")
    p.add_argument("--beton-dir", help="where the converted data is cached (betons, or arrays with --cpu-smoke; "
                                       "default: fastcifar's cache)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one process may run before it is killed "
                                                             "and recorded as failed (default 1800)")
    p.add_argument("--test-paths", nargs="+", help="test files to select CUDA tests from (default: every "
                                                   "tests/test_*.py that mentions CUDA)")
    p.add_argument("--kernel-batch", type=int, nargs="+", default=[512], help="batch sizes to time (default 512)")
    p.add_argument("--kernel-dtypes", nargs="+", choices=KERNEL_DTYPES, default=["fp32", "bf16"])
    p.add_argument("--kernel-formats", nargs="+", choices=["nchw", "cl"], default=["nchw", "cl"])
    p.add_argument("--norm", nargs="+", choices=NORMS, help="time_to_target norms (default all; gn with --cpu-smoke)")
    p.add_argument("--configs", nargs="+", choices=list(time_to_target_part.CONFIGS),
                   default=list(time_to_target_part.CONFIGS), metavar="NAME",
                   help=f"time_to_target configurations: {', '.join(time_to_target_part.CONFIGS)} (default all; the "
                        "fused ones run for gn and ln only)")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default 3; 1 with --cpu-smoke)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.70, help="test accuracy to reach (default 0.70)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="training preset (default: the trainer's)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's; 1 with --cpu-smoke)")
    p.add_argument("--limit", type=int, help="train and test on N images (default: all; 256 with --cpu-smoke)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="train with --amp (default on)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                   help="training settings for every run, e.g. --set batch_size=512 (TrainConfig fields)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every part's own code on the CPU at a toy size (a check that it runs, not results)")
    args = p.parse_args(argv)
    if args.data and not os.path.exists(args.data):
        p.error(f"--data {args.data}: no such file or folder")
    if min(args.kernel_batch) < 1 or args.timeout < 1 or (args.seeds is not None and args.seeds < 1) or \
            (args.epochs is not None and args.epochs < 1) or (args.limit is not None and args.limit < 1):
        p.error("--kernel-batch, --timeout, --seeds, --epochs and --limit must be at least 1")
    if not 0 < args.target <= 1:
        p.error("--target is a fraction in (0, 1]")
    try:
        args.fixed = parse_settings(args.settings)
    except ValueError as e:
        p.error(str(e))
    # children run from the repository root: paths must not depend on the caller's folder
    args.test_paths = [os.path.abspath(t) for t in args.test_paths or []] or None
    args.data, args.beton_dir = (os.path.abspath(x) if x else x for x in (args.data, args.beton_dir))
    args.parts = [x for x in PARTS if x in args.parts]
    args.norm = list(dict.fromkeys(args.norm)) if args.norm else None
    args.configs = list(dict.fromkeys(args.configs))
    return args


def environment_record(cuda, argv):
    env = environment("cuda" if cuda else "cpu", PROG, argv)
    env.update(cuda_available=cuda, torch_cuda_build=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu_capability=f"sm_{p.major}{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   gpu_count=torch.cuda.device_count())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            env["driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    return env


class Context:
    """What every part sees: the output folder, whether CUDA is here, whether this is a --cpu-smoke, the report."""

    def __init__(self, out, cuda, report, smoke=False):
        self.out, self.cuda, self.report, self.smoke = out, cuda, report, smoke

    def progress(self, part, rec):
        self.report["parts"][part] = rec
        self.save()

    def save(self):
        atomic_write_json(os.path.join(self.out, "report.json"), self.report)
        atomic_write_text(os.path.join(self.out, "report.md"), render_markdown(self.report))


def run_part(name, args, ctx):
    t0 = time.perf_counter()
    try:
        rec = PART_FNS[name](args, ctx)
    except Exception as e:  # noqa: BLE001  a part that breaks is reported; the others still run
        rec = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    rec.setdefault("wall_s", time.perf_counter() - t0)
    return rec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu_smoke  # a smoke run is the CPU's, GPU or not
    report = {"benchmark": "gpu_report", "state": "running", "cuda": cuda, "smoke": args.cpu_smoke,
              "environment": environment_record(cuda, argv), "dataset": None, "settings": dict(vars(args)),
              "parts": {}}
    ctx = Context(out, cuda, report, args.cpu_smoke)
    print(f"{PROG}: {machine_line(report['environment'])}" + ("" if cuda else "; no CUDA device" if not args.cpu_smoke
                                                                else "; --cpu-smoke"), flush=True)
    for name in PARTS:
        if name not in args.parts:
            ctx.progress(name, {"status": "skipped", "reason": "not asked for (--parts)"})
            continue
        print(f"=== {name} ===", flush=True)
        ctx.progress(name, {"status": "running"})
        try:
            rec = run_part(name, args, ctx)
        except KeyboardInterrupt:
            report["state"] = "interrupted"
            ctx.progress(name, {"status": "failed", "reason": "interrupted"})
            print(f"interrupted; wrote {out}/report.md", file=sys.stderr)
            return 130
        ctx.progress(name, rec)
        print(f"=== {name}: {rec['status']}: {rec.get('reason', '')} ===", flush=True)
    report["state"] = "complete"
    ctx.save()
    print(f"wrote {os.path.join(out, 'report.md')} and report.json", flush=True)
    return 1 if any(p["status"] == "failed" for p in report["parts"].values()) else 0
