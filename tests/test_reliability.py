"""Reliability: killed runs, full disks, concurrent conversions and hostile input.

Training and conversion run as real subprocesses (`python -m fastcifar.train` / `python -m fastcifar.data`
through a small driver, DRIVER below). Where a test must die at an exact point, the driver patches a
function in the child before running the module and raises the signal there; the product code has no test
hooks. Tiny source: 40 train / 20 test images, --limit 24, batch 8, 2 epochs of 3 steps, --threads 1.

Numbers exercised (the README's Reliability section quotes them):

Default run (pytest -m "not slow"): 7 kill points, 12 training and 7 conversion processes, about 2 minutes on
2 shared cores.
  - SIGKILL and SIGINT mid-epoch (training step 5 of 6, in epoch 2)
  - SIGKILL while model.pt is being written (epoch 2's temp file cut to half, then killed)
  - disk full at epoch 2's checkpoint (a real ENOSPC on a filled tmpfs where mounting is allowed, else an
    injected one)
  - SIGKILL during beton conversion (test.beton half written, train.beton in place, no manifest yet)
  - SIGINT during conversion in a training run, and Ctrl-C to the whole process group of
    `python -m fastcifar.data` while ffcv's writer workers run
  Every file left behind loads (model.pt with load_checkpoint, metrics.json as JSON); temp files are never
  picked up; a SIGINT prints one "interrupted: ..." line and no traceback. 5 killed runs are resumed with
  --resume OUT (or rerun, where no checkpoint survived) and their per-epoch history must equal an
  uninterrupted reference run's bit for bit.
Slow (pytest -m slow) adds 11 kill points and 11 compared runs: SIGINT while model.pt is written, SIGKILL
  between the checkpoint's fsync and rename, SIGKILL while metrics.json is written, SIGKILL before the first
  checkpoint, SIGKILL while plotting after the last epoch, SIGINT
  during conversion through `python -m fastcifar.data`, an injected ENOSPC, SIGKILL from outside at 4 delays
  after epoch 1's line (0, 0.05, 0.2, 0.5 s), and 2 training runs started at once on one beton folder.
Concurrency: 2 converters with the second forced to arrive while the first holds the folder's lock, and 3
  started at once: exactly 1 conversion each time, all succeed, the result validates and round-trips.
Disk full during conversion: the beton writer refuses up front when the folder cannot hold a beton (ffcv's
  writer waits for ever on a worker that died of ENOSPC, so no conversion may start without room): on a real
  36 MB tmpfs, and with statvfs reporting 1 MB free.
Hostile input, 30 corruptions each (1..8 bytes xor-ed with random non-zero values; trial i uses seed i):
  official batch files, an image .tar.gz, an image .tar, and a converted beton folder (betons and manifest,
  read through check_manifest / prepare_betons): 120 in all, each under a 20 s alarm. Each must raise
  DataError or give back the original data (official batches and .tar: valid shapes, original counts).
  Seen: official 30/30 DataError, .tar.gz 30/30, .tar 28/30 (2 corruptions in padding read back intact),
  beton files 20/20 refused by the sha256 check, manifest 10/10 refused. Plus 3 damaged manifests that still
  parse as JSON. Slow: raw ffcv reads of 20 damaged betons in one subprocess with a time limit: all 20
  decode without complaint (ffcv has no checksum), which is why betons are only trusted through the manifest.
Killed-training runs read an array folder of the same images, so they never import ffcv; every other child
but that last test's runs with ffcv's numba JIT off (plain Python, the same batches): it saves
about 4 s a process and these tests are about files and signals, not decoding speed.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import make_tar, write_image_folder
from fastcifar.checkpoint import load_checkpoint
from fastcifar.data import DataError, ensure_betons, prepare_betons, read_beton, read_source
from fastcifar.data.arrays import ensure_arrays
from fastcifar.data.beton import MANIFEST, MARKER, check_manifest
from fastcifar.data.sources import source_fingerprint
from conftest import write_official  # noqa: E402

CLEAN = sorted([".lock", MARKER])  # what an interrupted conversion leaves: the folder's lock and its mark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, STEPS_PER_EPOCH = 2, 3  # --limit 24 at --batch-size 8
TRAIN_ARGS = ["--batch-size", "8", "--limit", "24", "--epochs", str(EPOCHS), "--preset", "best", "--seed", "1",
              "--no-plots", "--quiet", "--device", "cpu", "--threads", "1"]
HISTORY = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")

# Runs `python -m MODULE ARGS` in the child after patching the function named by $RELIABILITY_HOOK, so a test
# can stop the child at an exact point. Only this test's subprocesses ever see that variable.
DRIVER = r'''
import errno, json, os, runpy, signal, sys, time
# a shell's background job starts with SIGINT ignored; a user's Ctrl-C meets Python's default handler
signal.signal(signal.SIGINT, signal.default_int_handler)
hook = json.loads(os.environ.get("RELIABILITY_HOOK") or "{}")
# ffcv's numba JIT costs each child about 4 s and decides nothing these tests check (same batches either way);
# training from an array folder never imports ffcv, whose import alone compiles for 4-10 s
if sys.argv[1] == "fastcifar.data" or "--beton-dir" in sys.argv:
    from ffcv.pipeline.compiler import Compiler
    Compiler.set_enabled(False)
at, nth = hook.get("at"), hook.get("n", 1)
sig = getattr(signal, hook.get("signal", "SIGKILL"))
seen = {"n": 0}

def due():
    seen["n"] += 1
    return seen["n"] == nth

def fire(where):
    print(f"HOOK {where} #{nth}: {sig.name}", flush=True)
    signal.raise_signal(sig)  # SIGKILL: gone; SIGINT: KeyboardInterrupt raised right here

class OsProxy:  # a module's view of `os` with one function replaced
    def __init__(self, **over):
        self.__dict__.update(over)
    def __getattr__(self, name):
        return getattr(os, name)

if at == "train_step":  # the training loss is the only cross_entropy call with label_smoothing
    import torch.nn.functional as F
    real_ce = F.cross_entropy
    def ce(*a, **k):
        if "label_smoothing" in k and due():
            fire("training step")
        return real_ce(*a, **k)
    F.cross_entropy = ce
elif at in ("ckpt_partial", "ckpt_rename", "ckpt_enospc", "metrics_partial"):
    import fastcifar.io as fio  # every atomic write goes through it
    target = "metrics.json" if at == "metrics_partial" else "model.pt"
    def fsync(fd):
        if at != "ckpt_rename" and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{target}.") \
                and due():
            os.ftruncate(fd, os.fstat(fd).st_size // 2)  # as if the write had been cut short
            if at == "ckpt_enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            fire("file write")
        return os.fsync(fd)
    def replace(a, b):
        if at == "ckpt_rename" and os.path.basename(b) == target and due():
            fire("before rename")
        return os.replace(a, b)
    fio.os = OsProxy(fsync=fsync, replace=replace)
elif at == "convert":  # ffcv's finalize: data pages written, header not yet; earlier splits renamed in place
    from ffcv.writer import DatasetWriter
    real_fin = DatasetWriter.finalize
    def finalize(self, allocations):
        if due():
            fire(f"converting {os.path.basename(self.fname)}")
        return real_fin(self, allocations)
    DatasetWriter.finalize = finalize
elif at == "fill_disk":  # after epoch 1's metrics.json, fill the file system that holds OUT
    import fastcifar.io as fio
    real_json = fio.atomic_write_json
    def atomic_write_json(path, obj):
        real_json(path, obj)
        if due():
            with open(hook["filler"], "wb", buffering=0) as f:
                for size in (1 << 20, 1 << 12, 1):
                    try:
                        while True:
                            f.write(b"\0" * size)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC, e
            print("HOOK disk filled", flush=True)
    fio.atomic_write_json = atomic_write_json
elif at == "hold_lock":  # convert only once another process has arrived (it then waits on the lock)
    import fastcifar.data.beton as bt
    real_read = bt.read_source
    def read_source(path):
        print("HOOK holding the lock", flush=True)
        deadline = time.time() + 120
        while not os.path.exists(hook["flag"]) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # let the other process reach flock
        return real_read(path)
    bt.read_source = read_source
elif at == "arrive":  # raise the flag once this process found no valid manifest
    import fastcifar.data.beton as bt
    real_ok = bt._manifest_ok
    def manifest_ok(folder, fingerprint):
        m = real_ok(folder, fingerprint)
        if m is None and not os.path.exists(hook["flag"]):
            open(hook["flag"], "w").close()
        return m
    bt._manifest_ok = manifest_ok
elif at == "slow_convert":  # widen the conversion window so concurrent runs overlap
    import fastcifar.data.beton as bt
    real_wb = bt.write_beton
    def write_beton(*a, **k):
        time.sleep(hook.get("sleep", 1.0))
        return real_wb(*a, **k)
    bt.write_beton = write_beton
elif at == "plotting":  # after the last epoch's checkpoint and metrics, while the plots are drawn
    import fastcifar.plots as pl
    real_plot = pl.plot_curves
    def plot_curves(*a, **k):
        if due():
            fire("plotting")
        return real_plot(*a, **k)
    pl.plot_curves = plot_curves
elif at == "slow_items":  # slow ffcv's writer workers down (they are forked: the patch goes with them)
    import fastcifar.data.beton as bt
    real_item = bt._ArrayDataset.__getitem__
    def getitem(self, i):
        if i == 0:
            print("HOOK workers writing", flush=True)
        time.sleep(0.1)
        return real_item(self, i)
    bt._ArrayDataset.__getitem__ = getitem
elif at == "swallowed_ctrl_c":  # Ctrl-C to the group while ffcv's writer waits; the parent loses its exception
    import ffcv.writer as fw
    real_sleep = fw.sleep
    def sleep(t):
        if due():
            try:
                os.killpg(0, signal.SIGINT)
                while True:  # the handler runs here, as it can inside a ctypes or at-fork callback
                    time.sleep(0.01)
            except KeyboardInterrupt:
                print("HOOK swallowed", flush=True)
        return real_sleep(t)
    fw.sleep = sleep
elif at == "worker_dies":  # one of ffcv's forked writer workers is killed, as the OOM killer would
    import fastcifar.data.beton as bt
    real_item = bt._ArrayDataset.__getitem__
    def getitem(self, i):
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_item(self, i)
    bt._ArrayDataset.__getitem__ = getitem
elif at:
    sys.exit(f"unknown hook {at}")

module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


def _env(hook):
    return {**os.environ, "PYTHONUNBUFFERED": "1", "RELIABILITY_HOOK": json.dumps(hook or {}),
            "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def child(module, *args, hook=None, timeout=300):
    """Run `python -m module args` through the driver; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-c", DRIVER, module, *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(hook), cwd=REPO)


def spawn(module, *args, hook=None, new_session=False):
    return subprocess.Popen([sys.executable, "-c", DRIVER, module, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(hook), cwd=REPO,
                            start_new_session=new_session)


def train(source, betons, out, *extra, hook=None):
    """A training run on `source` (an image folder, converted into `betons`; None: source is an array folder)."""
    where = ["--beton-dir", betons] if betons else []
    return child("fastcifar.train", "--data", source, *where, "--out", out, *TRAIN_ARGS, *extra, hook=hook)


def resume(source, betons, out):
    where = ["--beton-dir", betons] if betons else []
    return child("fastcifar.train", "--resume", out, "--data", source, *where, *TRAIN_ARGS)


def show(r):
    return f"rc={r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


def history(out):
    return [tuple(h[k] for k in HISTORY) for h in json.load(open(os.path.join(out, "metrics.json")))["history"]]


def assert_nothing_corrupt(out):
    """Every artefact a later run or user could pick up is whole; returns the checkpoint's epoch (0: none)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    if "metrics.json" in names:
        json.load(open(os.path.join(out, "metrics.json")))
    if "model.pt" in names:
        return load_checkpoint(os.path.join(out, "model.pt"))["epoch"]
    return 0


def temp_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp") or ".partial-" in f)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source folder, its images, a folder of betons converted from it) shared by this module's runs."""
    root = tmp_path_factory.mktemp("tiny")
    want = write_image_folder(str(root / "src"), per_class=(4, 2), seed=3)
    ensure_betons(str(root / "src"), str(root / "betons"), progress=lambda s: None)
    return str(root / "src"), want, str(root / "betons")


@pytest.fixture(scope="module")
def arrays(tiny, tmp_path_factory):
    """The same images as plain arrays: the killed-training tests are about files and signals, and a child
    that reads arrays starts without ffcv (the same batches as from the betons: the conversion tests compare)."""
    folder = str(tmp_path_factory.mktemp("arrays") / "cache")
    ensure_arrays(tiny[0], folder, progress=lambda s: None)
    return folder


@pytest.fixture(scope="module")
def reference(arrays, tmp_path_factory):
    """The uninterrupted run every interrupted one must end up equal to."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    r = train(arrays, None, out)
    assert r.returncode == 0, show(r)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["status"] == "done" and m["epochs_run"] == EPOCHS
    return history(out), m


def test_reference_run_is_complete_and_honours_threads(reference):
    hist, m = reference
    assert [h[0] for h in hist] == list(range(1, EPOCHS + 1))
    # ffcv's Loader used to reset torch's thread count to its worker count, silently overriding --threads
    assert m["torch_threads"] == 1 and "1 threads" in m["device"]


# ---------------------------------------------------------------- killed training

def _killed_then_resumed(tmp_path, arrays, reference, at, n, sig, ckpt_epoch):
    source, betons = arrays, None
    out = str(tmp_path / "out")
    r = train(source, betons, out, hook={"at": at, "n": n, "signal": sig})
    assert "HOOK" in r.stdout, "the kill point was never reached\n" + show(r)
    if sig == "SIGKILL":
        assert r.returncode == -signal.SIGKILL, show(r)
    else:
        assert r.returncode == 1 and "Traceback" not in r.stderr, show(r)
        assert r.stderr.strip().splitlines()[-1] == (f"interrupted: the last complete epoch's checkpoint in {out} is intact; "
                                                     f"continue with --resume {out}"), show(r)
    assert assert_nothing_corrupt(out) == ckpt_epoch
    # metrics.json is written after the checkpoint: killed while writing it, it still has the epoch before
    metrics_epochs = ckpt_epoch - (at == "metrics_partial")
    if metrics_epochs:
        assert history(out) == reference[0][:metrics_epochs], "metrics.json must be whole and agree"
    leftovers = temp_files(out)
    if sig == "SIGINT":
        assert not leftovers, "an interrupted write must remove its temp file"
    r2 = resume(source, betons, out)
    assert r2.returncode == 0, show(r2)
    assert f"resuming {out} after epoch {ckpt_epoch}" in r2.stdout, "a temp file was picked up\n" + show(r2)
    assert history(out) == reference[0], "resumed run differs from the uninterrupted one"
    assert json.load(open(os.path.join(out, "metrics.json")))["status"] == "done"
    assert assert_nothing_corrupt(out) == EPOCHS
    assert temp_files(out) == leftovers, "no new temp files; old ones are ignored, never loaded"


def _kill(at, n, sig, ckpt_epoch, slow=False):
    # hook, its nth call, the signal, and the epoch of the checkpoint that must survive
    return pytest.param(at, n, sig, ckpt_epoch, id=f"{at}-{sig}", marks=[pytest.mark.slow] if slow else [])


KILLS = [
    _kill("train_step", STEPS_PER_EPOCH + 2, "SIGKILL", 1),  # mid-epoch 2
    _kill("train_step", STEPS_PER_EPOCH + 2, "SIGINT", 1),
    _kill("ckpt_partial", 2, "SIGKILL", 1),  # epoch 2's model.pt temp file half written
    _kill("ckpt_partial", 2, "SIGINT", 1, slow=True),
    _kill("ckpt_rename", 2, "SIGKILL", 1, slow=True),  # temp file complete and synced, not yet renamed
    _kill("metrics_partial", 2, "SIGKILL", 2, slow=True),  # epoch 2's metrics.json temp half written
]


@pytest.mark.parametrize("at,n,sig,ckpt_epoch", KILLS)
def test_killed_training_resumes_to_the_same_result(tmp_path, arrays, reference, at, n, sig, ckpt_epoch):
    _killed_then_resumed(tmp_path, arrays, reference, at, n, sig, ckpt_epoch)


@pytest.mark.slow
def test_killed_before_the_first_checkpoint(tmp_path, arrays, reference):
    source, betons = arrays, None
    out = str(tmp_path / "out")
    r = train(source, betons, out, hook={"at": "ckpt_partial", "n": 1})
    assert r.returncode == -signal.SIGKILL and "HOOK" in r.stdout, show(r)
    assert assert_nothing_corrupt(out) == 0 and not os.path.exists(os.path.join(out, "metrics.json"))
    r = resume(source, betons, out)  # nothing to resume: a clear one-line error, not a half-read temp file
    assert r.returncode == 1 and "no such checkpoint" in r.stderr and "Traceback" not in r.stderr, show(r)
    r = train(source, betons, out)  # starting again in the same folder works
    assert r.returncode == 0, show(r)
    assert history(out) == reference[0]


@pytest.mark.slow
def test_killed_while_plotting_after_the_last_epoch(tmp_path, arrays, reference):
    source = arrays
    out = str(tmp_path / "out")
    plots = [a for a in TRAIN_ARGS if a != "--no-plots"]
    r = child("fastcifar.train", "--data", source, "--out", out, *plots, hook={"at": "plotting"})
    assert r.returncode == -signal.SIGKILL and "HOOK plotting" in r.stdout, show(r)
    assert assert_nothing_corrupt(out) == EPOCHS and history(out) == reference[0]
    r = child("fastcifar.train", "--resume", out, "--data", source, *plots)
    assert r.returncode == 0, show(r)
    assert json.load(open(os.path.join(out, "metrics.json")))["status"] == "done"
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_sigkill_from_outside_after_epoch_one(tmp_path, arrays, reference, delay):
    """No hook: the kill lands wherever the child happens to be (evaluating, saving, training epoch 2)."""
    source, betons = arrays, None
    out = str(tmp_path / "out")
    p = spawn("fastcifar.train", "--data", source, "--out", out, *TRAIN_ARGS)
    try:
        for line in p.stdout:
            if line.startswith("epoch  1"):
                time.sleep(delay)
                p.kill()
                break
    finally:
        p.kill()
        p.communicate(timeout=60)
    epoch = assert_nothing_corrupt(out)
    if epoch == 0:  # killed before the first save finished: start again
        r = train(source, betons, out)
    else:
        r = resume(source, betons, out)
    assert r.returncode == 0, show(r)
    assert history(out) == reference[0]


# ---------------------------------------------------------------- killed conversion

def test_sigkill_during_conversion_is_redone_not_trusted(tmp_path, tiny, reference):
    source, _, _ = tiny
    betons, out = str(tmp_path / "betons"), str(tmp_path / "out")
    r = train(source, betons, out, hook={"at": "convert", "n": 2})  # 2nd split: test.beton
    assert r.returncode == -signal.SIGKILL and "HOOK converting test.beton" in r.stdout, show(r)
    m, why = check_manifest(betons)
    assert m is None and "manifest.json is missing" in why
    assert os.path.exists(os.path.join(betons, "train.beton")), "the first split was already in place"
    assert [f for f in temp_files(betons) if f.startswith("test.beton.partial-")], "killed mid-write"
    with pytest.raises(DataError):  # nor does the folder pass as a converted one
        prepare_betons(betons)
    r = train(source, betons, out)  # no checkpoint either: the user simply runs again
    assert r.returncode == 0, show(r)
    assert "converting" in r.stdout, "an interrupted conversion must be redone\n" + show(r)
    assert check_manifest(betons, source_fingerprint(source))[0] is not None
    assert temp_files(betons) == [], "the killed conversion's partial beton is cleaned up under the lock"
    assert history(out) == reference[0]


def test_sigint_during_conversion(tmp_path, tiny):
    source, want, _ = tiny
    betons, out = str(tmp_path / "betons"), str(tmp_path / "out")
    r = train(source, betons, out, hook={"at": "convert", "n": 2, "signal": "SIGINT"})
    assert "HOOK converting test.beton" in r.stdout, show(r)
    assert r.returncode == 1 and "Traceback" not in r.stderr, show(r)
    assert r.stderr.strip().splitlines()[-1].startswith("interrupted: "), show(r)
    assert check_manifest(betons)[0] is None and temp_files(betons) == [], "nothing half-written is left"
    assert assert_nothing_corrupt(out) == 0
    m = ensure_betons(source, betons, progress=lambda s: None)  # and the next use converts afresh
    images, labels = read_beton(os.path.join(betons, "test.beton"))
    np.testing.assert_array_equal(images, want["test"][0])
    assert m["splits"]["test"]["images"] == 20


@pytest.mark.slow
def test_sigint_during_conversion_cli(tmp_path, tiny):
    source, _, _ = tiny
    betons = str(tmp_path / "betons")
    r = child("fastcifar.data", "--source", source, "--out", betons, hook={"at": "convert", "n": 1,
                                                                            "signal": "SIGINT"})
    assert "HOOK converting train.beton" in r.stdout and r.returncode == 1, show(r)
    assert r.stderr.strip().splitlines()[-1] == "interrupted: nothing was left that a later run would trust"
    assert "Traceback" not in r.stderr and sorted(os.listdir(betons)) == CLEAN, show(r)
    r = child("fastcifar.data", "--source", source, "--out", betons)
    assert r.returncode == 0 and check_manifest(betons)[0] is not None, show(r)


def test_ctrl_c_to_the_process_group_while_ffcv_workers_write(tmp_path, tiny):
    """A terminal's Ctrl-C reaches ffcv's writer workers too: one clean line, no worker tracebacks, no leak."""
    source, _, _ = tiny
    betons = str(tmp_path / "betons")
    p = spawn("fastcifar.data", "--source", source, "--out", betons, hook={"at": "slow_items"}, new_session=True)
    try:
        for line in p.stdout:
            if line.startswith("HOOK workers writing"):
                time.sleep(0.3)
                os.killpg(p.pid, signal.SIGINT)
                break
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1, err
    assert err.strip().splitlines()[-1] == "interrupted: nothing was left that a later run would trust", err
    assert "Traceback" not in err and "leaked" not in err, err
    assert sorted(os.listdir(betons)) == CLEAN


def test_ctrl_c_the_parent_swallowed_still_stops_the_conversion(tmp_path, tiny):
    """Python drops an exception raised in some callbacks; ffcv's writer would then wait for ever on workers
    that left on the same Ctrl-C."""
    source, _, _ = tiny
    betons = str(tmp_path / "betons")
    p = spawn("fastcifar.data", "--source", source, "--out", betons, hook={"at": "swallowed_ctrl_c"},
              new_session=True)  # its own process group: the hook's Ctrl-C must not reach pytest
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert "HOOK swallowed" in r.stdout and r.returncode == 1, show(r)
    assert r.stderr.strip().splitlines()[-1] == "interrupted: nothing was left that a later run would trust"
    assert "Traceback" not in r.stderr and "leaked" not in r.stderr, show(r)
    assert sorted(os.listdir(betons)) == CLEAN


def test_a_writer_worker_that_dies_is_an_error_not_a_hang(tmp_path, tiny):
    source, _, _ = tiny
    betons = str(tmp_path / "betons")
    r = child("fastcifar.data", "--source", source, "--out", betons, hook={"at": "worker_dies"}, timeout=120)
    assert r.returncode == 1, show(r)
    assert r.stderr.strip().splitlines()[-1] == \
        "error: an ffcv writer worker died (exit code -9) while writing train.beton; nothing was kept", show(r)
    assert "leaked" not in r.stderr and sorted(os.listdir(betons)) == CLEAN, show(r)


# ---------------------------------------------------------------- concurrent conversions

def test_second_converter_waits_on_the_lock_and_reuses(tmp_path, tiny):
    source, want, _ = tiny
    betons, flag = str(tmp_path / "betons"), str(tmp_path / "arrived")
    a = spawn("fastcifar.data", "--source", source, "--out", betons, hook={"at": "hold_lock", "flag": flag})
    a_head = []
    for line in a.stdout:  # a holds the lock before b starts
        a_head.append(line)
        if line.startswith("HOOK holding the lock"):
            break
    else:
        pytest.fail("the first converter never took the lock: " + a.stderr.read())
    b = spawn("fastcifar.data", "--source", source, "--out", betons, hook={"at": "arrive", "flag": flag})
    (a_out, a_err), (b_out, b_err) = a.communicate(timeout=300), b.communicate(timeout=300)
    a_out = "".join(a_head) + a_out
    assert a.returncode == 0 and b.returncode == 0, (a_err, b_err)
    assert os.path.exists(flag), "b never found the folder unconverted: the test did not overlap the runs"
    assert "converting" in a_out and "converting" not in b_out, "only one conversion may happen\n" + b_out
    assert "train: 40 images" in b_out
    _assert_valid_round_trip(source, want, betons)


def _assert_valid_round_trip(source, want, betons):
    m, why = check_manifest(betons, source_fingerprint(source))
    assert m is not None, why
    for split in ("train", "test"):
        images, labels = read_beton(os.path.join(betons, f"{split}.beton"))
        np.testing.assert_array_equal(images, want[split][0])
        np.testing.assert_array_equal(labels, want[split][1])
    assert temp_files(betons) == []


@pytest.mark.slow
def test_two_training_runs_share_one_beton_folder(tmp_path, tiny, reference):
    source, _, _ = tiny
    betons = str(tmp_path / "betons")
    procs = [spawn("fastcifar.train", "--data", source, "--beton-dir", betons, "--out", str(tmp_path / f"o{i}"),
                   *TRAIN_ARGS, hook={"at": "slow_convert"}) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert sum("converting" in o for o, _ in outs) == 1
    assert history(str(tmp_path / "o0")) == history(str(tmp_path / "o1")) == reference[0]


# ---------------------------------------------------------------- full disks

def _mount_tmpfs(path, size):
    """Mount a small tmpfs at path; False where this sandbox does not allow it."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    return r.returncode == 0


def _umount(path):
    subprocess.run(["umount", "-l", path], capture_output=True)


def _disk_full_at_checkpoint(tmp_path, arrays, reference, real):
    source, betons = arrays, None
    disk = str(tmp_path / "disk")
    mounted = real and _mount_tmpfs(disk, "16m")
    try:
        out, filler = os.path.join(disk, "out"), os.path.join(disk, "filler")
        hook = {"at": "fill_disk", "filler": filler} if mounted else {"at": "ckpt_enospc", "n": 2}
        r = train(source, betons, out, hook=hook)
        how = "tmpfs" if mounted else "injected ENOSPC"
        assert r.returncode not in (0, -signal.SIGKILL), f"{how}\n" + show(r)
        assert "No space left on device" in r.stderr, f"{how}: the cause must be named\n" + show(r)
        assert assert_nothing_corrupt(out) == 1, f"{how}: epoch 1's checkpoint must be intact"
        assert temp_files(out) == [], f"{how}: the failed write must remove its temp file"
        assert history(out) == reference[0][:1]
        if mounted:
            os.unlink(filler)  # the user frees space, then carries on
        r = resume(source, betons, out)
        assert r.returncode == 0, show(r)
        assert history(out) == reference[0]
    finally:
        if mounted:
            _umount(disk)


def test_disk_full_at_checkpoint_keeps_the_previous_one(tmp_path, arrays, reference):
    _disk_full_at_checkpoint(tmp_path, arrays, reference, real=True)


def test_disk_full_during_conversion_fails_fast(tmp_path, tiny):
    """ffcv's DatasetWriter waits for ever on a worker that died of ENOSPC: the writer must refuse up front."""
    source, _, _ = tiny
    disk = str(tmp_path / "disk")
    if not _mount_tmpfs(disk, "36m"):  # room for train.beton (16.8 MB) and not for a second one
        pytest.skip("cannot mount a tmpfs here (test_disk_nearly_full_is_refused_before_writing covers the check)")
    try:
        betons = os.path.join(disk, "b")
        r = child("fastcifar.data", "--source", source, "--out", betons, timeout=180)
        assert r.returncode == 1 and "Traceback" not in r.stderr, show(r)
        assert "not enough free disk space for test.beton" in r.stderr.strip().splitlines()[-1], show(r)
        assert check_manifest(betons)[0] is None and temp_files(betons) == []
    finally:
        _umount(disk)


def test_disk_nearly_full_is_refused_before_writing(tmp_path, tiny, monkeypatch):
    source, _, _ = tiny
    real = os.statvfs

    def one_mb_free(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, 256, 256) + tuple(st)[5:])
    monkeypatch.setattr(os, "statvfs", one_mb_free)
    betons = str(tmp_path / "b")
    with pytest.raises(DataError, match="not enough free disk space for train.beton.*1 MB are free"):
        ensure_betons(source, betons, progress=lambda s: None)
    assert check_manifest(betons)[0] is None and temp_files(betons) == []


# ---------------------------------------------------------------- hostile input

TRIALS = 30


class Hang(BaseException):
    """BaseException, so that no reader's `except Exception` can swallow it."""


def _deadline(seconds):
    def on_alarm(*_):
        raise Hang(f"no answer within {seconds} s")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)


def corrupt(data, seed):
    """1..8 bytes xor-ed with non-zero values: every trial really changes the data."""
    rng = np.random.default_rng(seed)
    b = bytearray(data)
    for pos in rng.choice(len(b), int(rng.integers(1, 9)), replace=False):
        b[pos] ^= int(rng.integers(1, 256))
    return bytes(b)


def _read_or_data_error(path, seed):
    """read_source's outcome: the Dataset, or None after a DataError; anything else fails the test."""
    _deadline(20)
    try:
        return read_source(path)
    except DataError as e:
        assert "\n" not in str(e), f"seed {seed}: multi-line message"
        return None
    except Hang:
        pytest.fail(f"seed {seed}: read_source({path}) hung")
    except Exception as e:
        pytest.fail(f"seed {seed}: {type(e).__name__} instead of DataError: {e}")
    finally:
        signal.alarm(0)


def _assert_valid_shapes(ds, counts, seed):
    for split, n in counts.items():
        s = ds.splits[split]
        assert s.images.dtype == np.uint8 and s.images.shape == (n, 32, 32, 3), f"seed {seed}: {split}"
        assert s.labels.shape == (n,) and s.labels.min() >= 0 and s.labels.max() <= 9, f"seed {seed}: {split}"


def test_fuzz_official_batches(tmp_path):
    template = str(tmp_path / "template")
    want = write_official(template, n_per_batch=4)
    names = sorted(n for n in os.listdir(template) if n != "batches.meta")  # the files read_source reads
    outcomes = {"DataError": 0, "read": 0}
    for seed in range(TRIALS):
        folder = str(tmp_path / f"t{seed}")
        shutil.copytree(template, folder)
        name = names[seed % len(names)]
        p = os.path.join(folder, name)
        raw = open(p, "rb").read()
        open(p, "wb").write(corrupt(raw, seed))
        ds = _read_or_data_error(folder, seed)
        outcomes["DataError" if ds is None else "read"] += 1
        if ds is not None:  # the format has no checksum: changed pixels cannot be seen, changed counts can
            _assert_valid_shapes(ds, {s: len(want[s][1]) for s in want}, seed)
        shutil.rmtree(folder)
    assert outcomes["DataError"] >= TRIALS // 2, outcomes


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
def test_fuzz_image_tarball(tmp_path, suffix):
    root = str(tmp_path / "tree")
    write_image_folder(root, per_class=(2, 1))
    want = read_source(root)
    raw = open(make_tar(root, str(tmp_path / f"ok{suffix}")), "rb").read()
    errors = 0
    for seed in range(TRIALS):
        p = str(tmp_path / f"c{seed}{suffix}")
        open(p, "wb").write(corrupt(raw, seed))
        ds = _read_or_data_error(p, seed)
        if ds is None:
            errors += 1
        elif suffix == ".tar.gz":  # gzip's CRC covers every byte: a read that succeeds is the original
            for s in ("train", "test"):
                np.testing.assert_array_equal(ds.splits[s].images, want.splits[s].images, err_msg=f"seed {seed}")
        else:  # tar headers are checksummed, PNGs mostly: never a silently shorter dataset
            _assert_valid_shapes(ds, {s: len(want.splits[s]) for s in want.splits}, seed)
            assert ds.class_counts("train") == want.class_counts("train"), f"seed {seed}"
        os.unlink(p)
    assert errors >= TRIALS // 2


def test_fuzz_converted_betons_are_refused_before_ffcv_reads_them(tmp_path):
    """ffcv's reader checks nothing: the manifest's sha256 is the guard for pixels (tests/test_fuzz.py: structure)."""
    root = str(tmp_path / "tree")
    write_image_folder(root, per_class=(2, 1))
    folder = str(tmp_path / "betons")
    orig = ensure_betons(root, folder, progress=lambda s: None)
    files = ["train.beton", "test.beton", MANIFEST]
    refused = 0
    for seed in range(TRIALS):
        name = files[seed % 3]
        p = os.path.join(folder, name)
        raw = open(p, "rb").read()
        if name.endswith(".beton") and seed % 2:  # half of them hit the bytes ffcv actually uses
            nz = np.flatnonzero(np.frombuffer(raw, np.uint8))
            bad = bytearray(raw)
            for pos in np.random.default_rng(seed).choice(nz, 4, replace=False):
                bad[pos] ^= 0x5A
        else:
            bad = corrupt(raw, seed)
        with open(p, "r+b") as f:
            f.write(bad)
        _deadline(20)
        try:
            m, why = check_manifest(folder)
            if m is None:
                refused += 1
                with pytest.raises(DataError, match="beton folder is not usable"):
                    prepare_betons(folder)
            else:  # damage that leaves a manifest valid may only touch its labels, never the data it vouches for
                assert {k: m[k] for k in ("format_version", "classes", "splits")} == \
                    {k: orig[k] for k in ("format_version", "classes", "splits")}, f"seed {seed}: {m}"
                assert prepare_betons(folder)[1] == m
            if name.endswith(".beton"):
                assert m is None and "truncated or corrupt" in why, f"seed {seed} ({name}): {why}"
        except Hang:
            pytest.fail(f"seed {seed} ({name}): check_manifest hung")
        finally:
            signal.alarm(0)
            with open(p, "wb") as f:
                f.write(raw)
    assert refused >= 2 * TRIALS // 3, refused
    assert check_manifest(folder, source_fingerprint(root))[0] == orig


@pytest.mark.parametrize("damage", ["images", "per_class key", "class name"])
def test_damaged_manifest_that_still_parses_is_refused(tmp_path, damage):
    """Found by fuzzing the manifest alone: 2 in 400 damaged copies (a renamed 'per_class' key) passed."""
    root = str(tmp_path / "tree")
    write_image_folder(root, per_class=(1, 1))
    folder = str(tmp_path / "betons")
    ensure_betons(root, folder, progress=lambda s: None)
    p = os.path.join(folder, MANIFEST)
    m = json.load(open(p))
    if damage == "images":
        m["splits"]["train"]["images"] += 1
    elif damage == "per_class key":
        m["splits"]["test"]["per_cgass"] = m["splits"]["test"].pop("per_class")
    else:
        m["classes"][3] = "cta"
    json.dump(m, open(p, "w"))
    assert check_manifest(folder)[1] == f"{MANIFEST} is damaged (its fields do not agree with each other)"
    with pytest.raises(DataError, match="is damaged"):
        prepare_betons(folder)
    msgs = []
    ensure_betons(root, folder, progress=msgs.append)
    assert msgs and check_manifest(folder)[0] is not None, "a damaged manifest means converting again"


