"""Atomic writes keep the user's umask and make the rename itself durable (the folder is fsynced after it)."""
import os
import stat

import pytest

import fastcifar.io as fio
from fastcifar.checkpoint import save_checkpoint


@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o077, 0o027, 0o022, 0o002])
def test_files_keep_the_users_umask(tmp_path, umask, mask):
    umask(mask)
    paths = [str(tmp_path / n) for n in ("m.json", "b.bin", "model.pt")]
    fio.atomic_write_json(paths[0], {"a": 1})
    fio.atomic_write_bytes(paths[1], b"x")
    save_checkpoint(paths[2], {"model": {}})
    for p in paths:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~mask, (p, oct(os.stat(p).st_mode))
    fio.atomic_write_json(paths[0], {"a": 2})  # replacing a file: the same
    assert stat.S_IMODE(os.stat(paths[0]).st_mode) == 0o666 & ~mask


def test_the_folder_is_fsynced_after_each_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.basename(b)))
        return real_replace(a, b)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fio.atomic_write_text(str(tmp_path / "a.txt"), "hello")
    assert events == [("fsync", "file"), ("replace", "a.txt"), ("fsync", "folder")]
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = str(tmp_path / "m.json")
    fio.atomic_write_json(p, {"v": 1})

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        fio._atomic(p, boom)
    assert open(p).read() == '{\n  "v": 1\n}\n' and os.listdir(tmp_path) == ["m.json"]
