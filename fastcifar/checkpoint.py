"""Atomic checkpoints: a crash mid-write leaves the previous checkpoint intact and never a partial one."""
import io
import os

import torch

from .io import atomic_write_bytes

CHECKPOINT_VERSION = 2  # 2: RNG states per device type ({"cpu": ..., "cuda": [...]})


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path, state):
    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    atomic_write_bytes(path, buf.getbuffer())


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many kinds on a damaged zip
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "model" not in state:
        raise CheckpointError(f"{path}: not a fastcifar checkpoint (version {CHECKPOINT_VERSION})")
    return state
