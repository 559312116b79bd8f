"""Verify the project on a CUDA machine with one command, and write one report of what ran, passed and failed.

    python -m benchmarks.gpu_report --data PATH --out DIR
    python -m benchmarks.gpu_report --out DIR --parts tests kernels              # no data needed
    python -m benchmarks.gpu_report --data PATH --out DIR --seeds 1 --configs eager compile   # shorter

Parts, each run in processes of its own, so that a crash (a segfault, a sticky CUDA error, a hang past
--timeout) fails that part, or that configuration, and the rest still run:
  tests           the CUDA test subset: tests marked `cuda`, or skipped by a skipif whose condition follows
                  torch.cuda.is_available() and whose reason names CUDA or a GPU; pass/fail per test from pytest's
                  junit XML (on a GPU this also picks the tests gated on the fused kernel being runnable)
  kernels         the fused GroupNorm+ReLU against eager F.group_norm + F.relu and torch.compile of that pair, at
                  the gn/ln models' norm shapes, fp32/bf16, NCHW and channels_last, forward and forward+backward
                  (triton.testing.do_bench, median), each shape also checked against fp32 eager
  time_to_target  time to 70% per norm for eager/compile x unfused/fused, graphs on the compiled (CONFIGS; fused
                  only for gn and ln), --seeds seeds each, every configuration in a fresh process after an
                  untimed warm-up job; the trainer's flag per setting is in TRAIN_FLAGS

Time on one H100, an estimate (no GPU has run this yet): tests 1-2 min, kernels 2-3 min (16 shapes, two
compiles each), time_to_target about 10 min at 3 seeds (15 configurations x (warm-up + 3 runs); compiling
dominates) -- about 15 min in all. --seeds 1 roughly halves time_to_target.

Writes DIR/report.md and DIR/report.json (atomically, after every part and every configuration, so an
interrupted or crashed run keeps what finished), DIR/logs/*.log (each process's output), DIR/tests/junit.xml,
DIR/time_to_target/<norm>-<config>/ (each run's metrics.json). Exit status: 0 when no part failed, 1 when
one did, 130 when interrupted. Without CUDA it says so, runs the test selection (every CUDA test is reported
skipped), skips kernel timing, and skips time_to_target unless --cpu-smoke asks for a tiny eager run on the
CPU; it then exits 0.
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

import torch

from .common import atomic_write_json, atomic_write_text, dataset_line, dataset_record, environment, fmt, \
    machine_line, markdown_table

PROG = "python -m benchmarks.gpu_report"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("tests", "kernels", "time_to_target")
CHILD = "--child"  # internal: python -m benchmarks.gpu_report --child {kernels,tta} SPEC.json

# time-to-target configurations: name -> (compile, fused norm, CUDA graphs)
# (CUDA graphs capture the compiled step, so there is no graphs-without-compile configuration)
CONFIGS = {
    "eager": (False, False, False),
    "compile": (True, False, False),
    "compile-graphs": (True, False, True),
    "fused": (False, True, False),
    "compile-fused": (True, True, False),
    "compile-fused-graphs": (True, True, True),
}
# the trainer's spelling of each setting: the one place to change when fastcifar.train's flags change.
# Fused is "on", not "auto": a kernel that fails its check must fail the run, not time the torch path.
TRAIN_FLAGS = {
    "compile": {True: ["--compile", "on"], False: ["--compile", "off"]},
    "fused": {True: ["--fused-norm", "on"], False: ["--fused-norm", "off"]},
    "graphs": {True: ["--cuda-graphs"], False: ["--no-cuda-graphs"]},
}
FUSED_NORMS = ("gn", "ln")  # bn has no GroupNorm to fuse
KERNEL_TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}  # max|fused - fp32 eager| / max|fp32 eager|
CUDA_WORDS = re.compile(r"cuda|gpu", re.I)


def config_flags(name):
    compile_, fused, graphs = CONFIGS[name]
    return TRAIN_FLAGS["compile"][compile_] + TRAIN_FLAGS["fused"][fused] + TRAIN_FLAGS["graphs"][graphs]


def configs_for(norm, names):
    return [c for c in names if norm in FUSED_NORMS or not CONFIGS[c][1]]


# ---------------------------------------------------------------- pytest plugin (pytest -p benchmarks.gpu_report)

def is_cuda_test(item, cuda):
    """Marked `cuda`, or skipped by a skipif that follows CUDA's availability and says so in its reason."""
    if item.get_closest_marker("cuda"):
        return True
    return any(m.args and not isinstance(m.args[0], str) and bool(m.args[0]) == (not cuda)
               and CUDA_WORDS.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (python -m benchmarks.gpu_report runs these)")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    keep = [i for i in items if is_cuda_test(i, cuda)]
    drop = [i for i in items if not is_cuda_test(i, cuda)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def cuda_test_files():
    """Test modules that mention CUDA at all: the rest cannot hold a CUDA test, and need not be collected."""
    folder = os.path.join(ROOT, "tests")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("test_") and f.endswith(".py"))
    found = []
    for f in files:
        with open(f, errors="replace") as fh:
            if "cuda" in fh.read().lower():
                found.append(f)
    return found


def read_junit(path):
    """[{test, outcome: passed/failed/error/skipped, message}] from pytest's junit XML."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = ((el.get("message") or el.text or "").strip().splitlines() or [""])[0][:300]
                break
        out.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                    "time_s": float(case.get("time") or 0), "message": message})
    return out


# ---------------------------------------------------------------- running processes

def run_logged(cmd, log_path, timeout):
    """Run cmd from the repository root with its output in log_path; (returncode or 'timeout', seconds)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.perf_counter() - t0


def log_tail(path, lines=15):
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return "\n".join(f.read().splitlines()[-lines:])
    return ""


def read_json(path):
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        return json.load(f)
    return None


def run_child(kind, spec, out, name, timeout):
    """Run a --child process on spec; (its result JSON or None, returncode, seconds, log path)."""
    spec = dict(spec, result=os.path.join(out, "logs", f"{name}.result.json"))
    spec_path = os.path.join(out, "logs", f"{name}.spec.json")
    os.makedirs(os.path.dirname(spec_path), exist_ok=True)
    atomic_write_json(spec_path, spec)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spec["result"])  # a result left by an earlier report must not pass for this one's
    log = os.path.join(out, "logs", f"{name}.log")
    rc, secs = run_logged([sys.executable, "-m", "benchmarks.gpu_report", CHILD, kind, spec_path], log, timeout)
    return read_json(spec["result"]), rc, secs, log


def crash_note(rc, log, timeout):
    if rc == "timeout":
        return f"killed after the {timeout} s timeout (log: {log})"
    return f"exited with status {rc} (log: {log}): {log_tail(log, 1)}"


# ---------------------------------------------------------------- part 1: tests

def part_tests(args, ctx):
    files = args.test_paths or cuda_test_files()
    if not files:
        return {"status": "skipped", "reason": "no test module mentions CUDA"}
    junit = os.path.join(ctx.out, "tests", "junit.xml")
    os.makedirs(os.path.dirname(junit), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(junit)
    cmd = [sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_report", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *files]
    log = os.path.join(ctx.out, "logs", "tests.log")
    rc, secs = run_logged(cmd, log, args.timeout)
    rec = {"command": " ".join(cmd), "files": files, "log": log, "returncode": rc, "wall_s": secs}
    if not os.path.isfile(junit):
        return dict(rec, status="failed", reason=f"pytest wrote no junit XML; it {crash_note(rc, log, args.timeout)}")
    tests = read_junit(junit)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    rec.update(junit=junit, tests=tests, counts=counts)
    if not tests:  # rc 5: nothing selected
        return dict(rec, status="skipped", reason="no CUDA test was selected")
    if counts["failed"] or counts["error"] or rc not in (0, 5):
        why = f"{counts['failed']} failed, {counts['error']} errors" + \
              ("" if isinstance(rc, int) else f"; pytest {crash_note(rc, log, args.timeout)}")
        return dict(rec, status="failed", reason=why)
    if not ctx.cuda and counts["skipped"] == len(tests):
        return dict(rec, status="skipped", reason=f"no CUDA device: all {len(tests)} CUDA tests were collected and "
                                                  "skipped")
    return dict(rec, status="ok", reason=f"{counts['passed']} passed, {counts['skipped']} skipped")


# ---------------------------------------------------------------- part 2: kernel timing

def kernel_rel_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def time_kernel_config(fk, shape, dtype_name, fmt_name, modes, impls, device, bench):
    """Rows {impl, mode, ms} for one shape, plus the fused result checked against fp32 eager (forward and all
    three gradients). bench(fn) -> milliseconds; do_bench on a GPU, anything on the CPU."""
    from .kernels import DTYPES, EPS, FORMATS, eager_pair
    n, c, h, w, g = shape
    dtype, fmt = DTYPES[dtype_name], FORMATS[fmt_name]
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).to(memory_format=fmt)
    dy = torch.randn_like(x)
    wt = (1 + 0.2 * torch.randn(c, device=device)).to(dtype)
    bs = (0.05 * torch.randn(c, device=device)).to(dtype)
    if not fk.fused_available(x):  # group_norm_relu would quietly time the torch path as "fused"
        raise RuntimeError(f"the fused kernel cannot run on {device} {dtype_name} here (fused_available is False)")
    fns = {"eager": lambda x, w, b: eager_pair(x, g, w, b),
           "fused": lambda x, w, b: fk.group_norm_relu(x, g, w, b, EPS)}
    if "compile" in impls:
        torch._dynamo.reset()  # a fresh compile per shape: no recompile limit to run into
        fns["compile"] = torch.compile(fns["eager"], dynamic=False)

    def grads(fn, *inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        y = fn(*leaves)
        return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]
    ref = grads(fns["eager"], x.float(), wt.float(), bs.float())
    got = grads(fns["fused"], x, wt, bs)
    errs = dict(zip(("y", "dx", "dw", "db"), (kernel_rel_err(a, b) for a, b in zip(got, ref))))
    check = {"rel_err": errs, "tol": KERNEL_TOL[dtype_name], "keeps_format": got[0].is_contiguous(memory_format=fmt),
             "ok": max(errs.values()) <= KERNEL_TOL[dtype_name] and got[0].is_contiguous(memory_format=fmt)}
    rows = []
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, wt, bs))
    for impl in impls:
        f = fns[impl]
        for mode in modes:
            if mode == "fwd":
                def call(f=f):
                    with torch.no_grad():
                        f(x, wt, bs)
            else:
                def call(f=f):
                    torch.autograd.grad(f(xg, wg, bg), (xg, wg, bg), dy)
            rows.append({"impl": impl, "mode": mode, "ms": bench(call)})
    return rows, check


def kernels_child(spec):
    import fastcifar_kernels as fk

    from .kernels import model_norm_shapes
    if getattr(importlib.import_module("fastcifar_kernels.group_norm_relu"), "_INTERPRETED", False):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET: unset it to time the compiled kernels")
    from triton.testing import do_bench
    shapes, source = model_norm_shapes()
    res = {"shapes_from": source, "configs": [], "errors": []}
    for c, h, w, g, models in shapes:
        for n in spec["batch"]:
            for fmt_name in spec["formats"]:
                for dt in spec["dtypes"]:
                    key = {"models": models, "N": n, "C": c, "H": h, "W": w, "G": g, "format": fmt_name, "dtype": dt}
                    print(f"timing {key}", flush=True)
                    try:
                        rows, check = time_kernel_config(fk, (n, c, h, w, g), dt, fmt_name, spec["modes"],
                                                         spec["impls"], "cuda",
                                                         lambda fn: do_bench(fn, return_mode="median"))
                        res["configs"].append(dict(key, rows=rows, check=check))
                    except Exception as e:  # noqa: BLE001  one shape that breaks must not hide the others
                        traceback.print_exc()
                        res["errors"].append(dict(key, error=f"{type(e).__name__}: {e}"))
                    torch.cuda.empty_cache()
                    atomic_write_json(spec["result"], res)
    atomic_write_json(spec["result"], res)
    return 0


def part_kernels(args, ctx):
    if not ctx.cuda:
        return {"status": "skipped", "reason": "no CUDA device: the fused kernel is timed only on a GPU"}
    spec = {"batch": args.kernel_batch, "dtypes": args.kernel_dtypes, "formats": args.kernel_formats,
            "modes": ["fwd", "fwdbwd"], "impls": ["eager", "compile", "fused"]}
    res, rc, secs, log = run_child("kernels", spec, ctx.out, "kernels", args.timeout)
    rec = dict(spec, log=log, returncode=rc, wall_s=secs, **(res or {}))
    if res is None:
        return dict(rec, status="failed", reason=crash_note(rc, log, args.timeout))
    bad = sum(not c["check"]["ok"] for c in res["configs"])
    problems = [f"{len(res['errors'])} shape(s) raised" if res["errors"] else "",
                f"{bad} shape(s) disagree with fp32 eager" if bad else "",
                f"the process {crash_note(rc, log, args.timeout)}" if rc != 0 else ""]
    problems = [p for p in problems if p]
    if problems:
        return dict(rec, status="failed", reason="; ".join(problems))
    return dict(rec, status="ok", reason=f"{len(res['configs'])} shapes timed, all agree with fp32 eager")


# ---------------------------------------------------------------- part 3: time to target

def train_argvs(args, norm, config, seeds, beton_dir, out, device):
    """({seed: argv}, warm-up argv) for one configuration; the warm-up neither compiles nor captures graphs."""
    from types import SimpleNamespace

    from .time_to_accuracy import WARMUP_IMAGES, train_argv
    # compile=None: the harness adds no --compile of its own; config_flags says it for every configuration
    ns = SimpleNamespace(target=args.target, amp=args.amp, compile=None, preset=args.preset, epochs=args.epochs,
                         limit=args.limit, threads=None, progress=False, run_plots=False, train_args=args.train_args,
                         executor="local", accuracy_only=False, cpus_per_run=None)
    runs = {s: train_argv(ns, norm, s, beton_dir, os.path.join(out, f"s{s}"), device) + config_flags(config)
            for s in seeds}
    ns.epochs, ns.limit = 1, min(WARMUP_IMAGES, args.limit or WARMUP_IMAGES)
    fused = CONFIGS[config][1]
    warm = train_argv(ns, norm, seeds[0], beton_dir, os.path.join(out, "warmup"), device) + \
        TRAIN_FLAGS["compile"][False] + TRAIN_FLAGS["fused"][fused] + TRAIN_FLAGS["graphs"][False]
    return runs, warm


def train_rejects(argv):
    """fastcifar.train's one-line complaint about argv, or None when it parses."""
    from fastcifar import train as T
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            T.parse_args(argv)
    except SystemExit:
        return (err.getvalue().strip().splitlines() or ["rejected"])[-1]
    return None


def tta_child(spec):
    from .common import set_all_threads
    from .time_to_accuracy import run_one, summarize_norm
    set_all_threads()
    res = {"runs": []}
    w = run_one(spec["norm"], spec["seeds"][0], spec["warmup"], os.path.join(spec["out"], "warmup"), spec["target"])
    res["warmup"] = {k: w.get(k) for k in ("status", "error", "wall_s")}
    print(f"warm-up: {res['warmup']}", flush=True)
    for seed in spec["seeds"]:
        argv = spec["argv"][str(seed)]
        rec = run_one(spec["norm"], seed, argv, os.path.join(spec["out"], f"s{seed}"), spec["target"])
        if rec.get("traceback"):
            print(rec["traceback"], flush=True)
        res["runs"].append({k: v for k, v in rec.items() if k not in ("traceback", "history")})
        res["summary"] = summarize_norm(res["runs"])
        print(f"seed {seed}: {rec['status']} {rec.get('time_to_target_s')} {rec.get('error') or ''}", flush=True)
        atomic_write_json(spec["result"], res)
    return 0


def part_time_to_target(args, ctx):
    from fastcifar.data import prepare_betons, resolve_source
    if ctx.cuda:
        device, names, seeds = torch.device("cuda"), args.configs, args.seeds or 3
    elif args.cpu_smoke:  # no compile (minutes on a CPU), no graphs (CUDA only), fused only under the interpreter
        device, seeds = torch.device("cpu"), args.seeds or 1
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        names = [c for c, (comp, fused, graphs) in CONFIGS.items()
                 if c in args.configs and not comp and not graphs and (interpret or not fused)]
        args.epochs, args.limit = args.epochs or 1, args.limit or 512
    else:
        return {"status": "skipped", "reason": "no CUDA device (--cpu-smoke runs a tiny eager run on the CPU)"}
    seeds = list(range(args.first_seed, args.first_seed + seeds))
    beton_dir, manifest = prepare_betons(resolve_source(args.data), args.beton_dir)
    ctx.report["dataset"] = dataset_record(manifest, args.limit)
    rec = {"device": device.type, "seeds": seeds, "target": args.target, "epochs": args.epochs, "limit": args.limit,
           "configs": []}
    for norm in args.norm:
        for name in configs_for(norm, names):
            out = os.path.join(ctx.out, "time_to_target", f"{norm}-{name}")
            shutil.rmtree(out, ignore_errors=True)
            runs, warm = train_argvs(args, norm, name, seeds, beton_dir, out, device)
            cfg = {"norm": norm, "config": name, "flags": config_flags(name), "argv": runs[seeds[0]]}
            why = train_rejects(runs[seeds[0]]) or train_rejects(warm)
            if why:
                cfg.update(status="failed", reason=f"fastcifar.train rejects the flags: {why}")
            else:
                print(f"  {norm} {name}: {len(seeds)} seed(s) ...", flush=True)
                spec = {"norm": norm, "seeds": seeds, "argv": {str(s): a for s, a in runs.items()}, "warmup": warm,
                        "out": out, "target": args.target}
                res, rc, secs, log = run_child("tta", spec, ctx.out, f"tta-{norm}-{name}", args.timeout)
                cfg.update(log=log, returncode=rc, wall_s=secs, **(res or {}))
                s = (res or {}).get("summary")
                if s is None or len(res["runs"]) < len(seeds):
                    cfg.update(status="failed", reason=crash_note(rc, log, args.timeout))
                elif s["reached"] < s["runs"]:
                    cfg.update(status="failed",
                               reason="; ".join(f"seed {e['seed']}: {e['error']}" for e in s["errors"]))
                else:
                    cfg.update(status="ok", reason="")
            print(f"  {norm} {name}: {cfg['status']} {cfg['reason']}", flush=True)
            rec["configs"].append(cfg)
            ctx.progress("time_to_target", dict(rec, status="running"))
    bad = [f"{c['norm']} {c['config']}" for c in rec["configs"] if c["status"] != "ok"]
    return dict(rec, status="failed" if bad else "ok",
                reason=f"{len(bad)} of {len(rec['configs'])} configurations failed: {', '.join(bad)}" if bad else
                f"{len(rec['configs'])} configurations, every run reached {100 * args.target:g}%")


PART_FNS = {"tests": part_tests, "kernels": part_kernels, "time_to_target": part_time_to_target}


# ---------------------------------------------------------------- the report

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


def _ms(x):
    return "n/a" if x is None else f"{1e3 * x:.1f}"


def render_kernels(p):
    lines = ["Times in microseconds (median of triton.testing.do_bench, L2 cleared before each call); speed-up = "
             "other / fused. Check: fused against fp32 eager, the worst of y, dx, dw, db relative to max|ref|.", ""]
    rows = []
    for c in p.get("configs", []):
        t = {(r["impl"], r["mode"]): r["ms"] for r in c["rows"]}
        for mode in ("fwd", "fwdbwd"):
            e, k, f = (t.get((i, mode)) for i in ("eager", "compile", "fused"))
            rows.append([c["models"], f"{c['N']}x{c['C']}x{c['H']}x{c['W']}", c["G"], c["format"], c["dtype"], mode,
                         _ms(e), _ms(k), _ms(f), fmt(e / f if e and f else None, 2, "x"),
                         fmt(k / f if k and f else None, 2, "x"),
                         f"{max(c['check']['rel_err'].values()):.1e} {'ok' if c['check']['ok'] else 'FAIL'}"])
    lines.append(markdown_table(["models", "NxCxHxW", "G", "format", "dtype", "mode", "eager us", "compile us",
                                 "fused us", "vs eager", "vs compile", "check"], rows))
    lines += [f"- {e['models']} {e['N']}x{e['C']}x{e['H']}x{e['W']} {e['format']} {e['dtype']}: {e['error']}"
              for e in p.get("errors", [])]
    return lines


def render_time_to_target(p):
    lines = [f"Device {p['device']}, seeds {', '.join(map(str, p['seeds']))}, target {100 * p['target']:g}%"
             + (f", {p['epochs']} epoch(s)" if p.get("epochs") else "") + (f", --limit {p['limit']}" if p.get("limit")
                                                                            else "") + ". Time to target: training "
             "time incl. compile, excl. evaluation; median (min-max) over the runs that reached it. vs eager: the "
             "norm's eager median / this one.", ""]
    eager = {c["norm"]: (c.get("summary") or {}).get("time_to_target_s", {}).get("median")
             for c in p["configs"] if c["config"] == "eager"}
    rows = []
    for c in p["configs"]:
        s = c.get("summary") or {}
        t = s.get("time_to_target_s") or {}
        e = eager.get(c["norm"])
        rows.append([c["norm"], c["config"], f"`{' '.join(c['flags'])}`", f"{s.get('reached', 0)} / {len(p['seeds'])}",
                     f"{fmt(t.get('median'))} ({fmt(t.get('min'))}-{fmt(t.get('max'))})",
                     fmt(s.get("compile_time_s")), fmt(e / t["median"] if e and t.get("median") else None, 2, "x"),
                     c["status"] + (f": {c['reason']}" if c.get("reason") else "")])
    lines.append(markdown_table(["norm", "config", "flags", "reached", "time to target (s)", "compile (s)",
                                 "vs eager", "status"], rows))
    return lines


def _rel(path):
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def render_tests(p):
    c = p.get("counts", {})
    lines = [f"{len(p['tests'])} selected from {', '.join(_rel(f) for f in p['files'])}: "
             f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('error', 0)} errors, "
             f"{c.get('skipped', 0)} skipped.", ""]
    lines.append(markdown_table(["test", "outcome", "message"],
                                [[t["test"], t["outcome"], t["message"].replace("|", "/")] for t in p["tests"]]))
    return lines


RENDER = {"tests": render_tests, "kernels": render_kernels, "time_to_target": render_time_to_target}


def render_markdown(report):
    env, ds = report["environment"], report.get("dataset")
    lines = ["# GPU report", "",
             f"- Command: `{env['command']}`", f"- Date: {env['date']}", f"- Machine: {machine_line(env)}"
             + ("" if report["cuda"] else " -- **no CUDA device**: the GPU parts were skipped"),
             f"- Versions: torch {env['torch']} (CUDA build {env['torch_cuda_build']}, cuDNN {env['cudnn']}), "
             f"triton {env['triton']}, ffcv {env['ffcv']}, python {env['python']}"
             + (f"; {env.get('gpu_capability')}, {env.get('gpu_memory_gib')} GiB, driver {env.get('driver')}"
                if report["cuda"] else ""),
             f"- Code: git {env.get('git_commit') or 'unknown'}"
             + (" (with uncommitted changes)" if env.get("git_dirty") else ""),
             f"- Dataset: {dataset_line(ds) if ds else 'not used (time_to_target did not run)'}",
             f"- State: {report['state']}", "",
             markdown_table(["part", "status", "what happened"],
                            [[n, p["status"], p.get("reason", "")] for n, p in report["parts"].items()])]
    for name, p in report["parts"].items():
        lines += ["", f"## {name}: {p['status']}", "", p.get("reason", "")]
        if p.get("traceback"):
            lines += ["", "```", p["traceback"].rstrip(), "```"]
        with contextlib.suppress(KeyError, TypeError):  # a part that died early has no details to show
            detail = RENDER[name](p) if (p.get("tests") or p.get("configs")) else []
            lines += [""] + detail if detail else []
    return "\n".join(lines) + "\n"


class Context:
    def __init__(self, out, cuda, report):
        self.out, self.cuda, self.report = out, cuda, report

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


# ---------------------------------------------------------------- entry points

def parse_args(argv=None):
    from fastcifar.models import NORMS
    from fastcifar.train import PRESETS
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for report.md, report.json, logs and runs")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="default: all")
    p.add_argument("--data", help="CIFAR-10 source or beton folder for time_to_target (default: $FASTCIFAR_DATA, "
                                  "else the official download)")
    p.add_argument("--beton-dir", help="where converted betons are cached (default: fastcifar's cache)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one process may run before it is killed "
                                                             "and recorded as failed (default 1800)")
    p.add_argument("--test-paths", nargs="+", help="test files to select CUDA tests from (default: every "
                                                   "tests/test_*.py that mentions CUDA)")
    p.add_argument("--kernel-batch", type=int, nargs="+", default=[512], help="batch sizes to time (default 512)")
    p.add_argument("--kernel-dtypes", nargs="+", choices=sorted(KERNEL_TOL), default=["fp32", "bf16"])
    p.add_argument("--kernel-formats", nargs="+", choices=["nchw", "cl"], default=["nchw", "cl"])
    p.add_argument("--norm", nargs="+", choices=NORMS, default=list(NORMS), help="time_to_target norms (default all)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
                   help=f"time_to_target configurations: {', '.join(CONFIGS)} (default all; the fused ones run "
                        "for gn and ln only)")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default 3; 1 with --cpu-smoke)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.70, help="test accuracy to reach (default 0.70)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="training preset (default: the trainer's)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's; 1 with --cpu-smoke)")
    p.add_argument("--limit", type=int, help="train and test on N images (default: all; 512 with --cpu-smoke)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="train with --amp (default on)")
    p.add_argument("--train-args", default="", metavar="'ARGS'",
                   help="more flags for every training run, as --train-args='--batch-size 512' (with '=')")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="without CUDA, run time_to_target tiny on the CPU instead of skipping: eager and unfused "
                        "(fused too when TRITON_INTERPRET=1 is set)")
    args = p.parse_args(argv)
    if args.data and not os.path.exists(args.data):
        p.error(f"--data {args.data}: no such file or folder")
    if min(args.kernel_batch) < 1 or args.timeout < 1 or (args.seeds is not None and args.seeds < 1) or \
            (args.epochs is not None and args.epochs < 1) or (args.limit is not None and args.limit < 1):
        p.error("--kernel-batch, --timeout, --seeds, --epochs and --limit must be at least 1")
    if not 0 < args.target <= 1:
        p.error("--target is a fraction in (0, 1]")
    # children run from the repository root: paths must not depend on the caller's folder
    args.test_paths = [os.path.abspath(t) for t in args.test_paths or []] or None
    args.data, args.beton_dir = (os.path.abspath(x) if x else x for x in (args.data, args.beton_dir))
    args.parts = [x for x in PARTS if x in args.parts]
    args.norm, args.configs = list(dict.fromkeys(args.norm)), list(dict.fromkeys(args.configs))
    return args


def child_main(kind, spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    return {"kernels": kernels_child, "tta": tta_child}[kind](spec)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD]:
        return child_main(*argv[1:3])
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    cuda = torch.cuda.is_available()
    report = {"benchmark": "gpu_report", "state": "running", "cuda": cuda,
              "environment": environment_record(cuda, argv), "dataset": None, "settings": dict(vars(args)), "parts": {}}
    ctx = Context(out, cuda, report)
    print(f"{PROG}: {machine_line(report['environment'])}" + ("" if cuda else "; no CUDA device"), flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
