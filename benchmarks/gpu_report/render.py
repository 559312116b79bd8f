"""report.md from report.json: the header, one table of the parts, then each part's own details."""
import contextlib
import os

from ..common import ROOT, dataset_line, fmt, markdown_table, report_header


def us(x):
    """Microseconds as the tables show them."""
    return "n/a" if x is None else f"{x:.1f}"


def ratio(a, b):
    return fmt(a / b if a and b else None, 2, "x")


def render_tests(p):
    c = p.get("counts", {})
    rel = lambda f: os.path.relpath(f, ROOT) if f.startswith(ROOT + os.sep) else f  # noqa: E731
    counts = ", ".join(f"{n} {k}" for k, n in c.items())
    lines = [f"{len(p['tests'])} selected from {', '.join(rel(f) for f in p['files'])}: {counts}.", ""]
    lines.append(markdown_table(["test", "outcome", "message"],
                                [[t["test"], t["outcome"], t["message"].replace("|", "/")] for t in p["tests"]]))
    return lines


def render_kernels(p):
    lines = ["Times in microseconds (" + ("--cpu-smoke: one call, on the CPU's Triton interpreter; not a result"
                                          if p.get("smoke") else "median GPU time of 100 calls from CUDA events, "
                                          "inputs cycled past the L2 cache") + "); speed-up = other / fused. Check: "
             "verify_kernel(strict=True), then fused against fp32 eager, the worst of y, dx, dw, db relative to "
             "max|ref|; a configuration that fails it is not timed.", ""]
    rows = []
    for c in p.get("configs", []):
        shape = [c["models"], f"{c['N']}x{c['C']}x{c['H']}x{c['W']}", c["G"], c["format"], c["dtype"]]
        if "error" in c:
            rows.append(shape + ["-", "n/a", "n/a", "n/a", "n/a", "n/a", f"FAILED: {c['error']}".replace("|", "/")])
            continue
        t = {(r["impl"], r["mode"]): r["us"] for r in c["rows"]}
        check = f"{max(c['check']['rel_err'].values()):.1e} {'ok' if c['check']['ok'] else 'FAILED: not timed'}"
        for mode in ("fwd", "fwdbwd") if c["rows"] else ("-",):
            e, k, f = (t.get((i, mode)) for i in ("eager", "compile", "fused"))
            rows.append(shape + [mode, us(e), us(k), us(f), ratio(e, f), ratio(k, f), check])
    lines.append(markdown_table(["models", "NxCxHxW", "G", "format", "dtype", "mode", "eager us", "compile us",
                                 "fused us", "vs eager", "vs compile", "check"], rows))
    return lines


def render_time_to_target(p):
    lines = [f"Device {p['device']}, seeds {', '.join(map(str, p['seeds']))}, target {100 * p['target']:g}%"
             + (f", {p['epochs']} epoch(s)" if p.get("epochs") else "") + (f", limit {p['limit']}" if p.get("limit")
                                                                            else "")
             + (" (--cpu-smoke: a toy subset; no time or accuracy here is a result)" if p.get("smoke") else "")
             + ". Every run: a fresh process with empty compile caches, after an untimed warm-up. Time to target: "
             "training time incl. a cold compile, excl. evaluation; steps: optimizer steps by then; median (min-max) "
             "over the runs that reached it. vs eager: the norm's eager median / this one.", ""]
    eager = {c["norm"]: (c.get("summary") or {}).get("time_to_target_s", {}).get("median")
             for c in p["configs"] if c["config"] == "eager"}
    rows = []
    for c in p["configs"]:
        s = c.get("summary") or {}
        t = s.get("time_to_target_s") or {}
        rows.append([c["norm"], c["config"], f"`{c['settings']}`", f"{s.get('reached', 0)} / {len(p['seeds'])}",
                     f"{fmt(t.get('median'))} ({fmt(t.get('min'))}-{fmt(t.get('max'))})",
                     fmt((s.get("steps_to_target") or {}).get("median"), 0), fmt(s.get("compile_time_s")),
                     ratio(eager.get(c["norm"]), t.get("median")),
                     c["status"] + (f": {c['reason']}" if c.get("reason") else "")])
    lines.append(markdown_table(["norm", "config", "settings", "reached", "time to target (s)", "steps to target",
                                 "compile (s)", "vs eager", "status"], rows))
    return lines


RENDER = {"tests": render_tests, "kernels": render_kernels, "time_to_target": render_time_to_target}


def render_markdown(report):
    env, ds = report["environment"], report.get("dataset")
    gpu = f"GPU: {env.get('gpu_capability')}, {env.get('gpu_memory_gib')} GiB, driver {env.get('driver')}"
    note = " -- --cpu-smoke: every part ran on the CPU at a toy size" if report.get("smoke") else \
        "" if report["cuda"] else " -- **no CUDA device**: the GPU parts were skipped"
    lines = [*report_header("GPU report", env, *([gpu] if report["cuda"] else []),
                            f"Dataset: {dataset_line(ds) if ds else 'not used (time_to_target did not run)'}",
                            f"State: {report['state']}", machine_note=note), "",
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
