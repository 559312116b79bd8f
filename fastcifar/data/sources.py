"""Read CIFAR-10 from the official python distribution or from an image-folder tree/tarball."""
import codecs
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..io import atomic_write_json, fsync_dir, locked

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
OFFICIAL_FOLDER = "cifar-10-batches-py"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"  # the archive's, as published with it
# the archive's members (the same md5s torchvision checks): an extracted copy is accepted only when all match
OFFICIAL_FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
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
_OFFICIAL_NAMES = [n for names in _OFFICIAL_FILES.values() for n in names] + ["batches.meta"]


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

def _official_missing(path):
    """The official files a folder lacks: [] for a complete one, all of them for a folder that is not one."""
    return [n for n in _OFFICIAL_NAMES if not os.path.isfile(os.path.join(path, n))]


def _is_official_dir(path):
    return not _official_missing(path)


def read_source(path):
    """Read CIFAR-10 from `path` into a Dataset with 'train' and 'test' splits."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, OFFICIAL_FOLDER)):
            missing = _official_missing(folder)
            if missing and len(missing) < len(_OFFICIAL_NAMES):  # some official files, not all: half a copy
                raise DataError(f"{folder}: official CIFAR-10 folder lacks {', '.join(missing)}")
        if _is_official_dir(path):
            splits, kind = read_official_dir(path), "official python batches"
        elif _is_official_dir(os.path.join(path, OFFICIAL_FOLDER)):
            splits, kind = read_official_dir(os.path.join(path, OFFICIAL_FOLDER)), "official python batches"
        else:
            if not any(os.scandir(path)):
                raise DataError(f"{path}: folder is empty")
            splits, kind = _read_image_dir(path), "image folder"
    elif path.lower().endswith(TAR_SUFFIXES):
        splits, kind = _read_tar(path)
    else:
        raise DataError(f"{path}: not a folder or a .tar/.tar.gz/.tgz file")
    return Dataset(f"{os.path.abspath(path)} ({kind})", splits)


# ---------------------------------------------------------------- the official download

def _md5(path):
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record(folder):
    # beside the folder, not in it: the folder's own contents are the source whose fingerprint betons carry
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.verified.json")


def _stats(folder):
    return {n: [st.st_size, st.st_mtime_ns] for n in _OFFICIAL_NAMES for st in [os.stat(os.path.join(folder, n))]}


def _official_md5s(folder):
    return _is_official_dir(folder) and all(_md5(os.path.join(folder, n)) == OFFICIAL_FILE_MD5[n]
                                            for n in _OFFICIAL_NAMES)


def _remember_verified(folder):
    with contextlib.suppress(OSError):  # without the record the next run checks the md5s again, that is all
        atomic_write_json(_record(folder), _stats(folder))


def _download_ok(folder):
    """Whether folder is a complete, verified extraction of the official archive: every file's md5 matched once
    (a folder extracted in place by an older version, possibly half, is checked then), and its sizes and mtimes
    are still the ones recorded then."""
    if not _is_official_dir(folder):
        return False
    try:
        with open(_record(folder)) as f:
            if json.load(f) == _stats(folder):
                return True
    except (OSError, ValueError):
        pass
    try:
        if not _official_md5s(folder):
            return False
    except OSError:
        return False
    _remember_verified(folder)
    return True


def _fetch(url, path):
    """Download url to path (needs a network). Only this touches the network: tests replace it."""
    from torchvision.datasets.utils import download_url
    download_url(url, os.path.dirname(path), os.path.basename(path))


def _remove_leftovers(root):
    # a killed download or extraction leaves these; called with root's lock held, so none is in progress
    for name in os.listdir(root):
        if name.startswith((f"{OFFICIAL_ARCHIVE}.partial-", ".extract-")):
            p = os.path.join(root, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)


def _download_archive(archive):
    """Fetch the official archive to a temporary name, check its md5, rename it into place."""
    tmp = f"{archive}.partial-{os.getpid()}"
    try:
        _fetch(OFFICIAL_URL, tmp)
        got = _md5(tmp)
        if got != OFFICIAL_MD5:
            raise DataError(f"the downloaded {OFFICIAL_ARCHIVE} has md5 {got}, not the official {OFFICIAL_MD5}; "
                            "pass --data PATH or set FASTCIFAR_DATA")
        os.replace(tmp, archive)
        fsync_dir(os.path.dirname(archive))
    except DataError:
        raise
    except Exception as e:  # no route, DNS, HTTP errors: all mean "no network source"
        raise DataError(f"no local CIFAR-10 given and the download failed ({type(e).__name__}: {_one_line(e)}); "
                        "pass --data PATH or set FASTCIFAR_DATA") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _extract_archive(archive, root):
    """Extract the archive into a temporary folder (members that would land outside it, links included, are
    refused by tarfile's data filter), check every file, then rename the folder into place."""
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=root)
    try:
        try:
            with tarfile.open(archive, "r:gz") as tf:
                tf.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"{archive}: cannot be extracted ({type(e).__name__}: {_one_line(e)})") from None
        got = os.path.join(tmp, OFFICIAL_FOLDER)
        if not _official_md5s(got):
            raise DataError(f"{archive}: its {OFFICIAL_FOLDER} is not the official one (files missing or their md5s "
                            "differ)")
        folder = os.path.join(root, OFFICIAL_FOLDER)
        if os.path.lexists(folder):  # an incomplete or damaged extraction of ours: moved aside, then removed
            os.rename(folder, os.path.join(tmp, "old"))
        os.rename(got, folder)
        fsync_dir(root)
        _remember_verified(folder)
        return folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_official(root):
    """The extracted official distribution in root, downloaded (needs a network) and extracted if need be. Under a
    lock on root: two first runs at once download once; a killed one leaves nothing that is taken as complete."""
    folder = os.path.join(root, OFFICIAL_FOLDER)
    if _download_ok(folder):
        return folder
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create the download folder ({e.strerror or type(e).__name__})") from None
    with locked(os.path.join(root, ".lock")):
        if _download_ok(folder):  # another process finished it while we waited
            return folder
        _remove_leftovers(root)
        archive = os.path.join(root, OFFICIAL_ARCHIVE)
        if not (os.path.isfile(archive) and _md5(archive) == OFFICIAL_MD5):  # missing, cut short or damaged
            _download_archive(archive)
        return _extract_archive(archive, root)


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
