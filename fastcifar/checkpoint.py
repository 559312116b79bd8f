"""Atomic checkpoints: a crash mid-write leaves the previous checkpoint intact and never a partial one. Loading
checks what a checkpoint holds before anything trusts it: a damaged or foreign one is a one-line CheckpointError."""
import io
import numbers
import os

import torch

from .io import atomic_write_bytes

CHECKPOINT_VERSION = 3  # 2: RNG states per device type; 3: the run's TrainConfig under "config"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path, state):
    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    atomic_write_bytes(path, buf.getbuffer())


def _one_line(e, limit=200):
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit] + "..."


def _number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _rng_state(v, like=None):
    return isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1 and \
        (like is None or v.shape == like.shape)


def _structure_error(state):
    """Why the top level of a loaded checkpoint is not what training writes, or None."""
    epoch, history, rng = state.get("epoch"), state.get("history"), state.get("rng")
    for key in ("model", "optimizer", "scheduler", "loader"):
        if not isinstance(state.get(key), dict):
            return f"'{key}' is not a state dict"
    if type(epoch) is not int or epoch < 0:
        return f"'epoch' is {epoch!r}, not a count of epochs"
    if not isinstance(history, list) or len(history) != epoch:
        return f"'history' is not a list of {epoch} epochs"
    for i, h in enumerate(history):
        if not (isinstance(h, dict) and all(isinstance(k, str) and (_number(v) or v is None) for k, v in h.items())
                and h.get("epoch") == i + 1):
            return f"'history' entry {i} is not epoch {i + 1}'s numbers"
    for key in ("config", "model_config"):
        if not (isinstance(state.get(key), dict) and all(isinstance(k, str) for k in state[key])):
            return f"'{key}' is not a dict of settings"
    if state.get("device") not in ("cpu", "cuda"):
        return f"'device' is {state.get('device')!r}, not 'cpu' or 'cuda'"
    if not (isinstance(rng, dict) and _rng_state(rng.get("cpu"), torch.get_rng_state())
            and (isinstance(rng.get("cuda"), (list, tuple)) and all(map(_rng_state, rng["cuda"]))
                 if "cuda" in rng else True)):
        return "'rng' does not hold generator states"
    if not _number(state.get("compile_time_s")):
        return "'compile_time_s' is not a number"
    return None


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many kinds on a damaged zip
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "model" not in state:
        raise CheckpointError(f"{path}: not a fastcifar checkpoint (version {CHECKPOINT_VERSION})")
    why = _structure_error(state)
    if why:
        raise CheckpointError(f"{path}: damaged checkpoint: {why}")
    return state


def _misfit(want, got, where):
    """Where got (a loaded state) differs in structure from want (the live object's own state): None if nowhere.
    Tensors must match in shape and kind; numbers, strings and containers in type; None in want accepts anything."""
    if want is None:
        return None
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where} is a {type(got).__name__}, not a tensor"
        if got.shape != want.shape:
            return f"{where} has shape {tuple(got.shape)}, not {tuple(want.shape)}"
        if (got.is_floating_point(), got.is_complex(), got.dtype == torch.bool) != \
                (want.is_floating_point(), want.is_complex(), want.dtype == torch.bool):
            return f"{where} is {got.dtype}, not {want.dtype}"
        return None
    if isinstance(want, bool) or isinstance(want, str):
        return None if type(got) is type(want) else f"{where} is {got!r}, not a {type(want).__name__}"
    if _number(want):
        return None if _number(got) else f"{where} is {got!r}, not a number"
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"{where} is a {type(got).__name__}, not a dict"
        missing = [k for k in want if k not in got]
        if missing:
            return f"{where} lacks {missing[0]!r}"
        return next((m for k in want if (m := _misfit(want[k], got[k], f"{where}[{k!r}]"))), None)
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return f"{where} is not a list of {len(want)}"
        return next((m for i, (a, b) in enumerate(zip(want, got)) if (m := _misfit(a, b, f"{where}[{i}]"))), None)
    return None  # anything else (a callable's placeholder, say): load_state_dict judges it


def _optimizer_misfit(opt, state):
    """An optimizer's own state is empty until its first step, so its loaded per-parameter state is checked against
    the parameters: torch's load_state_dict checks the groups' sizes, never the shapes of momentum buffers."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        return "it is not an optimizer's state dict"
    groups = state["param_groups"]
    if len(groups) != len(opt.param_groups):
        return f"it has {len(groups)} parameter groups, not {len(opt.param_groups)}"
    params = {}
    for i, (live, saved) in enumerate(zip(opt.param_groups, groups)):
        want = {k: v for k, v in live.items() if k != "params"}
        why = _misfit(want, saved, f"param_groups[{i}]")
        if why:
            return why
        for k, v in want.items():  # an option that is None here (foreach, fused) is tested for truth in step()
            if v is None and not (saved[k] is None or isinstance(saved[k], bool)):
                return f"param_groups[{i}][{k!r}] is a {type(saved[k]).__name__}, not None or a bool"
        ids = saved.get("params")
        if not isinstance(ids, list) or len(ids) != len(live["params"]) or \
                not all(type(j) is int for j in ids):
            return f"param_groups[{i}] does not list its {len(live['params'])} parameters"
        params.update(zip(ids, live["params"]))
    if len(params) != sum(len(g["params"]) for g in opt.param_groups):
        return "its parameter groups share parameter ids"
    for j, s in state["state"].items():
        if j not in params:
            return f"state for parameter {j!r}, which no group lists"
        if not isinstance(s, dict):
            return f"state[{j!r}] is not a dict"
        for k, v in s.items():  # torch's optimizers keep buffers shaped like their parameter, and a scalar step
            if k == "step":
                if not (_number(v) or isinstance(v, torch.Tensor) and v.numel() == 1):
                    return f"state[{j!r}]['step'] is not a step count"
            elif isinstance(v, torch.Tensor):
                if v.shape != params[j].shape:
                    return f"state[{j!r}][{k!r}] has shape {tuple(v.shape)}, not {tuple(params[j].shape)}"
            elif v is not None:
                return f"state[{j!r}][{k!r}] is a {type(v).__name__}, not a tensor"
    return None


def load_state(obj, state, what, path):
    """obj.load_state_dict(state), for each piece a checkpoint restores (`what`: "model", "optimizer", ...). A piece
    that does not fit obj (missing keys, other shapes, other types) is a one-line CheckpointError naming the file and
    the piece; the checks run before load_state_dict, which would otherwise fail late, or never."""
    if isinstance(obj, torch.optim.Optimizer):
        why = _optimizer_misfit(obj, state)
    elif isinstance(obj, torch.nn.Module):
        why = None if isinstance(state, dict) else "it is not a state dict"  # load_state_dict checks the rest
    else:
        why = _misfit(obj.state_dict(), state, what)
    if why is None:
        try:
            obj.load_state_dict(state)
        except Exception as e:
            why = f"{type(e).__name__}: {_one_line(e)}"
    if why:
        raise CheckpointError(f"{path}: the checkpoint's {what} state does not fit this run ({why})")
