"""Read CIFAR-10 from the official python distribution or from an image-folder tree/tarball."""
import codecs
import io
import os
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass, field

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class DataError(ValueError):
    """Bad or unreadable input data; the message is meant to be shown to the user as is."""


@dataclass
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8, HWC like the files
    labels: np.ndarray  # (N,) int64 in official label order

    def __len__(self):
        return len(self.labels)


@dataclass
class Dataset:
    description: str
    splits: dict = field(default_factory=dict)

    def class_counts(self, split):
        return np.bincount(self.splits[split].labels, minlength=len(CLASSES)).tolist()


# ---------------------------------------------------------------- official python distribution

try:  # numpy >= 2 moved multiarray; official pickles name the old path
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _multiarray


class _RestrictedUnpickler(pickle.Unpickler):
    # the batch files are pickles: only the numpy pieces an array needs may be constructed
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writers of protocol 2 spell bytes as _codecs.encode(str, "latin1"): harmless
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None


def _one_line(e):
    # DataError messages are shown as they are, on one line; tarfile's "r:*" lists each method on its own
    return " ".join(str(e).split())


def _load_batch(fileobj, what):
    try:
        d = _RestrictedUnpickler(fileobj, encoding="bytes").load()
    except Exception as e:  # any malformed pickle is a data error, never a crash
        raise DataError(f"{what}: not a readable CIFAR-10 batch file ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(d, dict):
        raise DataError(f"{what}: not a CIFAR-10 batch file (no dict inside)")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{what}: CIFAR-10 batch file lacks 'data' or 'labels'")
    data, labels = d["data"], d["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{what}: 'data' must be a uint8 array of shape (N, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{what}: 'labels' is not a list of integers") from None
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES))):
        raise DataError(f"{what}: 'labels' must hold {data.shape[0]} integers in 0..9")
    return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)


def _concat(parts):
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


_OFFICIAL_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def read_official_dir(path):
    splits = {}
    for split, names in _OFFICIAL_FILES.items():
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise DataError(f"{path}: official CIFAR-10 folder lacks {', '.join(missing)}")
        parts = []
        for n in names:
            with open(os.path.join(path, n), "rb") as f:
                parts.append(_load_batch(f, os.path.join(path, n)))
        splits[split] = _concat(parts)
    return splits


def _read_official_tar(tf, path, members):
    by_name = {os.path.basename(m.name): m for m in members if m.isfile()}
    splits = {}
    for split, names in _OFFICIAL_FILES.items():
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(f"{path}: official CIFAR-10 tarball lacks {', '.join(missing)}")
        splits[split] = _concat([_load_batch(tf.extractfile(by_name[n]), f"{path}:{n}") for n in names])
    return splits


# ---------------------------------------------------------------- image folders

_IMAGE_PATH = re.compile(r"^(?:.*/)?(train|test)/([^/]+)/([^/]+)$")


def _decode_image(data, what):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (32, 32) or im.mode != "RGB":
                raise DataError(f"{what}: expected a 32x32 RGB image, got {im.size[0]}x{im.size[1]} {im.mode}")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{what}: unreadable image ({e})") from None


def _collect(entries, path):
    """entries: iterable of (relpath, read_bytes_fn). Returns splits in a deterministic order."""
    found = {s: [] for s in SPLITS}
    for rel, read in entries:
        m = _IMAGE_PATH.match(rel.replace(os.sep, "/"))
        if not m or os.path.basename(rel).startswith("."):
            continue
        split, cls, name = m.groups()
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        if cls not in CLASSES:
            raise DataError(f"{path}: unknown class folder '{split}/{cls}' (expected one of {', '.join(CLASSES)})")
        found[split].append((CLASSES.index(cls), name, rel, read))
    if not found["train"] and not found["test"]:
        raise DataError(f"{path}: no CIFAR-10 images found (expected train/<class>/*.png|jpg and test/<class>/*)")
    splits = {}
    for split in SPLITS:
        if not found[split]:
            raise DataError(f"{path}: no '{split}/' split with images")
        items = sorted(found[split], key=lambda t: (t[0], t[1]))
        images = np.stack([_decode_image(read(), f"{path}:{rel}") for _, _, rel, read in items])
        splits[split] = Split(images, np.array([t[0] for t in items], dtype=np.int64))
    return splits


def _read_image_dir(path):
    def entries():
        for root, _, files in os.walk(path):
            for f in files:
                full = os.path.join(root, f)
                yield os.path.relpath(full, path), (lambda p=full: open(p, "rb").read())
    return _collect(entries(), path)


def _check_tar_end(tf):
    # tarfile stops listing members at the first bad header after the first one, as if the archive ended
    # there: a damaged tarball would read "successfully" with images missing. A complete archive has only
    # zero blocks after its last member; reading to the end also makes gzip check its CRC.
    tf.fileobj.seek(tf.offset)
    for chunk in iter(lambda: tf.fileobj.read(1 << 20), b""):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"damaged member header at byte {tf.offset}, after {len(tf.members)} members")


def _read_tar(path):
    try:
        with tarfile.open(path, "r:*") as tf:
            members = tf.getmembers()
            if any(os.path.basename(m.name) == "data_batch_1" for m in members):
                splits, kind = _read_official_tar(tf, path, members), "official python tarball"
            else:
                blobs, kind = [(m.name, tf.extractfile(m).read()) for m in members if m.isfile()], None
            _check_tar_end(tf)  # after the members were read: a forward seek, no second pass through gzip
    except DataError:
        raise
    # gzip's own errors are OSError subclasses, but a damaged deflate stream raises zlib.error
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        raise DataError(f"{path}: not a readable tarball ({type(e).__name__}: {_one_line(e)})") from None
    if kind:
        return splits, kind
    return _collect(((name, (lambda b=b: b)) for name, b in blobs), path), "image-folder tarball"


# ---------------------------------------------------------------- entry point

def _is_official_dir(path):
    return os.path.isfile(os.path.join(path, "data_batch_1")) or os.path.isfile(os.path.join(path, "test_batch"))


def read_source(path):
    """Read CIFAR-10 from `path` into a Dataset with 'train' and 'test' splits."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if _is_official_dir(path):
            splits, kind = read_official_dir(path), "official python batches"
        elif _is_official_dir(os.path.join(path, "cifar-10-batches-py")):
            splits, kind = read_official_dir(os.path.join(path, "cifar-10-batches-py")), "official python batches"
        else:
            if not any(os.scandir(path)):
                raise DataError(f"{path}: folder is empty")
            splits, kind = _read_image_dir(path), "image folder"
    elif path.lower().endswith(TAR_SUFFIXES):
        splits, kind = _read_tar(path)
    else:
        raise DataError(f"{path}: not a folder or a .tar/.tar.gz/.tgz file")
    return Dataset(f"{os.path.abspath(path)} ({kind})", splits)


def download_official(root):
    """Fetch the official tarball with torchvision (needs a network); returns the extracted folder."""
    from torchvision.datasets.utils import download_and_extract_archive
    folder = os.path.join(root, "cifar-10-batches-py")
    if not _is_official_dir(folder):
        try:
            download_and_extract_archive(OFFICIAL_URL, root, md5=None)
        except Exception as e:  # no route, DNS, HTTP errors: all mean "no network source"
            raise DataError(f"no local CIFAR-10 given and the download failed ({type(e).__name__}: {e}); "
                            "pass --data PATH or set FASTCIFAR_DATA") from None
    return folder


def resolve_source(path=None, download_root=None):
    """--data wins, then $FASTCIFAR_DATA, then a download of the official distribution."""
    path = path or os.environ.get("FASTCIFAR_DATA")
    if path:
        return os.path.abspath(os.path.expanduser(path))
    return download_official(download_root or os.path.expanduser("~/.cache/fastcifar/download"))


def source_fingerprint(path):
    """Cheap identity of a source: a change in any file's size or mtime invalidates derived betons."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return {"path": path, "files": 1, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = nbytes = newest = 0
    for root, _, names in os.walk(path):
        for n in names:
            st = os.stat(os.path.join(root, n))
            files, nbytes, newest = files + 1, nbytes + st.st_size, max(newest, st.st_mtime_ns)
    return {"path": path, "files": files, "bytes": nbytes, "mtime_ns": newest}
