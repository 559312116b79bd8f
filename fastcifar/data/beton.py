"""Convert a CIFAR-10 source to FFCV .beton files once, atomically, and read them back."""
import _thread
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time

import numpy as np

from ..device import default_workers
from ..io import atomic_write_json
from .sources import CLASSES, SPLITS, DataError, read_source, source_fingerprint

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(folder):
    # concurrent runs on one folder: the second waits, then finds the first one's betons valid
    with open(os.path.join(folder, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _ArrayDataset:
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split.images[i], int(self.split.labels[i])


_PAGE = 1 << 23  # ffcv's default page size, named so the space estimate below uses the same


def _beton_bytes_bound(n, num_workers, image_bytes=32 * 32 * 3, chunk=100):
    """An upper bound on the size of a beton of n raw images. ffcv writes whole pages: the header and
    per-sample metadata take the first ones, each worker (one per chunk of samples at most) fills pages of
    its own and ends on a partly filled one, and the allocation table follows the last page."""
    workers = max(1, min(num_workers, -(-n // chunk)))
    pages = -(-(4096 + 64 * n) // _PAGE) + -(-n // (_PAGE // image_bytes)) + workers
    return pages * _PAGE + 64 * n


def _check_free_space(path, need):
    # a worker that dies on a full disk fails the conversion only after it has filled the disk (and on its own
    # ffcv would wait for it for ever), so refuse up front rather than start a conversion that cannot finish
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except (OSError, AttributeError):  # no statvfs: nothing to check
        return
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise DataError(f"not enough free disk space for {os.path.basename(path)} in "
                        f"{os.path.dirname(os.path.abspath(path))}: it needs up to {need / 1e6:.0f} MB, "
                        f"{free / 1e6:.0f} MB are free")


_forking = False  # True between fork and the last at-fork callback, where an exception is printed and dropped


def _set_forking(on):
    global _forking
    _forking = on


os.register_at_fork(before=lambda: _set_forking(True), after_in_parent=lambda: _set_forking(False),
                    after_in_child=lambda: _set_forking(False))


class _WriterWatch(threading.Thread):
    """Turns the two ways ffcv's writer waits for ever into an exception in the main thread. ffcv polls a
    counter its workers raise and never looks at the workers themselves, so it hangs when one dies, and when
    the parent's KeyboardInterrupt is swallowed: Ctrl-C can land in an at-fork or ctypes callback, where
    Python prints an exception and goes on. The workers, meanwhile, left on the same Ctrl-C."""

    GRACE = 1.0  # seconds the main thread gets to unwind on its own before it is interrupted again

    def __init__(self):
        super().__init__(daemon=True, name="fastcifar-writer-watch")
        self.before = set(multiprocessing.active_children())
        self.workers, self.died, self.since, self.sigint = set(), None, None, False
        self.finished, self.prev, self.pid = threading.Event(), None, os.getpid()

    def __enter__(self):
        prev = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread() and prev is not signal.SIG_IGN:
            self.prev = prev
            signal.signal(signal.SIGINT, self._on_sigint)
        self.start()
        return self

    def _on_sigint(self, signum, frame):
        if os.getpid() != self.pid:  # a forked writer worker: Ctrl-C reached the group, the parent reports it
            os._exit(130)  # not SystemExit, which numba's ctypes callbacks would print and drop
        self.sigint = True
        if _forking:  # raised here it would be lost; run() interrupts the main thread again after the fork
            return
        if callable(self.prev):
            self.prev(signum, frame)
        raise KeyboardInterrupt

    def run(self):
        while not self.finished.wait(0.1):
            self.workers |= set(multiprocessing.active_children()) - self.before
            codes = [p.exitcode for p in self.workers if p.exitcode not in (None, 0)]
            if not (self.sigint or codes):
                continue
            self.since = self.since or time.monotonic()
            if time.monotonic() - self.since > self.GRACE:
                if codes and codes[0] != 130 and not self.sigint:  # 130: a worker that left on Ctrl-C
                    self.died = codes[0]
                _thread.interrupt_main()
                self.since = time.monotonic()  # and again, should this one be swallowed too

    def __exit__(self, *exc):
        self.finished.set()
        self.join()
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)
        for p in self.workers | (set(multiprocessing.active_children()) - self.before):
            p.terminate()  # workers still writing would keep the interpreter from exiting (it joins them)
            p.join(5)


def write_beton(split, path, num_workers=None):
    """Write one split with ffcv's DatasetWriter under a temporary name, then rename it into place."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    tmp = f"{path}.partial-{os.getpid()}"
    num_workers = num_workers or default_workers()
    _check_free_space(path, _beton_bytes_bound(len(split), num_workers))
    writer, watch = None, _WriterWatch()
    try:
        with watch:
            # raw mode: 32x32 images are tiny and stay bit-exact
            writer = DatasetWriter(tmp, {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                                   num_workers=num_workers, page_size=_PAGE)
            writer.from_indexed_dataset(_ArrayDataset(split))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # ffcv unlinks its shared metadata block only after a complete write; interrupted, it would be left
        # to the resource tracker, which complains about a leak after our own message
        shm = getattr(writer, "metadata_sm", None)
        if hasattr(shm, "unlink"):
            with contextlib.suppress(Exception):
                shm.unlink()
            with contextlib.suppress(Exception):
                shm.close()
        if watch.died is not None:
            raise DataError(f"an ffcv writer worker died (exit code {watch.died}) while writing "
                            f"{os.path.basename(path)}; nothing was kept") from None
        raise


def check_manifest(folder, fingerprint=None):
    """The manifest if both betons match it (and the source's fingerprint, if given); else why not."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            m = json.load(f)
        if not isinstance(m, dict):
            return None, f"unreadable {MANIFEST} (not a JSON object)"
        if m.get("format_version") != FORMAT_VERSION:
            return None, f"format version {m.get('format_version')} is not {FORMAT_VERSION}"
        if not _consistent(m):
            return None, f"{MANIFEST} is damaged (its fields do not agree with each other)"
        if fingerprint is not None and m.get("source") != fingerprint:
            return None, "the source changed since conversion"
        for split in SPLITS:
            info = m["splits"][split]
            p = os.path.join(folder, f"{split}.beton")
            # size is cheap; the hash catches a same-size beton that was overwritten
            if os.path.getsize(p) != info["bytes"] or _sha256(p) != info["sha256"]:
                return None, f"{split}.beton is truncated or corrupt (it does not match {MANIFEST})"
        return m, None
    except FileNotFoundError as e:
        return None, f"{os.path.basename(e.filename or '')} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable {MANIFEST} ({type(e).__name__})"


def _consistent(m):
    """A damaged manifest can still parse: its fields must have the shapes ensure_betons writes and agree."""
    splits = m.get("splits")
    if m.get("classes") != list(CLASSES) or not isinstance(m.get("description"), str) \
            or not isinstance(splits, dict) or set(splits) != set(SPLITS):
        return False
    for info in splits.values():
        counts = info.get("per_class") if isinstance(info, dict) else None
        if not (isinstance(counts, list) and len(counts) == len(CLASSES)
                and all(type(c) is int and c >= 0 for c in counts) and info.get("images") == sum(counts)
                and type(info.get("images")) is int and type(info.get("bytes")) is int
                and isinstance(info.get("sha256"), str)):
            return False
    return True


def _manifest_ok(folder, fingerprint):
    return check_manifest(folder, fingerprint)[0]


def is_beton_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def prepare_betons(source, beton_dir=None, progress=print):
    """(folder, manifest) of valid betons: a converted folder as given, else the source converted once."""
    if is_beton_folder(source):
        m, why = check_manifest(source)
        if m is None:
            raise DataError(f"{source}: beton folder is not usable: {why}; "
                            "re-create it with python -m fastcifar.data")
        return source, m
    folder = beton_dir or default_beton_dir(source)
    return folder, ensure_betons(source, folder, progress)


def ensure_betons(source, folder, progress=print):
    """Return the manifest of valid train/test betons for `source` in `folder`, converting if needed."""
    os.makedirs(folder, exist_ok=True)
    fingerprint = source_fingerprint(source)
    m = _manifest_ok(folder, fingerprint)
    if m:
        return m
    with _locked(folder):
        m = _manifest_ok(folder, fingerprint)  # another process may have finished while we waited
        if m:
            return m
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, MANIFEST))  # betons below are stale until a new manifest says so
        _remove_leftovers(folder)
        progress(f"converting {source} to FFCV betons in {folder} (once)")
        ds = read_source(source)
        m = {"format_version": FORMAT_VERSION, "source": fingerprint, "description": ds.description,
             "classes": list(CLASSES), "splits": {}}
        for split in SPLITS:
            p = os.path.join(folder, f"{split}.beton")
            write_beton(ds.splits[split], p)
            m["splits"][split] = {"images": len(ds.splits[split]), "per_class": ds.class_counts(split),
                                  "bytes": os.path.getsize(p), "sha256": _sha256(p)}
        atomic_write_json(os.path.join(folder, MANIFEST), m)
        return m


def _remove_leftovers(folder):
    """Partial betons and manifest temp files of a killed conversion. Called with the folder's lock held:
    every writer holds it, so whatever is found is stale, not another process's work in progress."""
    prefixes = tuple(f"{split}.beton.partial-" for split in SPLITS) + (f".{MANIFEST}.",)
    for name in os.listdir(folder):
        if name.startswith(prefixes):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def read_beton(path, num_workers=None, indices=None):
    """Decode a beton (or its `indices`) with ffcv's Loader into (images uint8 (N,32,32,3), labels int64 (N,))."""
    import torch
    threads = torch.get_num_threads()  # before the import: importing ffcv sets torch to one thread
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    try:
        loader = Loader(path, batch_size=1000, num_workers=num_workers or default_workers(),
                        order=OrderOption.SEQUENTIAL, drop_last=False,
                        indices=None if indices is None else np.asarray(indices, dtype=np.uint64),
                        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
        xs, ys = zip(*[(x.copy(), y.copy()) for x, y in loader])
    except Exception as e:  # ffcv raises assorted errors on a damaged file
        raise DataError(f"{path}: not a readable beton ({type(e).__name__}: {e})") from None
    finally:
        torch.set_num_threads(threads)  # ffcv's Loader sets torch's thread count to its worker count
    images, labels = np.concatenate(xs), np.concatenate(ys).reshape(-1).astype(np.int64)
    # ffcv checks nothing: a damaged beton decodes to wrong pixels or labels. Only the manifest's sha256
    # (prepare_betons, ensure_betons) catches the former; an impossible label at least is caught here.
    if images.shape[1:] != (32, 32, 3) or (labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES))):
        raise DataError(f"{path}: damaged beton (images of shape {images.shape[1:]} or labels outside 0..9)")
    return images, labels


def default_beton_dir(source):
    """One cache folder per source path, so different sources never share betons."""
    root = os.environ.get("FASTCIFAR_CACHE", os.path.expanduser("~/.cache/fastcifar"))
    key = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:16]
    return os.path.join(root, "betons", key)
