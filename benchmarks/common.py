"""Pieces the benchmark harnesses share: the repository root, atomic outputs and JSON reading, the environment
record and the header every report starts with, dataset naming, the relative-error metric, a torchvision-style
Dataset over uint8 arrays, and Markdown tables."""
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

import numpy as np
import torch

from fastcifar.device import cpu_model, default_threads, pick_device, sync  # noqa: F401  (re-exported)
from fastcifar.io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)
from fastcifar.io import save_figure as save_figure_atomic  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: benchmarks/ runs from it


def read_json(path):
    """The JSON object in path, or None when it is missing, unreadable or not JSON (a run that died early)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rel_err(got, want):
    """max|got - want| / max|want| (the denominator floored at 1e-6, for all-zero references), in fp32."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


# ---------------------------------------------------------------- environment

def module_version(name):
    """The installed distribution's version (ffcv's own __version__ string lags its releases); None if absent."""
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:
        mod = __import__(name)
    except Exception:  # missing, or broken on this machine: either way there is no version to report
        return None
    return getattr(mod, "__version__", "unknown")


def git_info():
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if not status.returncode else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def command_line(prog, argv):
    """The command as typed: `prog` plus the arguments actually parsed (sys.argv[1:] when run from a shell)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join([prog] + [shlex.quote(str(a)) for a in argv])


def environment(device, prog, argv):
    device = torch.device(device)
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})",
        "cpu_model": cpu_model(),
        "cpu_cores": default_threads(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torchvision": module_version("torchvision"),
        "triton": module_version("triton"),
        "ffcv": module_version("ffcv"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": command_line(prog, argv),
    }
    env.update({f"git_{k}": v for k, v in git_info().items()})
    return env


def machine_line(env, threads=None):
    """The machine in one line; `threads`: the runs' own torch threads, where they differ from this process's."""
    if env.get("gpu_name"):
        return f"{env['gpu_name']} (CUDA {env.get('cuda')}), host CPU {env.get('cpu_model')}"
    return f"CPU {env.get('cpu_model')}, {env.get('cpu_cores')} cores, " \
           f"{env.get('torch_threads') if threads is None else threads} torch threads"


def versions_line(env):
    cuda = f" (CUDA build {env['torch_cuda_build']}, cuDNN {env.get('cudnn')})" if env.get("torch_cuda_build") else ""
    return f"torch {env['torch']}{cuda}, torchvision {env.get('torchvision')}, triton {env.get('triton')}, " \
           f"ffcv {env.get('ffcv')}, python {env['python']}"


def report_header(title, env, *lines, machine_note="", threads=None):
    """The lines every report starts with: its title, the command, date, machine, code and versions, then
    `lines` (each a "Name: value" item)."""
    dirty = " (with uncommitted changes)" if env.get("git_dirty") else ""
    return [f"# {title}", "", f"- Command: `{env['command']}`", f"- Date: {env['date']}",
            f"- Machine: {machine_line(env, threads)}{machine_note}",
            f"- Code: git {env.get('git_commit') or 'unknown'}{dirty}",
            f"- Versions: {versions_line(env)}", *(f"- {line}" for line in lines)]


# ---------------------------------------------------------------- data

def dataset_label(description):
    """How results name the data. The project's own JPEG copy of CIFAR-10 is lossy, so its accuracies are
    not the official test set's and must say so."""
    lower = description.lower()
    if "jpeg" in lower or "jpg" in lower:
        return "CIFAR-10 (JPEG copy)"
    if "official python" in lower:
        return "CIFAR-10 (official python batches)"
    return "CIFAR-10-format data"


def dataset_record(manifest, limit, label=None):
    images = {s: v["images"] for s, v in manifest["splits"].items()}
    used = {s: min(n, limit) if limit else n for s, n in images.items()}
    return {"name": label or dataset_label(manifest["description"]), "source": manifest["description"],
            "images": images, "limit": limit, "images_used": used}


def dataset_line(ds):
    used = ds["images_used"]
    sub = f", a fixed spread of {used['train']} train / {used['test']} test images (--limit {ds['limit']})" \
        if ds.get("limit") else ""
    return f"{ds['name']}: {ds['source']}; {ds['images']['train']} train / {ds['images']['test']} test images{sub}"


class ArrayDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image from the uint8 HWC array, then `transform`."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def load_arrays(beton_dir, split, limit=None):
    """A split as uint8 (N, 32, 32, 3) images and int64 labels, the same subset --limit gives training."""
    from fastcifar.data import read_beton
    from fastcifar.data.loaders import subset_indices
    images, labels = read_beton(os.path.join(beton_dir, f"{split}.beton"))
    if limit:
        keep = subset_indices(len(labels), limit)
        images, labels = images[keep], labels[keep]
    return images, labels


def normalize_transform():
    from torchvision import transforms
    from fastcifar.data.loaders import MEAN, STD
    return transforms.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD])


def set_all_threads(n=None):
    # importing ffcv (and starting one of its Loaders) drops torch to one thread; every harness measures
    # with all the cores it is allowed, like training does, unless told otherwise
    n = n or default_threads()
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------- tables

def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def parse_markdown_table(text, first_header):
    """Rows of the Markdown table whose header starts with `first_header`, as dicts keyed by the header."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(cells, (c.strip() for c in row.strip().strip("|").split("|")))))
            return rows
    raise ValueError(f"no table with first column {first_header!r}")


def fmt(x, digits=2, suffix=""):
    return "n/a" if x is None else f"{x:.{digits}f}{suffix}"
