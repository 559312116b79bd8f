"""Run folders: a fresh one per run, a lock while a run writes into one, and runs/latest pointing at the newest.
A finished run is never overwritten without being asked to."""
import contextlib
import errno
import fcntl
import os
import socket
import time

from .device import ConfigError
from .io import fsync_dir

LOCK = ".lock"
RUN_FILES = ("metrics.json", "model.pt")  # a folder holding either holds a started or finished run


class RunDirError(ConfigError):
    """A run folder that cannot be used; the message is shown to the user as is."""


def _why(e):
    return e.strerror or type(e).__name__


def new_run_dir(root, name):
    """Create and return a folder of its own for a new run: root/<name>-<YYYYmmdd-HHMMSS>, with -2, -3, ... added
    when another run took that second. mkdir is atomic, so two runs started at once never share one."""
    stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{root}: cannot create the runs folder ({_why(e)})") from None
    for i in range(1, 10_000):
        path = os.path.join(root, stamp if i == 1 else f"{stamp}-{i}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise RunDirError(f"{path}: cannot create the run folder ({_why(e)})") from None
    raise RunDirError(f"{root}: no free run folder name for {stamp}")


def _holder(fd):
    try:
        words = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        words = []
    return f"pid {words[0]} on {words[1]}" if len(words) >= 2 else "a process that has not written its pid yet"


@contextlib.contextmanager
def claim(out, *, resume=False, overwrite=False):
    """Hold out (created if needed) for one run until the block exits: an exclusive lock on out/.lock that a second
    live run is refused, at once, naming the holder. The kernel drops a flock when its holder dies, so a killed
    run's lock is simply taken over. Without resume or overwrite, a folder that already holds a run is refused."""
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise RunDirError(f"{out}: cannot use it as a run folder ({_why(e)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirError(f"{out}: cannot lock it ({_why(e)})") from None
            raise RunDirError(f"{out} is in use by another run ({_holder(fd)}); wait for it to finish or "
                              "choose another --out") from None
        if not (resume or overwrite):
            found = [n for n in RUN_FILES if os.path.lexists(os.path.join(out, n))]
            if found:
                raise RunDirError(f"{out} already holds a run ({' and '.join(found)}); continue it with "
                                  f"--resume {out}, replace it with --overwrite, or choose another --out")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield out
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a later contender must not name a process that is gone
    finally:
        os.close(fd)  # releases the lock


def point_latest(root, path):
    """Make root/latest a relative symlink to path, swapped in atomically; True when done. A real folder there
    (the old layout, where runs/latest was the run itself) is left alone: False."""
    link = os.path.join(root, "latest")
    if os.path.lexists(link) and not os.path.islink(link):
        return False
    target = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    tmp = os.path.join(root, f".latest.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)  # rename replaces the old symlink itself, never what it points at
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if os.path.lexists(link) and not os.path.islink(link):  # a folder appeared there meanwhile
            return False
        raise
    fsync_dir(root)
    return True
