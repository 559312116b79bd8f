"""Convert a CIFAR-10 source to FFCV .beton files once, atomically, and read them back."""
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile

import numpy as np

from .sources import CLASSES, SPLITS, DataError, read_source, source_fingerprint

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path, data):
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other users
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


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


def write_beton(split, path, num_workers=None):
    """Write one split with ffcv's DatasetWriter under a temporary name, then rename it into place."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        # raw mode: 32x32 images are tiny and stay bit-exact
        writer = DatasetWriter(tmp, {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                               num_workers=num_workers or max(1, os.cpu_count() or 1))
        writer.from_indexed_dataset(_ArrayDataset(split))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_manifest(folder, fingerprint=None):
    """The manifest if both betons match it (and the source's fingerprint, if given); else why not."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            m = json.load(f)
        if m.get("format_version") != FORMAT_VERSION:
            return None, f"format version {m.get('format_version')} is not {FORMAT_VERSION}"
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


def read_beton(path, num_workers=None):
    """Decode a whole beton with ffcv's Loader into (images uint8 (N,32,32,3), labels int64 (N,))."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    try:
        loader = Loader(path, batch_size=1000, num_workers=num_workers or max(1, os.cpu_count() or 1),
                        order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
        xs, ys = zip(*[(x.copy(), y.copy()) for x, y in loader])
    except Exception as e:  # ffcv raises assorted errors on a damaged file
        raise DataError(f"{path}: not a readable beton ({type(e).__name__}: {e})") from None
    return np.concatenate(xs), np.concatenate(ys).reshape(-1).astype(np.int64)


def default_beton_dir(source):
    """One cache folder per source path, so different sources never share betons."""
    root = os.environ.get("FASTCIFAR_CACHE", os.path.expanduser("~/.cache/fastcifar"))
    key = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:16]
    return os.path.join(root, "betons", key)
