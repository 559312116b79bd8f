"""The machine: which device to train on, how to wait for it, what to call it, and how many CPU threads and
loader workers to use by default."""
import contextlib
import os
import platform

import torch


class ConfigError(ValueError):
    """A setting that cannot work here (a device that is absent, a kernel that cannot run, a flag that
    contradicts the run being resumed). The CLIs print it on one line and exit non-zero."""


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_model():
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or None


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def default_threads():
    """All the cores this process may run on (not os.cpu_count(), which ignores the affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers():
    """ffcv's decoding workers: one per core."""
    return max(1, os.cpu_count() or 1)
