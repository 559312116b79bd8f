"""Atomic writes: a temp file in the same folder, fsync, rename. A crash leaves the old file or the new one,
never half of one; a failed write removes its temp file."""
import contextlib
import json
import os
import tempfile


def _atomic(path, write):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other users
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
