"""How a run executes on a device: precision and grad scaling, compile mode, the fused norm's route.

None of it changes the recipe. `describe_device` only queries a device's name and capability (it never
allocates on it), so `plan` also answers for a device type this machine lacks (`--print-config cuda`).
"""
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .device import ConfigError, cpu_model

GENERIC_GPU = "a generic sm80+ GPU (no CUDA device here: resolved without one)"


@dataclass(frozen=True)
class DeviceInfo:
    type: str                           # "cpu" or "cuda"
    name: str
    capability: Optional[tuple] = None  # CUDA compute capability, e.g. (7, 5) for a T4
    native_bf16: bool = False           # bf16 in hardware (not emulated)
    present: bool = True                # False: assumed, for a device type this machine lacks


def cpu_has_native_bf16():
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # private probes: absent means unknown, so no bf16
        return False


def describe_device(device_type):
    if device_type == "cpu":
        return DeviceInfo("cpu", f"cpu ({cpu_model()})", native_bf16=cpu_has_native_bf16())
    if not torch.cuda.is_available():
        return DeviceInfo("cuda", GENERIC_GPU, (8, 0), native_bf16=True, present=False)
    # is_bf16_supported() counts emulation as support (sm70/sm75 say True): only the hardware counts here
    return DeviceInfo("cuda", torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability()),
                      native_bf16=torch.cuda.is_bf16_supported(including_emulation=False))


@dataclass(frozen=True)
class Execution:
    device: str
    device_name: str
    precision: str                  # "fp32", "bf16" or "fp16" (the autocast dtype; fp32 without --amp)
    grad_scaler: bool               # fp16 needs loss scaling
    compile: bool
    compile_mode: Optional[str]     # "reduce-overhead" captures the training step in CUDA graphs
    fused_norm: str                 # "triton" (after a self-check at start), "torch", or "n/a" (bn)
    fused_norm_why: Optional[str]   # why not triton, or what the check at start decides
    notes: list = field(default_factory=list)

    @property
    def dtype(self):
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def to_dict(self):
        return asdict(self)


def plan(cfg, dev):
    """The execution of `cfg` on the device `dev` describes (a DeviceInfo)."""
    notes = []
    if not cfg.amp:
        precision = "fp32"
    elif dev.native_bf16:
        precision = "bf16"
    elif dev.type == "cuda":
        precision = "fp16"
        notes.append(f"--amp: {dev.name} has no native bf16; training in fp16 with a grad scaler")
    else:
        precision = "fp32"
        notes.append("--amp: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 autocast runs slower "
                     "than fp32; training in fp32")
    if cfg.cuda_graphs and dev.type != "cuda":
        raise ConfigError("--cuda-graphs: CUDA graphs need a CUDA device; leave the flag out on the CPU")
    compile_on = cfg.cuda_graphs or cfg.compile == "on" or (cfg.compile == "auto" and dev.type == "cuda")
    route, why = fused_route(cfg.fused_norm, cfg.norm, dev, precision)
    return Execution(dev.type, dev.name, precision, precision == "fp16", compile_on,
                     "reduce-overhead" if cfg.cuda_graphs else None, route, why, notes)


def fused_route(mode, norm, dev, precision):
    """(route, why) before the check at start: whether the Triton GroupNorm+ReLU is to be tried here. Asks only
    what the kernel supports; its self-check, which runs on the device, comes at the start of training."""
    if norm == "bn":
        return "n/a", "bn has no GroupNorm"
    if mode == "off":
        return "torch", "--fused-norm off"
    try:
        import fastcifar_kernels as fk
    except ImportError:
        fk = None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if fk is None:
        why = "fastcifar_kernels is not installed"
    elif dev.type == "cuda" and not dev.present:
        return "triton", "checked against torch at start; the torch path if the check fails"
    elif fk.fused_supported(torch.device(dev.type), dtype):
        return "triton", "checked against torch at start; the torch path if the check fails"
    elif dev.type == "cuda":
        why = f"the Triton kernel does not run {precision} on {dev.name} here"
    elif precision == "bf16":
        why = "the Triton interpreter has no bf16"
    else:
        why = "the Triton kernel needs CUDA (or TRITON_INTERPRET=1 on the CPU)"
    if mode == "on":
        raise ConfigError(f"--fused-norm on: {why}")
    return "torch", why


def check_fused(mode, device, dtype):
    """Run the kernel's self-check for the training dtype and channels_last: (use it?, why not). Under auto
    any refusal or failed check falls back to the torch path with one warning; under on it is an error that
    names only --fused-norm on, the flag that asked for it."""
    import fastcifar_kernels as fk
    try:
        if fk.verify_kernel(device, dtype, channels_last=True, strict=mode == "on"):
            return True, None
    except RuntimeError as e:
        if mode == "on":
            raise ConfigError(f"--fused-norm on: {str(e).splitlines()[0]}") from None
        why = str(e).splitlines()[0]
    else:
        key = f"{device.type}/{str(dtype).removeprefix('torch.')}/channels_last"
        why = fk.kernel_status().get(key, "the kernel's self-check failed")
    warnings.warn(f"fused GroupNorm+ReLU not used ({why}); training with the torch GroupNorm", RuntimeWarning,
                  stacklevel=2)
    return False, why


def configure_backends(device):
    # fixed input shapes: let cuDNN pick the fastest convolution once; TF32 matmuls keep fp32 range
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
