"""Data: read CIFAR-10 sources, cache them as FFCV betons (or, without ffcv, plain arrays), load augmented batches
on the training device. Nothing here imports ffcv until a beton is written or read."""
from .arrays import ensure_arrays, read_arrays
from .beton import default_beton_dir, ensure_betons, prepare_betons, read_beton
from .prepare import FFCV_INSTALL, PreparedData, ffcv_available, prepare_data
from .sources import CLASSES, DataError, read_source, resolve_source

__all__ = ["CLASSES", "DataError", "FFCV_INSTALL", "PreparedData", "default_beton_dir", "ensure_arrays",
           "ensure_betons", "ffcv_available", "prepare_betons", "prepare_data", "read_arrays", "read_beton",
           "read_source", "resolve_source"]
