"""Data: read CIFAR-10 sources, write FFCV betons, load augmented batches on the training device."""
from .beton import default_beton_dir, ensure_betons, prepare_betons, read_beton
from .sources import CLASSES, DataError, read_source, resolve_source

__all__ = ["CLASSES", "DataError", "default_beton_dir", "ensure_betons", "prepare_betons", "read_beton", "read_source",
           "resolve_source"]
