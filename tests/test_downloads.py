"""The official download, offline: sources._fetch (the only function that touches the network) is replaced by one
that writes a small official-format tarball, and the pinned md5s are replaced by that tarball's. An interrupted
download is retried, a wrong archive replaced, a half-extracted folder never accepted, a hostile tarball extracts
nothing outside its folder, and two first runs at once download once."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conftest import ROOT, make_tar
from conftest import write_official
from fastcifar.data import DataError, read_source, resolve_source
from fastcifar.data import sources
from fastcifar.data.sources import OFFICIAL_ARCHIVE, OFFICIAL_FOLDER, download_official


def md5(data):
    return hashlib.md5(data).hexdigest()


class Net:
    """Stands in for the network: serves `archive` (bytes), records every fetch, can fail the next ones."""

    def __init__(self, archive):
        self.archive, self.fetches, self.plan = archive, [], []

    def fetch(self, url, path):
        self.fetches.append(path)
        how = self.plan.pop(0) if self.plan else "ok"
        data = self.archive
        if how == "cut":  # the connection drops halfway
            open(path, "wb").write(data[: len(data) // 2])
            raise ConnectionResetError("connection reset by peer")
        if how == "wrong":
            data = data[:-7] + b"garbage"
        open(path, "wb").write(data)


@pytest.fixture
def official(tmp_path):
    """(tarball bytes, {name: file bytes}, images) of a small official-format archive."""
    src = tmp_path / "official-src"
    want = write_official(str(src / OFFICIAL_FOLDER), n_per_batch=4)
    files = {n: open(src / OFFICIAL_FOLDER / n, "rb").read() for n in os.listdir(src / OFFICIAL_FOLDER)}
    data = open(make_tar(str(src), str(tmp_path / "official.tar.gz")), "rb").read()
    return data, files, want


@pytest.fixture
def net(official, monkeypatch):
    data, files, _ = official
    monkeypatch.setattr(sources, "OFFICIAL_MD5", md5(data))
    monkeypatch.setattr(sources, "OFFICIAL_FILE_MD5", {n: md5(b) for n, b in files.items()})
    n = Net(data)
    monkeypatch.setattr(sources, "_fetch", n.fetch)
    return n


def assert_complete(folder, official):
    _, files, want = official
    assert sorted(os.listdir(folder)) == sorted(files)
    for n, b in files.items():
        assert open(os.path.join(folder, n), "rb").read() == b, n
    ds = read_source(folder)
    np.testing.assert_array_equal(ds.splits["test"].images, want["test"][0])


def leftovers(root):
    return sorted(n for n in os.listdir(root) if ".partial-" in n or n.startswith(".extract-") or n.endswith(".tmp"))


def test_first_download_is_checked_extracted_and_then_reused(tmp_path, net, official, monkeypatch):
    root = str(tmp_path / "dl")
    folder = download_official(root)
    assert folder == os.path.join(root, OFFICIAL_FOLDER)
    assert_complete(folder, official)
    assert len(net.fetches) == 1 and os.path.basename(net.fetches[0]).startswith(f"{OFFICIAL_ARCHIVE}.partial-"), \
        "downloaded to a temporary name, renamed once complete"
    assert md5(open(os.path.join(root, OFFICIAL_ARCHIVE), "rb").read()) == sources.OFFICIAL_MD5
    assert leftovers(root) == []
    monkeypatch.setattr(sources, "_md5", lambda p: pytest.fail(f"hashed {p} again"))
    assert download_official(root) == folder and len(net.fetches) == 1  # verified once: sizes and mtimes after
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "c"))
    assert resolve_source(download_root=root) == folder


def test_an_interrupted_download_is_retried(tmp_path, net, official):
    root = str(tmp_path / "dl")
    net.plan = ["cut"]
    with pytest.raises(DataError, match="download failed.*ConnectionResetError") as e:
        download_official(root)
    assert "\n" not in str(e.value)
    assert not os.path.exists(os.path.join(root, OFFICIAL_ARCHIVE)), "half an archive is never given its name"
    assert leftovers(root) == []
    # a download killed outright leaves its partial file; an older version left a cut archive under the real name
    open(os.path.join(root, f"{OFFICIAL_ARCHIVE}.partial-99999"), "wb").write(net.archive[:1000])
    open(os.path.join(root, OFFICIAL_ARCHIVE), "wb").write(net.archive[: len(net.archive) // 3])
    assert_complete(download_official(root), official)
    assert len(net.fetches) == 2 and leftovers(root) == []


def test_an_archive_with_the_wrong_md5_is_replaced(tmp_path, net, official):
    root = str(tmp_path / "dl")
    os.makedirs(root)
    other = tmp_path / "other"
    write_official(str(other / OFFICIAL_FOLDER), n_per_batch=2, seed=9)  # a readable archive, not the official one
    make_tar(str(other), os.path.join(root, OFFICIAL_ARCHIVE))
    assert_complete(download_official(root), official)
    assert len(net.fetches) == 1
    assert md5(open(os.path.join(root, OFFICIAL_ARCHIVE), "rb").read()) == sources.OFFICIAL_MD5


def test_a_download_with_the_wrong_md5_is_refused(tmp_path, net):
    root = str(tmp_path / "dl")
    net.plan = ["wrong"]
    with pytest.raises(DataError, match=f"has md5 [0-9a-f]{{32}}, not the official {sources.OFFICIAL_MD5}"):
        download_official(root)
    assert sorted(os.listdir(root)) == [".lock"], "nothing of the bad download is kept"


@pytest.mark.parametrize("damage", ["missing files", "a cut file", "a changed file"])
def test_a_half_extracted_folder_is_not_accepted(tmp_path, net, official, damage):
    root = str(tmp_path / "dl")
    folder = os.path.join(root, OFFICIAL_FOLDER)
    if damage == "a changed file":  # verified once, then changed: its size no longer matches the record
        download_official(root)
        with open(os.path.join(folder, "data_batch_2"), "ab") as f:
            f.write(b"x")
    else:  # what torchvision's in-place extraction leaves when it is killed
        _, files, _ = official
        os.makedirs(folder)
        for n in sorted(files)[: 3 if damage == "missing files" else len(files)]:
            b = files[n]
            open(os.path.join(folder, n), "wb").write(b[: len(b) // 2] if n == "test_batch" else b)
    assert_complete(download_official(root), official)
    assert leftovers(root) == []


def _hostile_tarball(path, kind, outside):
    """An official-looking tarball with one member that points outside the folder it is extracted into."""
    with tarfile.open(path, "w:gz") as tf:
        def add(name, data=b"x", **kw):
            info = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(info, k, v)
            info.size = 0 if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) else len(data)
            tf.addfile(info, None if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) else io.BytesIO(data))
        add(f"{OFFICIAL_FOLDER}/readme.html")
        if kind == "../evil":
            add(f"{OFFICIAL_FOLDER}/../../evil")
        elif kind == "absolute path":
            add(os.path.join(outside, "evil"))
        elif kind == "symlink out, then through it":
            add(f"{OFFICIAL_FOLDER}/link", type=tarfile.SYMTYPE, linkname=outside)
            add(f"{OFFICIAL_FOLDER}/link/evil")
        elif kind == "relative symlink out":
            add(f"{OFFICIAL_FOLDER}/link", type=tarfile.SYMTYPE, linkname="../../../outside")
            add(f"{OFFICIAL_FOLDER}/link/evil")
        elif kind == "hard link out":
            add(f"{OFFICIAL_FOLDER}/hard", type=tarfile.LNKTYPE, linkname=os.path.join(outside, "target"))
    return open(path, "rb").read()


@pytest.mark.parametrize("kind", ["../evil", "absolute path", "symlink out, then through it", "relative symlink out",
                                  "hard link out"])
def test_a_hostile_tarball_extracts_nothing_outside(tmp_path, monkeypatch, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_bytes(b"keep")
    root = tmp_path / "a" / "dl"
    root.parent.mkdir()
    data = _hostile_tarball(str(tmp_path / "evil.tar.gz"), kind, str(outside))
    monkeypatch.setattr(sources, "OFFICIAL_MD5", md5(data))
    monkeypatch.setattr(sources, "_fetch", lambda url, path: open(path, "wb").write(data))
    before = sorted(p for p in tmp_path.rglob("*") if root not in p.parents and p != root)
    with pytest.raises(DataError, match="cannot be extracted|not the official one") as e:
        download_official(str(root))
    assert "\n" not in str(e.value)
    after = sorted(p for p in tmp_path.rglob("*") if root not in p.parents and p != root)
    assert after == before and (outside / "target").read_bytes() == b"keep", "something was written outside"
    assert sorted(os.listdir(root)) == [".lock", OFFICIAL_ARCHIVE], "nothing extracted is kept"


DRIVER = r"""
import hashlib, json, os, sys, time
from fastcifar.data import sources
root, archive, md5s, log = sys.argv[1:5]
data = open(archive, "rb").read()
sources.OFFICIAL_MD5 = hashlib.md5(data).hexdigest()
sources.OFFICIAL_FILE_MD5 = json.loads(md5s)
def fetch(url, path):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {path}\n")
    time.sleep(1.0)  # long enough for the other process to arrive
    open(path, "wb").write(data)
sources._fetch = fetch
open(log + f".{os.getpid()}.started", "w").close()
print(sources.download_official(root))
"""


def test_two_first_runs_at_once_download_once(tmp_path, official):
    data, files, _ = official
    archive, log, root = str(tmp_path / "served.tar.gz"), str(tmp_path / "fetches"), str(tmp_path / "dl")
    open(archive, "wb").write(data)
    md5s = json.dumps({n: md5(b) for n, b in files.items()})
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, root, archive, md5s, log], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert {o.strip() for o, _ in outs} == {os.path.join(root, OFFICIAL_FOLDER)}
    fetched = open(log).read().splitlines()
    assert len(fetched) == 1, f"downloaded more than once: {fetched}"
    assert_complete(os.path.join(root, OFFICIAL_FOLDER), official)
    assert leftovers(root) == []


def test_a_users_official_folder_needs_every_file(tmp_path):
    folder = str(tmp_path / OFFICIAL_FOLDER)
    write_official(folder, n_per_batch=2)
    assert read_source(folder).splits["train"].images.shape == (10, 32, 32, 3)
    assert read_source(str(tmp_path)).splits["test"].images.shape == (2, 32, 32, 3)  # its parent, too
    os.unlink(os.path.join(folder, "batches.meta"))
    os.unlink(os.path.join(folder, "data_batch_4"))
    for path in (folder, str(tmp_path)):
        with pytest.raises(DataError, match="official CIFAR-10 folder lacks data_batch_4, batches.meta") as e:
            read_source(path)
        assert "\n" not in str(e.value)
    assert not sources._is_official_dir(folder)
