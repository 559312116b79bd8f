"""Atomic writes: a temp file in the same folder, fsync, rename, fsync the folder. A crash leaves the old file or
the new one, never half of one; a failed write removes its temp file. Files get the mode the user's umask gives."""
import contextlib
import errno
import fcntl
import json
import os
import secrets


def fsync_dir(folder):
    """Make a rename or a new entry in folder durable (the rename itself lives in the folder, not the file)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot sync a folder; the rename is then as durable as it gets
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _create_temp(folder, name):
    # opened with 0o666 so the kernel applies the umask (and a default ACL), as for any new file; mkstemp's
    # 0o600 would hide results from other users, a fixed 0o644 would override a restrictive umask
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _atomic(path, write):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(d, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def atomic_write_bytes(path, data):
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(fig, path, **kw):
    """fig.savefig(path, **kw), atomically; the format comes from the file name unless given."""
    kw.setdefault("format", os.path.splitext(path)[1][1:] or "png")
    _atomic(path, lambda f: fig.savefig(f, **kw))


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive flock on the file at path (created if needed), waiting for it; the kernel drops it
    when the holder dies, so a killed process never leaves it stuck."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
