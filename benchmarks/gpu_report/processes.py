"""Child processes: each part's work runs in one, so that a crash or a hang fails that part (or that run) and the
report goes on. A child gets a JSON spec and writes its result as JSON; its output goes to a log.

    python -m benchmarks.gpu_report.processes KIND SPEC.json    # what run_child starts
"""
import contextlib
import importlib
import os
import subprocess
import sys
import time

from ..common import ROOT, atomic_write_json, read_json

CHILDREN = {"kernels": "benchmarks.gpu_report.kernels_part",
            "time_to_target": "benchmarks.gpu_report.time_to_target_part"}


def run_logged(cmd, log_path, timeout, env=None):
    """Run cmd from the repository root with its output in log_path and `env` added to this process's
    environment; (returncode or 'timeout', seconds)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", **(env or {}))
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


def read_log(path):
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return f.read()
    return ""


def log_tail(path, lines=15):
    return "\n".join(read_log(path).splitlines()[-lines:])


def crash_note(rc, log, timeout):
    if rc == "timeout":
        return f"killed after the {timeout} s timeout (log: {log})"
    return f"exited with status {rc} (log: {log}): {log_tail(log, 1)}"


def fresh_caches(folder):
    """Environment for a child whose compiles must be cold: inductor's and Triton's on-disk caches, empty, in
    folder (the in-memory ones start empty with the process)."""
    return {"TORCHINDUCTOR_CACHE_DIR": os.path.join(folder, "inductor"),
            "TRITON_CACHE_DIR": os.path.join(folder, "triton")}


def run_child(kind, spec, out, name, timeout, env=None):
    """Run the `kind` child on spec; (its result JSON or None, returncode, seconds, log path)."""
    spec = dict(spec, result=os.path.join(out, "logs", f"{name}.result.json"))
    spec_path = os.path.join(out, "logs", f"{name}.spec.json")
    os.makedirs(os.path.dirname(spec_path), exist_ok=True)
    atomic_write_json(spec_path, spec)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spec["result"])  # a result left by an earlier report must not pass for this one's
    log = os.path.join(out, "logs", f"{name}.log")
    rc, secs = run_logged([sys.executable, "-m", "benchmarks.gpu_report.processes", kind, spec_path], log, timeout,
                          env)
    return read_json(spec["result"]), rc, secs, log


def child_main(kind, spec_path):
    return importlib.import_module(CHILDREN[kind]).child(read_json(spec_path))


if __name__ == "__main__":
    sys.exit(child_main(*sys.argv[1:3]))
