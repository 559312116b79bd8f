"""One entry point for training's data: betons wherever ffcv imports, else the source cached as plain arrays.

Both hold the same uint8 pixels in the same order, so the resident loader yields the same batches from either.
"""
import os
from dataclasses import dataclass

from .arrays import check_arrays, default_array_dir, ensure_arrays, is_array_folder, split_path
from .beton import is_beton_folder, prepare_betons
from .sources import SPLITS, DataError

FFCV_INSTALL = 'pip install "fastcifar[ffcv]"'
KINDS = ("beton", "arrays")


def ffcv_problem():
    """None if ffcv imports here, else why not, in a few words. Importing it is the only test that counts: an
    installed ffcv still fails without its system libraries."""
    import torch
    threads = torch.get_num_threads()  # importing ffcv sets torch to one thread
    try:
        import ffcv  # noqa: F401
        return None
    except ImportError as e:
        return "ffcv is not installed" if e.name == "ffcv" else f"ffcv cannot be imported ({e})"
    except Exception as e:  # a broken build: missing shared libraries, numba errors
        return f"ffcv cannot be imported ({type(e).__name__}: {' '.join(str(e).split())})"
    finally:
        torch.set_num_threads(threads)


def ffcv_available():
    return ffcv_problem() is None


@dataclass(frozen=True)
class PreparedData:
    kind: str      # "beton" or "arrays"
    folder: str
    manifest: dict  # description, classes, splits[split]["images"], ...
    paths: dict     # {"train": path, "test": path}: what ResidentLoader (and, for betons, FFCVLoader) reads


def prepare_data(source, cache_dir=None, progress=print, kind=None):
    """Valid split files for `source` (a path already resolved, e.g. by resolve_source), converted once into
    `cache_dir` (default: one folder per source under $FASTCIFAR_CACHE). `kind` None picks betons when ffcv
    imports and arrays otherwise; "arrays" or "beton" asks for one."""
    if kind not in (None, *KINDS):
        raise ValueError(f"kind must be one of {KINDS} or None, not {kind!r}")
    source = os.fspath(source)
    if not os.path.exists(os.path.expanduser(source)):  # said before ffcv's start-up and any "converting" line
        raise DataError(f"{source}: no such file or folder")
    if is_array_folder(source):  # a cache folder given as the source: used as it is, whichever kind was asked
        m, why = check_arrays(source)
        if m is None:
            raise DataError(f"{source}: array folder is not usable: {why}; delete it and give the original source")
        return _prepared("arrays", source, m)
    problem = ffcv_problem() if kind != "arrays" else None
    if kind == "beton" and problem:
        raise DataError(f"betons need ffcv, and {problem}: {FFCV_INSTALL}")
    if is_beton_folder(source):
        if problem:
            raise DataError(f"{source} is a folder of betons, which need ffcv ({problem}): {FFCV_INSTALL}, "
                            "or give the original CIFAR-10 source instead")
        if kind == "arrays":
            raise DataError(f"{source} is a folder of betons, not arrays: give the original CIFAR-10 source")
    if kind == "beton" or (kind is None and not problem):
        folder, m = prepare_betons(source, cache_dir, progress)
        return _prepared("beton", folder, m)
    if problem:
        progress(f"{problem}: the resident loader reads cached arrays (betons need ffcv: {FFCV_INSTALL})")
    folder = cache_dir or default_array_dir(source)
    return _prepared("arrays", folder, ensure_arrays(source, folder, progress))


def _prepared(kind, folder, manifest):
    paths = {s: os.path.join(folder, f"{s}.beton") if kind == "beton" else split_path(folder, s) for s in SPLITS}
    return PreparedData(kind, folder, manifest, paths)
