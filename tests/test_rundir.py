"""Run folders: a fresh folder per run, one live run per folder, a finished run never replaced unasked, and
runs/latest pointing at the newest. The concurrent cases run real processes: flock is per open file, and a
killed process's lock must be the kernel's to drop."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from fastcifar.device import ConfigError
from fastcifar.rundir import LOCK, RunDirError, claim, new_run_dir, point_latest

# claims OUT, prints CLAIMED (or the one-line error), then holds the folder until stdin closes or it is killed
HOLDER = r"""
import sys
from fastcifar.rundir import RunDirError, claim
try:
    with claim(sys.argv[1], resume="--resume" in sys.argv):
        print("CLAIMED", flush=True)
        sys.stdin.read()
except RunDirError as e:
    print("REFUSED", e, flush=True)
"""


def spawn(out, *flags):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", HOLDER, out, *flags], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def holder(out, *flags):
    p = spawn(out, *flags)
    return p, p.stdout.readline().strip()


def one_line(e):
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_new_run_dirs_are_fresh_and_never_shared(tmp_path):
    root = str(tmp_path / "runs")
    paths = [new_run_dir(root, "gn-best") for _ in range(3)]
    assert len(set(paths)) == 3 and all(os.path.isdir(p) and not os.listdir(p) for p in paths)
    stamp = os.path.basename(paths[0])
    assert stamp.startswith("gn-best-") and len(stamp) == len("gn-best-YYYYmmdd-HHMMSS"), stamp
    # within one second the names are stamp, stamp-2, stamp-3 (or a new second's stamp)
    for p in paths[1:]:
        name = os.path.basename(p)
        assert name.startswith("gn-best-") and (name.rsplit("-", 1)[-1] in ("2", "3") or len(name) == len(stamp))


def test_a_taken_name_gets_a_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261201-120000")
    root = tmp_path / "runs"
    (root / "bn-fast-20261201-120000").mkdir(parents=True)
    (root / "bn-fast-20261201-120000-2").mkdir()
    assert new_run_dir(str(root), "bn-fast") == str(root / "bn-fast-20261201-120000-3")


def test_runs_root_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="cannot create the runs folder") as e:
        new_run_dir(str(tmp_path / "file" / "runs"), "bn-fast")
    one_line(e)
    assert issubclass(RunDirError, ConfigError)


def test_claim_creates_locks_and_releases(tmp_path):
    out = str(tmp_path / "a" / "out")
    with claim(out) as got:
        assert got == out and os.path.isfile(os.path.join(out, LOCK))
        pid, host = open(os.path.join(out, LOCK)).read().split()
        assert int(pid) == os.getpid()
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {os.getpid()} on "):
            with claim(out):  # a second open file: flock refuses it even within one process
                pass
    with claim(out):  # released on exit
        pass


def test_a_second_live_run_is_refused_at_once_naming_the_holder(tmp_path):
    out = str(tmp_path / "out")
    p, line = holder(out)
    try:
        assert line == "CLAIMED", p.stderr.read()
        def waited(*_):  # a blocking claim would wait for as long as the holder lives: here, for ever
            raise AssertionError("the second claim waited for the first instead of refusing")
        signal.signal(signal.SIGALRM, waited)
        signal.alarm(60)
        try:
            with pytest.raises(RunDirError) as e:
                with claim(out):
                    pytest.fail("two runs held one folder")
        finally:
            signal.alarm(0)
        msg = one_line(e)
        assert msg == f"{out} is in use by another run (pid {p.pid} on {os.uname().nodename}); wait for it to " \
                      "finish or choose another --out", msg
        q, line = holder(out, "--resume")  # resuming a folder a live run holds is refused too
        q.communicate(timeout=60)
        assert line.startswith("REFUSED") and f"pid {p.pid}" in line, line
    finally:
        p.communicate(timeout=60)
    with claim(out):  # the holder exited: free again
        pass


def test_a_killed_runs_lock_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    p, line = holder(out)
    assert line == "CLAIMED", p.stderr.read()
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert open(os.path.join(out, LOCK)).read().split()[0] == str(p.pid), "the dead holder's lock file is left"
    with claim(out):
        assert open(os.path.join(out, LOCK)).read().split()[0] == str(os.getpid())


def test_two_processes_claiming_at_once_one_wins(tmp_path):
    out = str(tmp_path / "out")
    procs = [spawn(out) for _ in range(2)]
    try:
        lines = sorted(p.stdout.readline().strip() for p in procs)
        assert lines[0] == "CLAIMED" and lines[1].startswith("REFUSED ") and "in use by another run" in lines[1], lines
    finally:
        for p in procs:
            p.communicate(timeout=60)


@pytest.mark.parametrize("left", ["metrics.json", "model.pt"])
def test_a_folder_holding_a_run_is_refused_unless_asked(tmp_path, left):
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, left), "w").write("{}")
    with pytest.raises(RunDirError) as e:
        with claim(out):
            pytest.fail("a finished run would be overwritten")
    assert one_line(e) == (f"{out} already holds a run ({left}); continue it with --resume {out}, replace it "
                           "with --overwrite, or choose another --out")
    assert os.listdir(out) == [left] or sorted(os.listdir(out)) == sorted([left, LOCK])
    with claim(out, resume=True):
        pass
    with claim(out, overwrite=True):
        pass


def test_an_interrupted_first_run_leaves_a_reusable_folder(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        with claim(out):
            raise KeyboardInterrupt
    with claim(out):  # nothing was saved yet: the folder is free to start again
        pass


def test_latest_points_at_the_newest_run(tmp_path):
    root = str(tmp_path / "runs")
    a, b = new_run_dir(root, "bn-fast"), new_run_dir(root, "bn-fast")
    latest = os.path.join(root, "latest")
    assert point_latest(root, a) and os.readlink(latest) == os.path.basename(a)
    assert point_latest(root, b) and os.readlink(latest) == os.path.basename(b)
    assert os.path.samefile(latest, b) and os.path.isdir(a), "the previous run is kept"
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    moved = str(tmp_path / "moved")  # relative: the runs folder can be moved or mounted elsewhere
    os.rename(root, moved)
    assert os.path.samefile(os.path.join(moved, "latest"), os.path.join(moved, os.path.basename(b)))


def test_an_old_latest_folder_is_left_alone(tmp_path):
    root = tmp_path / "runs"
    (root / "latest").mkdir(parents=True)
    (root / "latest" / "metrics.json").write_text("{}")
    new = new_run_dir(str(root), "gn-fast")
    assert point_latest(str(root), new) is False
    assert (root / "latest").is_dir() and not (root / "latest").is_symlink()
    assert (root / "latest" / "metrics.json").read_text() == "{}"
