"""The tests part: the CUDA test subset in a pytest process of its own, pass/fail per test from its junit XML;
with --cpu-smoke, that subset collected, not run."""
import contextlib
import os
import re
import sys
import xml.etree.ElementTree as ET

from ..common import ROOT
from .processes import crash_note, read_log, run_logged

PLUGIN = "benchmarks.gpu_report.plugin"
NODE_ID = re.compile(r"^(\S+\.py::\S+)$")


def cuda_test_files():
    """Test modules that mention CUDA at all: the rest cannot hold a CUDA test, and need not be collected."""
    folder = os.path.join(ROOT, "tests")
    found = []
    for f in sorted(f for f in os.listdir(folder) if f.startswith("test_") and f.endswith(".py")):
        with open(os.path.join(folder, f), errors="replace") as fh:
            if "cuda" in fh.read().lower():
                found.append(os.path.join(folder, f))
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


def pytest_cmd(files, *opts):
    return [sys.executable, "-m", "pytest", "-p", PLUGIN, "-p", "no:cacheprovider", *opts, *files]


def collect(args, ctx, files):
    """--cpu-smoke: collect the CUDA tests without running them; a module that cannot be imported fails here."""
    cmd = pytest_cmd(files, "-q", "--collect-only")
    log = os.path.join(ctx.out, "logs", "tests.log")
    rc, secs = run_logged(cmd, log, args.timeout)
    tests = [{"test": m.group(1), "outcome": "collected", "time_s": 0.0, "message": ""}
             for m in map(NODE_ID.match, read_log(log).splitlines()) if m]
    rec = {"command": " ".join(cmd), "files": files, "log": log, "returncode": rc, "wall_s": secs, "tests": tests,
           "counts": {"collected": len(tests)}}
    if rc != 0 or not tests:
        return dict(rec, status="failed",
                    reason=f"collecting the CUDA tests: pytest {crash_note(rc, log, args.timeout)}")
    return dict(rec, status="ok", reason=f"{len(tests)} CUDA tests collected, not run (--cpu-smoke)")


def run(args, ctx):
    files = args.test_paths or cuda_test_files()
    if not files:
        return {"status": "skipped", "reason": "no test module mentions CUDA"}
    if ctx.smoke:
        return collect(args, ctx, files)
    junit = os.path.join(ctx.out, "tests", "junit.xml")
    os.makedirs(os.path.dirname(junit), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(junit)
    cmd = pytest_cmd(files, "-q", "-rA", f"--junitxml={junit}")
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
