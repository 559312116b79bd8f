"""Cache a CIFAR-10 source as plain numpy arrays, once and atomically, for the resident loader without ffcv.

One `.npy` per split (`train.npy`, `test.npy`): a structured array of records ("label" uint8, "image" uint8
32x32x3 HWC) in the source's order, so `np.load("train.npy")["image"]` holds exactly what `train.beton` holds.
`arrays.json` beside them records the source fingerprint, counts per class, and each file's size and sha256;
it is written last, so files without a matching manifest are never trusted. The names differ from the betons',
so one folder can hold both; any other non-empty folder is refused, since the cache replaces files by name.
"""
import contextlib
import hashlib
import os

import numpy as np

from ..io import _atomic, fsync_dir
from . import beton
from .beton import _check_free_space, check_files, convert_once
from .sources import CLASSES, SPLITS, DataError

FORMAT_VERSION = 1
MANIFEST = "arrays.json"
MARKER = ".fastcifar-arrays"  # written into a folder before any array file: the folder is ours to write into
SUFFIX = ".npy"
RECORD = np.dtype([("label", np.uint8), ("image", np.uint8, (32, 32, 3))])


def split_path(folder, split):
    return os.path.join(folder, f"{split}{SUFFIX}")


def is_array_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def default_array_dir(source):
    """One cache folder per source path, beside the betons' (same key), so different sources never share arrays."""
    root = os.environ.get("FASTCIFAR_CACHE", os.path.expanduser("~/.cache/fastcifar"))
    key = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:16]
    return os.path.join(root, "arrays", key)


def _claim_folder(folder):
    """A new or empty folder, one marked as ours, or a beton folder (whose files have other names): mark it.
    Anything else is refused before a file in it is touched."""
    try:
        os.makedirs(folder, exist_ok=True)
        names = set(os.listdir(folder))
    except OSError as e:
        raise DataError(f"{folder}: cannot use it for the array cache ({e.strerror or type(e).__name__})") from None
    if MARKER in names:
        return
    betons = {getattr(beton, "MARKER", None), beton.MANIFEST} & names
    if names - {".lock"} and not betons:
        raise DataError(f"{folder}: not empty and not a fastcifar cache folder, so no array is written into it; "
                        "name a new or empty folder")
    with open(os.path.join(folder, MARKER), "w") as f:
        f.write("fastcifar array cache: train.npy, test.npy and arrays.json are written here\n")
    fsync_dir(folder)


def write_split(split, path):
    """One split as a .npy of RECORDs under a temporary name, fsynced, renamed into place."""
    records = np.empty(len(split), RECORD)
    records["label"], records["image"] = split.labels, split.images
    _check_free_space(path, records.nbytes + (1 << 20))
    try:
        _atomic(path, lambda f: np.lib.format.write_array(f, records, allow_pickle=False))
    except OSError as e:
        raise DataError(f"{path}: cannot write the array cache ({e.strerror or type(e).__name__})") from None


def read_arrays(path):
    """(images uint8 (N,32,32,3), labels int64 (N,)) from one split's .npy, refusing anything but RECORDs."""
    try:
        records = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such array file") from None
    except (OSError, ValueError, EOFError) as e:  # truncated, a bad header, or not a .npy at all
        raise DataError(f"{path}: not a readable array file ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if records.dtype != RECORD or records.ndim != 1:
        raise DataError(f"{path}: not a fastcifar array file (dtype {records.dtype}, shape {records.shape})")
    images, labels = np.ascontiguousarray(records["image"]), records["label"].astype(np.int64)
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"{path}: damaged array file (labels outside 0..9)")
    return images, labels


def check_arrays(folder, fingerprint=None):
    """The manifest if both split files match it (and the source's fingerprint, if given); else why not."""
    kind = lambda m: None if (m.get("format_version"), m.get("kind")) == (FORMAT_VERSION, "arrays") else \
        f"format {m.get('kind')} version {m.get('format_version')} is not arrays {FORMAT_VERSION}"  # noqa: E731
    return check_files(folder, MANIFEST, fingerprint, kind, lambda split: split_path(folder, split))


def ensure_arrays(source, folder, progress=print):
    """Return the manifest of valid train/test arrays for `source` in `folder`, reading the source if needed."""
    _claim_folder(folder)
    return convert_once(source, folder, lambda f, fp: check_arrays(f, fp)[0], write_split,
                        lambda split: split_path(folder, split), MANIFEST, _remove_leftovers,
                        f"reading {source} into arrays in {folder} (once)",
                        {"format_version": FORMAT_VERSION, "kind": "arrays"}, progress)


def _remove_leftovers(folder):
    """Temporary files of a killed write (io's `.<name>.*.tmp`); called with the folder's lock held."""
    prefixes = tuple(f".{split}{SUFFIX}." for split in SPLITS) + (f".{MANIFEST}.",)
    for name in os.listdir(folder):
        if name.startswith(prefixes) and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
