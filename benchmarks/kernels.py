"""Microbenchmark: fused GroupNorm+ReLU (fastcifar_kernels) against eager F.group_norm + F.relu and
against torch.compile of that same pair, forward and forward+backward.

    python -m benchmarks.kernels                       # all 30 model shapes, batch 512 and 2048
    python -m benchmarks.kernels --batch 512 --dtypes bf16 --formats cl --no-compile
    python -m benchmarks.kernels --bytes               # the byte-count table only (no GPU needed)

Shapes: the input of every nn.GroupNorm in the project's gn and ln models (forward hooks; 30 distinct
(C, H, W, G) over every layout), at each --batch, in NCHW and channels_last, fp32/fp16/bf16 (weight and bias in
the same dtype). Each configuration is first checked (verify_kernel(strict=True), then the fused forward and
gradients against fp32 eager) and timed only when the check passes; a failed check is listed, never timed,
and makes the exit status 1.

Timing: CUDA events around each call, median over --repeats. The GPU queue is first filled with a
sleep kernel so the launches run back to back and the events time the GPU work, not Python launch
overhead (that is reported separately as wall_us: a plain loop's wall time per call). Several
distinct inputs (together more than 3x the L2 cache) are cycled so no call finds its data in L2.

Effective bandwidth counts each tensor once: fwd reads x and writes y (plus w, b); fwd+bwd adds a
read of x, a read of dy and a write of dx (plus dw, db). It is printed next to the measured
device-to-device copy bandwidth (a large tensor copy, read + write).

Without CUDA this prints that nothing was timed, writes {"skipped": true, "reason": ...}, exits 0.
"""
import argparse
import math
import os
import statistics
import sys
import time
import traceback

import fastcifar_kernels
import torch
import torch.nn.functional as F

from .common import atomic_write_json, module_version, rel_err

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
MODES = ("fwd", "fwdbwd")
EPS = 1e-5
KERNEL_TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}  # max|fused - fp32 eager| / max|fp32 eager|
TARGETS = {
    "fwdbwd_speedup_vs_eager": 2.0,       # fused fwd+bwd at least 2x faster than eager
    "speedup_vs_compile": 1.0,            # no slower than torch.compile, every model shape
    "copy_bw_fraction_at_largest_batch": 0.70,
}


def model_norm_shapes():
    """[(C, H, W, G, "gn"/"ln"/"gn+ln")]: every group norm the project's gn and ln models run, both layouts."""
    from fastcifar.models import ARCHS, make_model
    found = {}
    for norm, arch in [(n, a) for n in ("gn", "ln") for a in ARCHS]:
        for s in fastcifar_kernels.norm_shapes(make_model(norm, arch), (2, 3, 32, 32)):
            found.setdefault(s[1:], set()).add(norm)
    return [(*s, "+".join(sorted(v))) for s, v in sorted(found.items())]


def bytes_moved(n, c, h, w, elt, mode, affine=True):
    """Bytes that must cross DRAM at least once (mean/rstd, 8*N*G bytes, are left out)."""
    act = n * c * h * w * elt
    par = c * elt if affine else 0
    fwd = 2 * act + 2 * par              # read x, write y; read w, b
    if mode == "fwd":
        return fwd
    return fwd + 3 * act + 2 * par       # read x, read dy, write dx; write dw, db


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _sleep_then(calls, sleep_ms=10.0):
    # busy-wait on the GPU while Python enqueues the calls, so they run back to back
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(int(sleep_ms * 1e-3 * _clock_hz()))
    calls()


_CLOCK = []


def _clock_hz():
    if not _CLOCK:
        try:
            _CLOCK.append(torch.cuda.get_device_properties(0).clock_rate * 1e3)  # kHz -> Hz
        except Exception:  # noqa: BLE001 - property missing in some builds
            _CLOCK.append(2e9)
    return _CLOCK[0]


def time_gpu(fn, n_inputs, repeats, warmup, chunk=20):
    """Median GPU microseconds per call of fn(i), cycling i over n_inputs."""
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    times, i = [], 0
    while len(times) < repeats:
        k = min(chunk, repeats - len(times))
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(k)]

        def calls():
            nonlocal i
            for s, e in ev:
                s.record()
                fn(i % n_inputs)
                e.record()
                i += 1
        _sleep_then(calls)
        torch.cuda.synchronize()
        times += [s.elapsed_time(e) * 1e3 for s, e in ev]
    return statistics.median(times)


def time_wall(fn, n_inputs, repeats):
    """Wall microseconds per call in a plain loop (includes Python and launch overhead)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(repeats):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e6


def copy_bandwidth(repeats=20):
    """Device copy GB/s (bytes read + bytes written), on a 1 GiB tensor."""
    n = (1 << 30) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    us = time_gpu(lambda i: dst.copy_(src), 1, repeats, 3, chunk=5)
    src = dst = None  # free the 2 GiB before the kernels are timed
    torch.cuda.empty_cache()
    return 2 * n * 4 / (us * 1e-6) / 1e9


# ------------------------------------------------------------------------------------------------
# one configuration: checked, then timed
# ------------------------------------------------------------------------------------------------
def eager_pair(x, g, w, b):
    return F.relu(F.group_norm(x, g, w, b, EPS))


def time_once(run, n_inputs):
    """A trivial timer (one call, wall clock): for exercising the code on a CPU, not for results."""
    t = time.perf_counter()
    run(0)
    return (time.perf_counter() - t) * 1e6


def gpu_timers(repeats, warmup):
    """{column: timer}: GPU time from CUDA events, and a plain loop's wall time (Python and launch overhead)."""
    return {"us": lambda run, n: time_gpu(run, n, repeats, warmup),
            "wall_us": lambda run, n: time_wall(run, n, max(10, repeats // 2))}


def time_config(fk, shape, dtype_name, fmt_name, modes, impls, device, timers, l2_bytes=0, compile_backend="inductor"):
    """(rows, check) for one (N, C, H, W, G): the fused kernel checked, then timed beside eager and compile.

    First verify_kernel(strict=True) for this dtype and format (a RuntimeError: the caller records a failed
    configuration), then the fused forward and all three gradients against fp32 eager. Only a configuration
    whose check passes is timed (rows is empty otherwise): a fused timing is always of a checked kernel.
    timers: {column: timer(run, n_inputs) -> microseconds}, where run(i) makes one call on input i; inputs are
    cycled, together more than 3x l2_bytes, so that no call finds its data in L2.
    """
    n, c, h, w_, g = shape
    dtype, fmt = DTYPES[dtype_name], FORMATS[fmt_name]
    fk.verify_kernel(device, dtype, channels_last=fmt_name == "cl", strict=True)
    elt = torch.empty((), dtype=dtype).element_size()
    n_inputs = int(min(16, max(2, math.ceil(3 * l2_bytes / (2 * n * c * h * w_ * elt)))))
    xs = [torch.randn(n, c, h, w_, device=device, dtype=dtype).to(memory_format=fmt) for _ in range(n_inputs)]
    dys = [torch.randn_like(x) for x in xs]
    weight = (1 + 0.2 * torch.randn(c, device=device)).to(dtype)
    bias = (0.05 * torch.randn(c, device=device)).to(dtype)
    if not fk.fused_available(xs[0]):  # group_norm_relu would quietly time the torch path as "fused"
        raise RuntimeError(f"the fused kernel does not run for {device} {dtype_name} {fmt_name} here")
    fns = {"eager": lambda x, w, b: eager_pair(x, g, w, b),
           "fused": lambda x, w, b: fk.group_norm_relu(x, g, w, b, EPS)}
    if "compile" in impls:
        torch._dynamo.reset()  # a fresh compile per configuration: no recompile limit to run into
        fns["compile"] = torch.compile(fns["eager"], dynamic=False, backend=compile_backend)

    def grads(fn, *inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        y = fn(*leaves)
        return [y, *torch.autograd.grad(y, leaves, dys[0].to(y.dtype))]
    ref = grads(fns["eager"], xs[0].float(), weight.float(), bias.float())
    got = grads(fns["fused"], xs[0], weight, bias)
    errs = dict(zip(("y", "dx", "dw", "db"), (rel_err(a, b) for a, b in zip(got, ref))))
    keeps = got[0].is_contiguous(memory_format=fmt)
    check = {"rel_err": errs, "tol": KERNEL_TOL[dtype_name], "keeps_format": keeps,
             "ok": max(errs.values()) <= KERNEL_TOL[dtype_name] and keeps}
    if not check["ok"]:
        return [], check
    xg = [x.detach().requires_grad_() for x in xs]
    wg, bg = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    rows = []
    for impl in impls:
        f = fns[impl]
        for mode in modes:
            if mode == "fwd":
                def run(i, f=f):
                    with torch.no_grad():
                        f(xs[i], weight, bias)
            else:
                def run(i, f=f):
                    torch.autograd.grad(f(xg[i], wg, bg), (xg[i], wg, bg), dys[i])
            row = {"impl": impl, "mode": mode, **{k: t(run, n_inputs) for k, t in timers.items()},
                   "bytes": bytes_moved(n, c, h, w_, elt, mode), "inputs_cycled": n_inputs}
            rows.append(dict(row, gbps=row["bytes"] / (row["us"] * 1e-6) / 1e9 if row["us"] > 0 else None))
    return rows, check


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def print_bytes_table(shapes, batches, dtypes):
    print(f"{'models':6} {'C':>4} {'HxW':>7} {'G':>3} {'batch':>6} {'dtype':>5} {'fwd MB':>9} {'fwd+bwd MB':>11}")
    for c, h, w, g, tag in shapes:
        for n in batches:
            for dn in dtypes:
                elt = torch.empty((), dtype=DTYPES[dn]).element_size()
                print(f"{tag:6} {c:>4} {f'{h}x{w}':>7} {g:>3} {n:>6} {dn:>5} "
                      f"{bytes_moved(n, c, h, w, elt, 'fwd') / 1e6:>9.2f} "
                      f"{bytes_moved(n, c, h, w, elt, 'fwdbwd') / 1e6:>11.2f}")


KEY = ("C", "H", "W", "G", "N", "format", "dtype", "mode")


def by_impl(rows):
    """{(C, H, W, G, N, format, dtype, mode): {impl: row}}."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in KEY), {})[r["impl"]] = r
    return groups


def summarize(rows, copy_gbps, largest_batch):
    """Per configuration: fused speedups and the three targets, pass/fail."""
    out = []
    verdict = {"fwdbwd_2x_vs_eager": None, "no_slower_than_compile": None, "bw_70pct_at_largest_batch": None}

    def record(name, ok):  # None: not measured in this run
        verdict[name] = ok if verdict[name] is None else (verdict[name] and ok)

    for key, by in by_impl(rows).items():
        if "fused" not in by:
            continue
        s = dict(zip(KEY, key))
        f = by["fused"]
        s["fused_us"], s["fused_gbps"] = f["us"], f["gbps"]
        s["fused_copy_fraction"] = f["gbps"] / copy_gbps
        if "eager" in by:
            s["speedup_vs_eager"] = by["eager"]["us"] / f["us"]
            if s["mode"] == "fwdbwd":
                record("fwdbwd_2x_vs_eager", s["speedup_vs_eager"] >= TARGETS["fwdbwd_speedup_vs_eager"])
        if "compile" in by:
            s["speedup_vs_compile"] = by["compile"]["us"] / f["us"]
            record("no_slower_than_compile", s["speedup_vs_compile"] >= TARGETS["speedup_vs_compile"])
        if s["N"] == largest_batch:
            record("bw_70pct_at_largest_batch",
                   s["fused_copy_fraction"] >= TARGETS["copy_bw_fraction_at_largest_batch"])
        out.append(s)
    return out, verdict


def print_table(rows, copy_gbps):
    print(f"\ncopy bandwidth: {copy_gbps:.0f} GB/s (read + write, 1 GiB tensor)\n")
    hdr = (f"{'C':>3} {'HxW':>5} {'G':>2} {'batch':>5} {'fmt':>4} {'dtype':>4} {'mode':>6} | {'eager us':>8} "
           f"{'compile us':>10} {'fused us':>8} | {'fused GB/s':>10} {'%copy':>5} | {'x eager':>7} {'x comp':>6}"
           f" | {'fused wall us':>13}")
    print(hdr)
    print("-" * len(hdr))
    for key, by in by_impl(rows).items():
        c, h, w, g, n, fmt, dt, mode = key
        t = {k: by[k]["us"] if k in by else float("nan") for k in ("eager", "compile", "fused")}
        f = by.get("fused", {})
        print(f"{c:>3} {f'{h}x{w}':>5} {g:>2} {n:>5} {fmt:>4} {dt:>4} {mode:>6} | {t['eager']:>8.1f} "
              f"{t['compile']:>10.1f} {t['fused']:>8.1f} | {f.get('gbps', float('nan')):>10.0f} "
              f"{100 * f.get('gbps', float('nan')) / copy_gbps:>5.0f} | {t['eager'] / t['fused']:>7.2f} "
              f"{t['compile'] / t['fused']:>6.2f} | {f.get('wall_us', float('nan')):>13.1f}")


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[512, 2048], help="batch sizes (default 512 2048)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS),
                   help="memory formats: nchw (contiguous) and/or cl (channels_last)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=100, help="timed calls per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (saves compile time)")
    p.add_argument("--out", default=os.path.join("results", "kernels"), help="folder for kernels.json")
    p.add_argument("--bytes", action="store_true", help="print the byte counts per shape and exit (no GPU needed)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.batch) < 1:
        p.error("--repeats and --batch must be positive, --warmup non-negative")
    return args


def time_configs(fk, shapes, batches, formats, dtypes, modes, impls, device, timers, l2_bytes=0,
                 compile_backend="inductor", on_config=None):
    """A record per (shape, batch, format, dtype): {models, N, C, H, W, G, format, dtype} with the rows and the
    check of time_config, or with the error it raised (one that breaks does not hide the others).
    on_config(records) is called after each."""
    records = []
    for c, h, w, g, models in shapes:
        for n in batches:
            for fmt in formats:
                for dt in dtypes:
                    key = {"models": models, "N": n, "C": c, "H": h, "W": w, "G": g, "format": fmt, "dtype": dt}
                    print(f"timing {models} {n}x{c}x{h}x{w} G={g} {fmt} {dt} ...", flush=True)
                    try:
                        rows, check = time_config(fk, (n, c, h, w, g), dt, fmt, modes, impls, device, timers,
                                                  l2_bytes, compile_backend)
                        records.append(dict(key, rows=rows, check=check))
                    except Exception as e:  # noqa: BLE001  one configuration that breaks must not hide the others
                        traceback.print_exc()
                        first = str(e).splitlines()[0] if str(e) else ""
                        records.append(dict(key, error=f"{type(e).__name__}: {first}"))
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()  # this configuration's inputs are gone; keep peak memory low
                    if on_config:
                        on_config(records)
    return records


def failures(records):
    """One line per configuration that raised or whose fused result disagreed with fp32 eager."""
    def name(r):
        return f"{r['models']} {r['N']}x{r['C']}x{r['H']}x{r['W']} G={r['G']} {r['format']} {r['dtype']}"
    return [f"{name(r)}: {r['error']}" for r in records if "error" in r] + \
        [f"{name(r)}: max relative error {max(r['check']['rel_err'].values()):.2e} against fp32 eager (tolerance "
         f"{r['check']['tol']:g})" + ("" if r["check"]["keeps_format"] else ", output in another memory format")
         for r in records if "check" in r and not r["check"]["ok"]]


def main(argv=None):
    args = parse_args(argv)
    shapes = model_norm_shapes()
    if args.bytes:
        print_bytes_table(shapes, args.batch, args.dtypes)
        return 0
    out_path = os.path.join(args.out, "kernels.json")
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        reason = "no CUDA device is available (torch.cuda.is_available() is False)"
        print(f"{reason}; nothing was timed. Wrote {out_path}")
        atomic_write_json(out_path, {"skipped": True, "reason": reason})
        return 0
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    copy_gbps = copy_bandwidth()
    impls = ["eager", "fused"] + ([] if args.no_compile else ["compile"])
    records = time_configs(fastcifar_kernels, shapes, args.batch, args.formats, args.dtypes, args.modes, impls,
                           "cuda", gpu_timers(args.repeats, args.warmup), l2)
    rows = [dict({k: r[k] for k in ("models", "N", "C", "H", "W", "G", "format", "dtype")}, **row)
            for r in records for row in r.get("rows", [])]
    print_table(rows, copy_gbps)
    summary, verdict = summarize(rows, copy_gbps, max(args.batch))
    word = {True: "met", False: "NOT met", None: "not measured"}
    print("\ntargets:", ", ".join(f"{k}: {word[v]}" for k, v in verdict.items()))
    failed = failures(records)
    for line in failed:
        print(f"FAILED {line}")
    atomic_write_json(out_path, {
        "skipped": False, "device": props.name, "torch": torch.__version__, "triton": module_version("triton"),
        "kernel_status": fastcifar_kernels.kernel_status(), "copy_gbps": copy_gbps, "l2_bytes": l2,
        "settings": vars(args), "targets": TARGETS, "targets_met": verdict, "summary": summary, "rows": rows,
        "failed": failed})
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
