"""Installing into an environment with only torch (.ci/torch_only_venv.py links this environment's torch into a
fresh venv): ./kernels alone runs GroupNormReLU without numpy; `pip install ./kernels .` trains without ffcv.
Packages come from the package index pip is configured with, under constraints.txt (a torchvision that wanted
another torch would have pip refuse, not replace, the linked one); the checkout is copied first, since building in
place would write build/ and *.egg-info into it."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

KERNEL_USE = textwrap.dedent("""
    import importlib.util, sys
    import torch
    import fastcifar_kernels as K
    assert K.__file__.startswith(sys.prefix), K.__file__  # the installed copy, not the checkout
    missing = [m for m in ("numpy", "fastcifar", "ffcv", "PIL") if importlib.util.find_spec(m) is not None]
    assert not missing, missing
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    layer, ref = K.GroupNormReLU(4, 8), torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(layer.state_dict())
    xr = x.detach().clone().requires_grad_()
    y, yr = layer(x), torch.relu(ref(xr))
    y.square().sum().backward(), yr.square().sum().backward()
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    for a, b in ((x.grad, xr.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    print("ok")
""")


IGNORE = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")


def _copy_project(dst):
    shutil.copytree(os.path.join(ROOT, "fastcifar"), os.path.join(dst, "fastcifar"), ignore=IGNORE)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dst)
    return dst


@pytest.mark.slow  # about a minute: a venv, two installs from the local index, a training run
def test_kernels_then_fastcifar_install_and_train_with_only_torch_and_no_ffcv(tmp_path, small_source):
    venv = str(tmp_path / "venv")
    r = subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "torch_only_venv.py"), venv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    py = os.path.join(venv, "bin", "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "FASTCIFAR_DATA")}

    def run(*args, timeout=600):
        # from tmp_path: the checkout's own packages must not shadow what was installed
        r = subprocess.run([py, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
        return r.stdout

    names = {p["name"].lower() for p in json.loads(run("-m", "pip", "list", "--format=json"))}
    assert {"torch", "pip"} <= names and not names & {"numpy", "ffcv", "fastcifar", "pillow"}, names
    pip = ("-m", "pip", "install", "-q", "-c", os.path.join(ROOT, "constraints.txt"))
    run(*pip, shutil.copytree(os.path.join(ROOT, "kernels"), tmp_path / "kernels", ignore=IGNORE))
    assert run("-c", KERNEL_USE).split()[-1] == "ok"

    run(*pip, _copy_project(tmp_path / "project"))
    run("-c", "import importlib.util, fastcifar, sys; assert importlib.util.find_spec('ffcv') is None; "
              "assert fastcifar.__file__.startswith(sys.prefix), fastcifar.__file__")
    out = str(tmp_path / "run")
    stdout = run("-m", "fastcifar.train", "--data", small_source, "--limit", "64", "--epochs", "1", "--batch-size",
                 "32", "--no-plots", "--quiet", "--out", out, "--threads", "1")
    assert "betons need ffcv" in stdout
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["epochs_run"] == 1 and len(metrics["history"]) == 1
