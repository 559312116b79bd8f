"""Packaging: the fastcifar-kernels wheel stands alone, the pins agree with the requirements, the console
scripts are installed. The kernels wheel is built offline from a copy of kernels/ (no build isolation, so
the environment's setuptools builds it: the `test` extra installs a recent one)."""
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

from conftest import ROOT  # noqa: E402
SCRIPTS = {"fastcifar-train": "fastcifar.train:main", "fastcifar-evaluate": "fastcifar.evaluate:main",
           "fastcifar-data": "fastcifar.data.__main__:main"}
# what a user of the kernel alone never installs: the data stack, this project, the heavier extras, and numpy
# (torch runs without it; only triton's interpreter needs it, so the interpreted run lets it through)
BLOCKED = ("fastcifar", "ffcv", "numba", "cv2", "PIL", "torchvision", "matplotlib", "tqdm", "ray", "pandas", "scipy",
           "numpy")


def requirement_name(req):
    return re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")


@pytest.fixture(scope="module")
def kernels_wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernels_wheel")
    src = tmp / "src"  # a copy: the build writes build/ and *.egg-info next to its sources
    shutil.copytree(os.path.join(ROOT, "kernels"), src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", str(src), "-w", str(tmp / "dist")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("fastcifar_kernels-*.whl")
    return whl


def test_kernels_wheel_holds_the_kernels_and_requires_only_torch_and_triton(kernels_wheel):
    with zipfile.ZipFile(kernels_wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert re.search(r"^Name: fastcifar-kernels$", meta, re.M)
    reqs = re.findall(r"^Requires-Dist: (.+)$", meta, re.M)
    assert {requirement_name(r) for r in reqs} <= {"torch", "triton"}, reqs
    unconditional = [r for r in reqs if ";" not in r]
    assert [requirement_name(r) for r in unconditional] == ["torch"], reqs  # triton comes with a CUDA torch
    code = sorted(n for n in names if not n.startswith("fastcifar_kernels-"))
    sources = sorted(f"fastcifar_kernels/{f}" for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py"))
    assert "fastcifar_kernels/group_norm_relu.py" in sources and code == sources  # every module, nothing else


# forward + backward against nn.GroupNorm + ReLU, in a process that cannot import what BLOCKED names
KERNEL_USER = textwrap.dedent("""
    import importlib.abc, os, sys, warnings
    BLOCKED = set(sys.argv[1].split(",")) - ({"numpy"} if os.environ.get("TRITON_INTERPRET") else set())
    warnings.filterwarnings("ignore", "Failed to initialize NumPy")  # torch says so once, and runs without it
    class Hide(importlib.abc.MetaPathFinder):  # as if not installed: find_spec None, import ModuleNotFoundError
        def __init__(self, finder):
            self.finder = finder
        def find_spec(self, name, path=None, target=None):
            return None if name.split(".")[0] in BLOCKED else self.finder.find_spec(name, path, target)
        def invalidate_caches(self):
            getattr(self.finder, "invalidate_caches", lambda: None)()
    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    import torch, torch.nn.functional as F
    import fastcifar_kernels as K
    assert os.path.realpath(K.__file__).startswith(os.path.realpath(sys.argv[2])), K.__file__
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise AssertionError(f"{name} imported")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    layer = K.GroupNormReLU(4, 8)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
    ref = torch.nn.GroupNorm(4, 8)
    ref.load_state_dict(layer.state_dict())
    xr = x.detach().clone().requires_grad_()
    y, yr = layer(x), F.relu(ref(xr))
    g = torch.randn_like(y)
    (y * g).sum().backward(), (yr * g).sum().backward()
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    for a, b in ((x.grad, xr.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    print("fused" if K.fused_available(x) else "torch", "triton" in sys.modules)
""")


@pytest.mark.parametrize("triton", ["blocked", "interpreted"])
def test_kernels_wheel_runs_forward_and_backward_without_fastcifar_or_ffcv(kernels_wheel, tmp_path, triton):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(target), str(kernels_wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    blocked = BLOCKED + (("triton",) if triton == "blocked" else ())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    # -I is not an option: it would also drop the environment's site-packages (torch); cwd and PYTHONPATH
    # keep the checkout (kernels/, fastcifar/) off sys.path, and the script checks where the module came from
    env.update(PYTHONPATH=str(target), **({"TRITON_INTERPRET": "1"} if triton == "interpreted" else {}))
    r = subprocess.run([sys.executable, "-c", KERNEL_USER, ",".join(blocked), str(target)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    if triton == "blocked":  # the CPU fallback imports and trains without triton
        assert r.stdout.split() == ["torch", "False"]
    else:
        pytest.importorskip("triton")
        assert r.stdout.split() == ["fused", "True"]  # the Triton kernels themselves, from the wheel


def test_pinned_versions_satisfy_the_declared_requirements():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.version import Version
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, version = line.split("==")
                pins[name.lower()] = version.rstrip(".*")
    assert {"torch", "torchvision", "triton", "ffcv", "numpy", "ray"} <= set(pins)
    import torch  # the pin is what this environment measured with
    assert pins["torch"] == torch.__version__.split("+")[0]
    checked = 0
    for path in ("pyproject.toml", "kernels/pyproject.toml"):
        with open(os.path.join(ROOT, path), "rb") as f:
            project = tomllib.load(f)["project"]
        reqs = project["dependencies"] + [r for rs in project.get("optional-dependencies", {}).values() for r in rs]
        for req in map(Requirement, reqs):
            if req.name.lower() in pins:
                v = pins[req.name.lower()]
                v = v + ".0" * (2 - v.count("."))  # "2" from "numpy==2.*" stands for 2.0.0
                assert req.specifier.contains(Version(v), prereleases=True), f"{path}: {req} excludes {v}"
                checked += 1
    assert checked >= 6


def test_fastcifar_depends_on_the_kernels_distribution():
    reqs = md.requires("fastcifar") or []
    assert "fastcifar-kernels" in {requirement_name(r) for r in reqs}
    # two distributions, each with its own top-level package (the first found on sys.path: this environment's)
    top = {n: (md.distribution(n).read_text("top_level.txt") or "").split() for n in ("fastcifar", "fastcifar-kernels")}
    assert top == {"fastcifar": ["fastcifar"], "fastcifar-kernels": ["fastcifar_kernels"]}

@pytest.mark.slow  # three processes that import torch and ffcv
def test_console_scripts_are_installed_and_answer_help():
    eps = {e.name: e.value for e in md.entry_points(group="console_scripts") if e.name.startswith("fastcifar-")}
    assert eps == SCRIPTS
    bindir = sysconfig.get_path("scripts")
    procs = {name: subprocess.Popen([os.path.join(bindir, name), "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in SCRIPTS}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"{name}: {err[-2000:]}"
        assert out.startswith("usage: ") and ("--data" in out or "--source" in out), out
