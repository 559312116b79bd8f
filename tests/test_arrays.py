"""The path without ffcv: the source cached as .npy arrays (atomically, validated like the betons), read by the
resident loader into the same batches as the betons give; what needs ffcv refuses in one line without it.
Everything here but the beton comparison runs without ffcv (CI runs this file in an environment without it)."""
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT, make_tar, write_image_folder
from fastcifar.data import DataError, ensure_arrays, prepare_data, read_arrays
from fastcifar.data.arrays import MANIFEST, RECORD, check_arrays
from fastcifar.data.loaders import FFCVLoader, ResidentLoader
from fastcifar.device import ConfigError


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg
    return msg


@pytest.fixture
def no_ffcv(monkeypatch):
    """As if ffcv were not installed: importing it raises ModuleNotFoundError."""
    monkeypatch.setitem(sys.modules, "ffcv", None)


# ---------------------------------------------------------------- the cache

def test_arrays_hold_the_source_and_are_reused(tmp_path, image_folder):
    root, want = image_folder
    out = str(tmp_path / "arrays")
    m = ensure_arrays(root, out, progress=lambda s: None)
    assert m["kind"] == "arrays" and m["splits"]["train"]["images"] == 30 and m["splits"]["test"]["per_class"] == [2] * 10
    for split in ("train", "test"):
        path = os.path.join(out, f"{split}.npy")
        records = np.load(path, allow_pickle=False)  # plain records: no pickle needed to read them
        assert records.dtype == RECORD
        images, labels = read_arrays(path)
        assert images.flags.c_contiguous and images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, want[split][0])
        np.testing.assert_array_equal(labels, want[split][1])
    mtime = os.stat(os.path.join(out, "train.npy")).st_mtime_ns
    ensure_arrays(root, out, progress=lambda s: pytest.fail("read again: " + s))
    assert os.stat(os.path.join(out, "train.npy")).st_mtime_ns == mtime
    assert sorted(os.listdir(out)) == [".fastcifar-arrays", ".lock", MANIFEST, "test.npy", "train.npy"]


def test_corrupt_or_stale_arrays_are_read_again(tmp_path, image_folder):
    root, _ = image_folder
    out = str(tmp_path / "arrays")
    ensure_arrays(root, out, progress=lambda s: None)
    p = os.path.join(out, "test.npy")
    b = bytearray(open(p, "rb").read())
    b[-5] ^= 0xFF  # same size, one pixel changed
    open(p, "wb").write(b)
    assert "test.npy is truncated or corrupt" in check_arrays(out)[1]
    msgs = []
    ensure_arrays(root, out, progress=msgs.append)
    assert msgs and check_arrays(out)[0] is not None
    write_image_folder(root, seed=7)  # a changed source invalidates them too
    msgs.clear()
    ensure_arrays(root, out, progress=msgs.append)
    assert msgs and check_arrays(out)[0] is not None


def test_an_interrupted_write_leaves_nothing_trusted(tmp_path, image_folder, monkeypatch):
    import fastcifar.data.arrays as arrays
    root, _ = image_folder
    out = str(tmp_path / "arrays")
    real = np.lib.format.write_array
    calls = []

    def dies_in_the_second_file(f, a, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x93NUMPY half a file")
            raise KeyboardInterrupt
        real(f, a, **kw)
    monkeypatch.setattr(arrays.np.lib.format, "write_array", dies_in_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        ensure_arrays(root, out, progress=lambda s: None)
    assert sorted(os.listdir(out)) == [".fastcifar-arrays", ".lock", "train.npy"]  # no manifest, no temporary file
    open(os.path.join(out, ".test.npy.dead.tmp"), "wb").write(b"left by a killed process")
    monkeypatch.setattr(arrays.np.lib.format, "write_array", real)
    msgs = []
    ensure_arrays(root, out, progress=msgs.append)
    assert msgs and sorted(os.listdir(out)) == [".fastcifar-arrays", ".lock", MANIFEST, "test.npy", "train.npy"]


def test_concurrent_callers_read_the_source_once(tmp_path, image_folder):
    root, _ = image_folder
    out, msgs, errors = str(tmp_path / "arrays"), [], []

    def run():
        try:
            ensure_arrays(root, out, progress=msgs.append)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(msgs) == 1, (errors, msgs)


def test_only_an_empty_or_fastcifar_folder_receives_arrays(tmp_path, image_folder):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.npy").write_bytes(b"someone else's")
    with pytest.raises(DataError) as e:
        ensure_arrays(image_folder[0], str(mine), progress=lambda s: None)
    _one_line(e, "not empty and not a fastcifar cache folder")
    assert os.listdir(mine) == ["train.npy"] and (mine / "train.npy").read_bytes() == b"someone else's"
    betons = tmp_path / "betons"  # a beton folder's files have other names: both caches can share it
    betons.mkdir()
    (betons / "manifest.json").write_text("{}")
    assert ensure_arrays(image_folder[0], str(betons), progress=lambda s: None)["kind"] == "arrays"
    assert (betons / "manifest.json").read_text() == "{}"
    shared = tmp_path / "shared"  # the other order: arrays first (no ffcv), betons later (ffcv installed)
    ensure_arrays(image_folder[0], str(shared), progress=lambda s: None)
    pytest.importorskip("ffcv")
    from fastcifar.data import ensure_betons
    assert ensure_betons(image_folder[0], str(shared), progress=lambda s: None)["splits"]["train"]["images"] > 0
    assert check_arrays(str(shared))[0] is not None


def test_read_arrays_refuses_what_is_not_a_record_file(tmp_path):
    p = str(tmp_path / "x.npy")
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle inside: never unpickled
    with pytest.raises(DataError) as e:
        read_arrays(p)
    _one_line(e, "not a readable array file")
    np.save(p, np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(DataError) as e:
        read_arrays(p)
    _one_line(e, "not a fastcifar array file")
    records = np.zeros(3, RECORD)
    records["label"] = [0, 10, 2]
    np.save(p, records)
    with pytest.raises(DataError) as e:
        read_arrays(p)
    _one_line(e, "labels outside 0..9")
    records["label"] = 1
    np.save(p, records)
    os.truncate(p, os.path.getsize(p) - 100)
    with pytest.raises(DataError) as e:
        read_arrays(p)
    _one_line(e, "not a readable array file")
    with pytest.raises(DataError) as e:
        read_arrays(str(tmp_path / "absent.npy"))
    _one_line(e, "no such array file")


# ---------------------------------------------------------------- prepare_data without ffcv

def test_without_ffcv_prepare_data_caches_arrays_and_says_betons_need_ffcv(tmp_path, image_folder, no_ffcv):
    root, want = image_folder
    msgs = []
    d = prepare_data(root, progress=msgs.append)
    assert d.kind == "arrays" and d.paths == {s: os.path.join(d.folder, f"{s}.npy") for s in ("train", "test")}
    assert d.folder.startswith(os.environ["FASTCIFAR_CACHE"])  # the conftest's per-test cache
    assert d.manifest["splits"]["test"]["images"] == 20 and d.manifest["description"].endswith("(image folder)")
    note = [m for m in msgs if "betons need ffcv" in m]
    assert len(note) == 1 and 'pip install "fastcifar[ffcv]"' in note[0] and "ffcv is not installed" in note[0]
    x, y = zip(*ResidentLoader(d.paths["test"], 7, "cpu", train=False))
    assert torch.cat(y).tolist() == want["test"][1].tolist()
    # the cache folder itself is a source, and an explicit cache_dir is used as given
    assert prepare_data(d.folder, progress=lambda s: None).paths == d.paths
    own = str(tmp_path / "own")
    assert prepare_data(root, own, progress=lambda s: None).folder == own


def test_without_ffcv_a_beton_folder_and_the_ffcv_loader_refuse_in_one_line(tmp_path, image_folder, no_ffcv):
    folder = tmp_path / "betons"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DataError) as e:
        prepare_data(str(folder), progress=lambda s: None)
    _one_line(e, "folder of betons", 'pip install "fastcifar[ffcv]"')
    with pytest.raises(DataError) as e:
        prepare_data(image_folder[0], kind="beton", progress=lambda s: None)
    _one_line(e, "betons need ffcv", 'pip install "fastcifar[ffcv]"')
    with pytest.raises(ConfigError) as e:
        FFCVLoader(str(folder / "train.beton"), 8, "cpu", train=True)
    _one_line(e, "--loader ffcv needs ffcv", 'pip install "fastcifar[ffcv]"')


def test_a_damaged_array_folder_given_as_the_source_is_refused(tmp_path, image_folder):
    d = prepare_data(image_folder[0], str(tmp_path / "a"), progress=lambda s: None, kind="arrays")
    os.truncate(d.paths["train"], 1000)
    with pytest.raises(DataError) as e:
        prepare_data(d.folder, progress=lambda s: None)
    _one_line(e, "array folder is not usable", "train.npy is truncated or corrupt")


def test_an_installed_ffcv_that_cannot_be_imported_falls_back_to_arrays(tmp_path, image_folder, monkeypatch):
    from fastcifar.data.prepare import ffcv_problem
    (tmp_path / "site" / "ffcv").mkdir(parents=True)  # as ffcv is without libturbojpeg on the machine
    (tmp_path / "site" / "ffcv" / "__init__.py").write_text("raise OSError('libturbojpeg.so.0: cannot open')\n")
    monkeypatch.delitem(sys.modules, "ffcv", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert ffcv_problem() == "ffcv cannot be imported (OSError: libturbojpeg.so.0: cannot open)"
    msgs = []
    assert prepare_data(image_folder[0], progress=msgs.append).kind == "arrays"
    assert msgs[0].startswith("ffcv cannot be imported (OSError") and "betons need ffcv" in msgs[0]


# a process in which ffcv cannot be imported at all: nothing of fastcifar imports it, the data path still works
HIDE = textwrap.dedent("""
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):
        def __init__(self, finder):
            self.finder = finder
        def find_spec(self, name, path=None, target=None):
            return None if name.split(".")[0] == "ffcv" else self.finder.find_spec(name, path, target)
        def invalidate_caches(self):
            getattr(self.finder, "invalidate_caches", lambda: None)()
    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
""")
IMPORTS = HIDE + textwrap.dedent("""
    import importlib, pkgutil, fastcifar
    names = [m.name for m in pkgutil.walk_packages(fastcifar.__path__, "fastcifar.") if not m.name.endswith("__main__")]
    for name in names:
        importlib.import_module(name)
    assert "ffcv" not in sys.modules and "fastcifar.data.loaders" in names, names
    from fastcifar.data import prepare_data
    from fastcifar.data.loaders import ResidentLoader
    d = prepare_data(sys.argv[1], sys.argv[2])
    print(d.kind, len(list(ResidentLoader(d.paths["train"], 8, "cpu", train=True))), len(names))
""")


def test_no_module_imports_ffcv_and_the_resident_path_runs_without_it(tmp_path, image_folder):
    r = subprocess.run([sys.executable, "-c", IMPORTS, image_folder[0], str(tmp_path / "cache")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kind, batches, modules = r.stdout.splitlines()[-1].split()
    assert "ffcv is not installed: the resident loader reads cached arrays" in r.stdout
    assert (kind, batches) == ("arrays", "3") and int(modules) >= 10


def test_fastcifar_data_refuses_betons_without_ffcv_and_writes_arrays(tmp_path, image_folder):
    main = HIDE + "import runpy; runpy.run_module('fastcifar.data', run_name='__main__')"

    def data(*args):
        return subprocess.run([sys.executable, "-c", main, "--source", image_folder[0], *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    r = data("--out", str(tmp_path / "b"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "betons need ffcv" in r.stderr and 'pip install "fastcifar[ffcv]"' in r.stderr
    assert not (tmp_path / "b").exists()
    r = data("--out", str(tmp_path / "a"), "--format", "arrays")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train: 30 images" in r.stdout and check_arrays(str(tmp_path / "a"))[0] is not None


# ---------------------------------------------------------------- the two paths give the same batches

def test_betons_and_arrays_hold_the_same_pixels_and_give_the_same_batches(tmp_path):
    pytest.importorskip("ffcv")
    from fastcifar.data import read_beton
    # JPEG like the shared copy of CIFAR-10: lossy pixels, decoded once by the same reader for both paths
    write_image_folder(str(tmp_path / "tree"), per_class=(4, 2), fmt="jpg")
    source = make_tar(str(tmp_path / "tree"), str(tmp_path / "src.tar.gz"))
    b = prepare_data(source, str(tmp_path / "betons"), progress=lambda s: None)
    a = prepare_data(source, str(tmp_path / "arrays"), progress=lambda s: None, kind="arrays")
    assert (b.kind, a.kind) == ("beton", "arrays")
    counts = [{s: (i["images"], i["per_class"]) for s, i in d.manifest["splits"].items()} for d in (a, b)]
    assert counts[0] == counts[1] and a.manifest["description"] == b.manifest["description"]
    for split in ("train", "test"):  # the test split is read in this order, unshuffled
        xb, yb = read_beton(b.paths[split])
        xa, ya = read_arrays(a.paths[split])
        assert xa.dtype == xb.dtype and np.array_equal(xa, xb) and np.array_equal(ya, yb)
    for limit in (None, 24):
        kw = dict(train=True, seed=5, cutout=6, limit=limit)
        lb, la = ResidentLoader(b.paths["train"], 8, "cpu", **kw), ResidentLoader(a.paths["train"], 8, "cpu", **kw)
        for epoch in range(2):  # the generator carries over: the second epoch's order and crops too
            batches = list(zip(lb, la))
            assert len(batches) == len(lb) > 1
            assert all(torch.equal(xb, xa) and torch.equal(yb, ya) for (xb, yb), (xa, ya) in batches)
        assert torch.equal(lb.sample(9), la.sample(9))
    with pytest.raises(ConfigError) as e:  # ffcv's Loader streams betons only
        FFCVLoader(a.paths["train"], 8, "cpu", train=True)
    _one_line(e, "is an array file", "--loader resident")
