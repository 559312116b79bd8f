"""Convert a CIFAR-10 source to FFCV .beton files once, atomically, and read them back."""
import _thread
import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time

import numpy as np

from ..device import default_workers
from ..io import atomic_write_json, fsync_dir, locked
from .sources import CLASSES, SPLITS, DataError, read_source, source_fingerprint

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MARKER = ".fastcifar-betons"  # written into a folder before any beton: the folder is ours to clean up


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _locked(folder):
    # concurrent runs on one folder: the second waits, then finds the first one's betons valid
    return locked(os.path.join(folder, ".lock"))


# ---------------------------------------------------------------- the file format, checked before ffcv reads it
# ffcv 1.0.2 (ffcv/types.py, reader.py, fields/): a header, one descriptor per field, one metadata row per sample,
# the data pages, and from alloc_table_ptr to the end of the file one allocation per stored blob. ffcv's raw decode
# copies an allocation's `size` bytes into a 32x32x3 slot and looks a blob up by its metadata pointer, unchecked.
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                    ("alloc_table_ptr", "<u8")], align=True)
_FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_META = np.dtype([("image", np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])),
                  ("label", "<i8")], align=True)
_VERSION, _RAW, _IMAGE_BYTES = 2, 1, 32 * 32 * 3
_FIELDS = ((2, "image"), (1, "label"))  # ffcv's type ids of RGBImageField and IntField, in the order we write
_META_START = _HEADER.itemsize + len(_FIELDS) * _FIELD.itemsize  # the metadata table follows the descriptors


def _parse_beton(path):
    """(labels, why): the labels of a beton that is exactly what write_beton writes, or why it is not."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_META_START)
            if len(head) < _META_START:
                return None, f"{size} bytes, shorter than a beton's header"
            h = np.frombuffer(head, _HEADER, 1)[0]
            n, table, page = int(h["num_samples"]), int(h["alloc_table_ptr"]), int(h["page_size"])
            if h["version"] != _VERSION:
                return None, f"format version {h['version']}, not ffcv's {_VERSION}"
            if h["num_fields"] != len(_FIELDS):
                return None, f"{h['num_fields']} fields, not an image and a label"
            if page < 4096 or page & (page - 1):
                return None, f"page size {page} is not a power of two of at least 4096"
            fields = np.frombuffer(head, _FIELD, len(_FIELDS), _HEADER.itemsize)
            for (type_id, name), fd in zip(_FIELDS, fields):
                if fd["type_id"] != type_id or fd["name"].tobytes() != name.encode().ljust(16, b"\0") \
                        or fd["arguments"].any():
                    return None, "its fields are not a raw RGB image and an int label"
            data_start = _META_START + n * _META.itemsize
            if n < 1 or data_start > table or table > size or size - table != n * _ALLOC.itemsize:
                return None, (f"its header ({n} samples, allocation table at byte {table}) does not fit its "
                              f"{size} bytes")
            meta = np.frombuffer(f.read(n * _META.itemsize), _META)
            f.seek(table)
            alloc = np.frombuffer(f.read(), _ALLOC)
    except OSError as e:
        return None, f"unreadable ({e.strerror or type(e).__name__})"
    if len(meta) != n or len(alloc) != n:  # the file changed while it was read
        return None, "it changed while being read"
    ids, ptrs = alloc["sample_id"], alloc["ptr"]
    if not np.array_equal(np.sort(ids), np.arange(n, dtype=np.uint64)):
        return None, f"its allocation table does not list samples 0..{n - 1} once each"
    sizes = alloc["size"]
    if (sizes != _IMAGE_BYTES).any():
        i = int(np.flatnonzero(sizes != _IMAGE_BYTES)[0])
        return None, f"sample {ids[i]}'s image takes {sizes[i]} bytes, not {_IMAGE_BYTES}"
    if table - _IMAGE_BYTES < data_start or (ptrs < data_start).any() or (ptrs > table - _IMAGE_BYTES).any():
        return None, "an image pointer lies outside the file's data region"
    if (np.diff(np.sort(ptrs)) < _IMAGE_BYTES).any():
        return None, "two images overlap"
    img = meta["image"]
    if (img["mode"] != _RAW).any() or (img["width"] != 32).any() or (img["height"] != 32).any():
        return None, "its metadata does not describe raw 32x32 images"
    by_sample = np.empty(n, np.uint64)
    by_sample[ids] = ptrs
    if (img["data_ptr"] != by_sample).any():
        return None, "its metadata points at other bytes than its allocation table"
    labels = meta["label"]
    if ((labels < 0) | (labels >= len(CLASSES))).any():
        return None, f"labels outside 0..{len(CLASSES) - 1}"
    return labels.astype(np.int64), None


def validate_beton(path):
    """The number of samples in the beton at path, after checking its header, field descriptors, metadata and whole
    allocation table against the file itself: exactly the two fields this project writes, every image one raw 32x32x3
    blob inside the file, sample ids complete and unique, labels in 0..9. Anything else is a one-line DataError.
    ffcv's Loader trusts all of it (a size it reads there is how many bytes it copies), so call this before one."""
    labels, why = _parse_beton(path)
    if why:
        raise DataError(f"{path}: not a beton this project can read: {why}")
    return len(labels)


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
        fsync_dir(os.path.dirname(os.path.abspath(path)))
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
    def readable(p, info):  # the sha256 is the manifest's own word: the file must also be one ffcv reads safely
        labels, why = _parse_beton(p)
        if why:
            return f"{os.path.basename(p)} is not a beton this project can read: {why}"
        if np.bincount(labels, minlength=len(CLASSES)).tolist() != info["per_class"]:
            return f"{os.path.basename(p)}'s labels do not match {MANIFEST}"
        return None
    version = lambda m: None if m.get("format_version") == FORMAT_VERSION else \
        f"format version {m.get('format_version')} is not {FORMAT_VERSION}"  # noqa: E731
    return check_files(folder, MANIFEST, fingerprint, version, lambda split: os.path.join(folder, f"{split}.beton"),
                       readable)


def check_files(folder, manifest_name, fingerprint, accepts, path_of, also=None):
    """(manifest, None) when folder's manifest is well formed, accepts(manifest) finds nothing wrong, it matches the
    source's fingerprint (if given), and each split's file its size and sha256 (and also(path, info) finds nothing
    wrong); else (None, why not)."""
    try:
        with open(os.path.join(folder, manifest_name)) as f:
            m = json.load(f)
        if not isinstance(m, dict):
            return None, f"unreadable {manifest_name} (not a JSON object)"
        why = accepts(m)
        if why:
            return None, why
        if not _consistent(m):
            return None, f"{manifest_name} is damaged (its fields do not agree with each other)"
        if fingerprint is not None and m.get("source") != fingerprint:
            return None, "the source changed since conversion"
        for split in SPLITS:
            info, p = m["splits"][split], path_of(split)
            # size is cheap; the hash catches a same-size file that was overwritten
            if os.path.getsize(p) != info["bytes"] or _sha256(p) != info["sha256"]:
                return None, f"{os.path.basename(p)} is truncated or corrupt (it does not match {manifest_name})"
            why = also(p, info) if also else None
            if why:
                return None, why
        return m, None
    except FileNotFoundError as e:
        return None, f"{os.path.basename(e.filename or '')} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable {manifest_name} ({type(e).__name__})"


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


def _our_manifest(folder):
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "format_version" in m and "source" in m and "splits" in m


def _leftover(name):
    return name.startswith(tuple(f"{split}.beton.partial-" for split in SPLITS) + (f".{MANIFEST}.",))


def _claim_folder(folder):
    """Make sure folder is ours to convert into: new or empty, already marked, or a beton folder we wrote (its
    manifest, or nothing but our own lock and leftovers); mark it. Any other folder is refused: conversion
    removes and replaces files by name."""
    try:
        os.makedirs(folder, exist_ok=True)
        names = os.listdir(folder)
    except OSError as e:
        raise DataError(f"{folder}: cannot use it as a beton folder ({e.strerror or type(e).__name__})") from None
    if MARKER in names:
        return
    arrays = ".fastcifar-arrays" in names  # the array cache's marker (arrays.MARKER): its files have other names
    if names and not arrays and not _our_manifest(folder) and not all(n == ".lock" or _leftover(n) for n in names):
        raise DataError(f"{folder}: not empty and not a fastcifar beton folder, so nothing is converted into it; "
                        "name a new or empty folder (--beton-dir)")
    with open(os.path.join(folder, MARKER), "w") as f:
        f.write("fastcifar beton folder: train.beton, test.beton and manifest.json are converted here\n")
    fsync_dir(folder)


def ensure_betons(source, folder, progress=print):
    """Return the manifest of valid train/test betons for `source` in `folder`, converting if needed. Only a new,
    empty or fastcifar beton folder is used; any other is a DataError, and nothing in it is touched."""
    _claim_folder(folder)
    return convert_once(source, folder, _manifest_ok, write_beton, lambda split: os.path.join(folder, f"{split}.beton"),
                        MANIFEST, _remove_leftovers, f"converting {source} to FFCV betons in {folder} (once)",
                        {"format_version": FORMAT_VERSION}, progress)


def convert_once(source, folder, valid, write, path_of, manifest_name, remove_leftovers, message, header,
                 progress=print):
    """The manifest of `folder`'s files for `source`: valid(folder, fingerprint) if they are, else, under the
    folder's lock (a second process waits, then finds the first one's files valid), the source read once, each
    split written with write(split, path) and the manifest written last, so no file is trusted before it is."""
    fingerprint = source_fingerprint(source)
    m = valid(folder, fingerprint)
    if m:
        return m
    with _locked(folder):
        m = valid(folder, fingerprint)
        if m:
            return m
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, manifest_name))  # the files below are stale until a new manifest says so
        remove_leftovers(folder)
        progress(message)
        ds = read_source(source)
        m = {**header, "source": fingerprint, "description": ds.description, "classes": list(CLASSES), "splits": {}}
        for split in SPLITS:
            p = path_of(split)
            write(ds.splits[split], p)
            m["splits"][split] = {"images": len(ds.splits[split]), "per_class": ds.class_counts(split),
                                  "bytes": os.path.getsize(p), "sha256": _sha256(p)}
        atomic_write_json(os.path.join(folder, manifest_name), m)
        return m


def _remove_leftovers(folder):
    """Partial betons and manifest temp files of a killed conversion. Called with the folder's lock held:
    every writer holds it, so whatever is found is stale, not another process's work in progress."""
    for name in os.listdir(folder):
        if _leftover(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def read_beton(path, num_workers=None, indices=None):
    """Decode a beton (or its `indices`) with ffcv's Loader into (images uint8 (N,32,32,3), labels int64 (N,))."""
    import torch
    n = validate_beton(path)  # before ffcv: its Loader trusts every size and pointer in the file
    if indices is not None:
        indices = np.asarray(indices)
        if indices.size and (indices.dtype.kind not in "iu" or indices.min() < 0 or indices.max() >= n):
            raise DataError(f"{path}: sample indices outside 0..{n - 1}")
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
    # validate_beton vouches for the structure; changed pixels (no checksum in ffcv's format) only the manifest's
    # sha256 catches (prepare_betons, ensure_betons). A file changed between the check and the read lands here.
    want = n if indices is None else len(indices)
    if images.shape != (want, 32, 32, 3) or (labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES))):
        raise DataError(f"{path}: damaged beton ({images.shape[0]} images of shape {images.shape[1:]} "
                        f"or labels outside 0..9)")
    return images, labels


def default_beton_dir(source):
    """One cache folder per source path, so different sources never share betons."""
    root = os.environ.get("FASTCIFAR_CACHE", os.path.expanduser("~/.cache/fastcifar"))
    key = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:16]
    return os.path.join(root, "betons", key)
