"""Fused GroupNorm+ReLU (fastcifar_kernels): forward and all gradients against a float64 torch reference.

Error measure everywhere: rel(a, b) = max|a - b| / max(max|b|, 1e-6) with b the float64 reference.
fp32 results must be within 1e-5.

Without a GPU the Triton kernels run in the Triton interpreter on CPU tensors; with one, the same
tests run the compiled kernels on CUDA tensors, plus the fp16/bf16/compile tests marked for CUDA.
"""
import importlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcifar_kernels as fk
# conftest imported the kernels, under the interpreter where there is no NVIDIA device
from conftest import KERNELS as impl
from conftest import NVIDIA_VISIBLE, ROOT, WE_SET_INTERPRET

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEED = int(os.environ.get("FASTCIFAR_TEST_SEED", "1234"))
print(f"test_kernels: base seed {SEED} (FASTCIFAR_TEST_SEED overrides)")
if WE_SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # fused_available(cpu) asks for it on first use too
    impl._reset_routes()
FUSED_HERE = fk.fused_available(DEV)
if WE_SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]
impl._reset_routes()


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if WE_SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
TOL = 1e-5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="fp16/bf16 and compiled-kernel checks need a CUDA device")
needs_fused = pytest.mark.skipif(not FUSED_HERE,
                                 reason="Triton cannot run here (no CUDA and TRITON_INTERPRET unset at import)")


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------
def _model_norm_shapes():
    """(C, H, W, G) of every group norm in the project's gn and ln models, in the layouts their presets train."""
    from fastcifar.config import DEVICE_TYPES, PRESETS, preset_value
    from fastcifar.models import make_model
    archs = lambda norm: {preset_value(p, "arch", norm, d) for p in PRESETS for d in DEVICE_TYPES}  # noqa: E731
    return sorted({s[1:] for norm in ("gn", "ln") for arch in archs(norm)
                   for s in fk.norm_shapes(make_model(norm, arch), (2, 3, 32, 32))})


MODEL_SHAPES = _model_norm_shapes()

# (N, C, H, W), G, affine: odd sizes, 1x1, batch 1, G=1, G=C, W=1, a large G=1 group
EDGE_CASES = [
    ((3, 6, 7, 5), 3, True),
    ((3, 6, 7, 5), 3, False),
    ((2, 16, 1, 1), 1, True),
    ((2, 16, 1, 1), 2, True),
    ((2, 16, 1, 1), 16, True),  # one element per group: xhat = 0, dx = 0
    ((1, 12, 5, 3), 1, False),
    ((1, 12, 5, 3), 4, True),
    ((2, 24, 8, 8), 24, True),
    ((1, 5, 9, 1), 5, True),
    ((1, 32, 32, 32), 1, True),  # 32K-element group: the tiled loops
]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def rel(a, b):
    """max|a - b| / max|b|; the denominator is floored at 1e-6 because some exact gradients are
    all zero (one element per group gives dx = 0) and float64 torch returns ~1e-14 noise there."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape
    if b.numel() == 0:
        return 0.0
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)


def make_inputs(shape, G, fmt="nchw", affine=True, seed=None, device=DEV, dtype=torch.float32):
    """x with a per-channel offset and scale (so the mean matters), weight ~1, bias near zero
    (so about half the outputs are clipped by the ReLU), and a random dy."""
    seed = SEED if seed is None else seed
    print(f"make_inputs: shape={shape} G={G} seed={seed}")
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    x = torch.randn(shape, generator=g) * (0.5 + 1.5 * torch.rand(1, C, 1, 1, generator=g)) \
        + 3 * (2 * torch.rand(1, C, 1, 1, generator=g) - 1)
    w = 1 + 0.2 * torch.randn(C, generator=g) if affine else None
    b = 0.05 * torch.randn(C, generator=g) if affine else None
    dy = torch.randn(shape, generator=g)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x = to(x).to(memory_format=FORMATS[fmt])
    return x, to(w), to(b), to(dy), seed


def reference(x, G, w, b, dy, eps=1e-5):
    """float64 F.group_norm then relu: y, (dx, dw, db), xhat."""
    leaf = lambda t: None if t is None else t.detach().double().cpu().requires_grad_()  # noqa: E731
    x64, w64, b64 = leaf(x), leaf(w), leaf(b)
    y = F.relu(F.group_norm(x64, G, w64, b64, eps))
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], dy.double().cpu())
    it = iter(grads)
    dx = next(it)
    dw = next(it) if w is not None else None
    db = next(it) if b is not None else None
    xhat = F.group_norm(x64.detach(), G, None, None, eps)
    return y.detach(), (dx, dw, db), xhat


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so an element they never write shows up.
    Returns the list of allocations (non-empty proves the Triton path ran)."""
    calls = []

    def empty_like(x):
        calls.append(tuple(x.shape))
        return torch.full_like(x, float("nan"), memory_format=torch.preserve_format)

    def empty(shape, dtype, device):
        calls.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(impl, "_empty_like", empty_like)
    monkeypatch.setattr(impl, "_empty", empty)
    return calls


def run_fused(x, G, w, b, dy, eps=1e-5):
    """Public API with autograd: y and the grads of x, w, b."""
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
    x_, w_, b_ = leaf(x), leaf(w), leaf(b)  # clone() keeps x's strides
    y = fk.group_norm_relu(x_, G, w_, b_, eps)
    grads = torch.autograd.grad(y, [t for t in (x_, w_, b_) if t is not None], dy)
    it = iter(grads)
    return y, (next(it), next(it) if w is not None else None, next(it) if b is not None else None)


def check_against_reference(x, G, w, b, dy, seed, tol=TOL, y=None, grads=None):
    if y is None:
        y, grads = run_fused(x, G, w, b, dy)
    y_ref, grads_ref, xhat = reference(x, G, w, b, dy)
    msg = f"shape={tuple(x.shape)} G={G} seed={seed}"
    assert torch.isfinite(y).all(), f"unwritten or non-finite output, {msg}"
    assert rel(y, y_ref) < tol, f"forward rel err {rel(y, y_ref):.2e}, {msg}"
    for name, got, want in zip(("dx", "dw", "db"), grads, grads_ref):
        if want is None:
            assert got is None, f"{name} should be None, {msg}"
            continue
        assert torch.isfinite(got).all(), f"unwritten or non-finite {name}, {msg}"
        assert rel(got, want) < tol, f"{name} rel err {rel(got, want):.2e}, {msg}"
    return y_ref, xhat


def assert_relu_matters(y_ref, xhat, msg=""):
    zero = (y_ref == 0).double().mean().item()
    assert 0.3 <= zero <= 0.7, f"{zero:.0%} of outputs clipped: the ReLU mask is barely tested {msg}"
    assert (xhat.abs() < 0.1).any(), f"no normalized value near zero {msg}"


# ------------------------------------------------------------------------------------------------
# setup sanity
# ------------------------------------------------------------------------------------------------
def test_triton_path_is_live_here():
    """Fails (rather than quietly testing the torch path) when the kernels were imported before
    TRITON_INTERPRET was set, or triton is missing."""
    if torch.cuda.is_available():
        assert fk.fused_available(torch.empty(1, device="cuda"))
    elif not NVIDIA_VISIBLE:
        assert fk.fused_available(torch.empty(1)), "Triton interpreter not active for CPU tensors"
    else:
        pytest.skip("an NVIDIA device is visible but torch cannot use it")


def test_model_shapes_come_from_the_model():
    assert {s[3] for s in MODEL_SHAPES} >= {1}, "the ln model should contribute G=1 shapes"
    assert any(s[3] > 1 for s in MODEL_SHAPES), "the gn model should contribute G>1 shapes"


def test_norm_shapes_finds_every_call():
    gn = nn.GroupNorm(4, 4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.MaxPool2d(2),
                          fk.GroupNormReLU(1, 8), nn.Conv2d(8, 4, 1), gn, nn.MaxPool2d(3), gn).double()
    assert fk.norm_shapes(model, (5, 3, 6, 6)) == [(5, 8, 6, 6, 2), (5, 8, 3, 3, 1), (5, 4, 3, 3, 4),
                                                    (5, 4, 1, 1, 4)], "a module run twice is reported twice"
    assert not gn._forward_hooks, "hooks must be removed"


# ------------------------------------------------------------------------------------------------
# correctness: public API, autograd, NaN-poisoned buffers
# ------------------------------------------------------------------------------------------------
@needs_fused
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: "C{}_{}x{}_G{}".format(*s))
def test_model_shapes_match_float64(shape, fmt, poisoned):
    C, H, W, G = shape
    x, w, b, dy, seed = make_inputs((2, C, H, W), G, fmt)
    y, grads = run_fused(x, G, w, b, dy)
    assert poisoned, "the Triton path did not run"
    assert y.is_contiguous(memory_format=FORMATS[fmt]) and grads[0].is_contiguous(memory_format=FORMATS[fmt])
    y_ref, xhat = check_against_reference(x, G, w, b, dy, seed, y=y, grads=grads)
    assert_relu_matters(y_ref, xhat, f"seed={seed}")


@needs_fused
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape,G,affine", EDGE_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_edge_shapes_match_float64(shape, G, affine, fmt, poisoned):
    x, w, b, dy, seed = make_inputs(shape, G, fmt, affine)
    y, grads = run_fused(x, G, w, b, dy)
    assert poisoned
    assert y.is_contiguous(memory_format=FORMATS[fmt])
    y_ref, xhat = check_against_reference(x, G, w, b, dy, seed, y=y, grads=grads)
    if x.numel() >= 256 and x.numel() // (shape[0] * G) >= 16:
        assert_relu_matters(y_ref, xhat, f"seed={seed}")


@needs_fused
@pytest.mark.parametrize("shape,G,blocks", [
    ((2, 12, 7, 9), 2, (4, 8)),     # partial channel block and partial hw block
    ((3, 6, 7, 5), 3, (1, 16)),     # one channel per tile
    ((2, 40, 16, 16), 1, (16, 32)),  # an ln-model group in many tiles
])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tiled_loops_match_float64(shape, G, blocks, fmt, poisoned):
    """Small forced tiles drive the two-pass (Welford merge, then apply) code on small inputs."""
    C, HW = shape[1], shape[2] * shape[3]
    assert not impl._one_tile({"BLOCK_C": blocks[0], "BLOCK_HW": blocks[1], "CPS": C // G, "HW": HW})
    x, w, b, dy, seed = make_inputs(shape, G, fmt)
    y, mean, rstd = impl._forward(x, G, w, b, 1e-5, blocks=blocks, split=(1, C // G))
    grads = impl._backward(dy, x, mean, rstd, G, w, b, blocks=blocks, split=(1, C // G))
    assert y.is_contiguous(memory_format=FORMATS[fmt])
    check_against_reference(x, G, w, b, dy, seed, y=y, grads=grads)


@needs_fused
@pytest.mark.parametrize("shape,G,split,blocks,affine", [
    ((2, 16, 4, 4), 1, (4, 4), (4, 16), True),     # LN, each chunk one tile
    ((2, 16, 4, 4), 2, (3, 3), (2, 8), True),      # uneven chunks (3+3+2) walked in tiles
    ((1, 12, 5, 7), 3, (2, 2), (1, 64), False),    # no affine, one channel per tile
    ((3, 10, 3, 3), 1, (10, 1), (1, 16), True),    # one channel per chunk
])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_split_path_matches_float64(shape, G, split, blocks, affine, fmt, poisoned):
    """Groups split into channel chunks (two launches each way): what small N*G gets on a GPU."""
    x, w, b, dy, seed = make_inputs(shape, G, fmt, affine)
    y, mean, rstd = impl._forward(x, G, w, b, 1e-5, blocks=blocks, split=split)
    grads = impl._backward(dy, x, mean, rstd, G, w, b, blocks=blocks, split=split)
    assert len(poisoned) >= 4, "no split partials were allocated"
    check_against_reference(x, G, w, b, dy, seed, y=y, grads=grads)
    ref_x = x.double().reshape(shape[0], G, -1)
    assert rel(mean, ref_x.mean(-1)) < TOL and rel(rstd, (ref_x.var(-1, correction=0) + 1e-5).rsqrt()) < TOL
    for needs in ((False, True, True), (True, False, False)):  # the dw/db-only launch, and dx alone
        got = impl._backward(dy, x, mean, rstd, G, w, b, *needs, blocks=blocks, split=split)
        for g_, r, need in zip(got, grads, needs):
            assert (g_ is None) if not need or r is None else rel(g_, r) < 1e-6


def test_split_decision():
    # LN at batch 128 on a 132-SM GPU: 128 programs; split into power-of-two channel chunks
    assert impl._split(128, 1, 32, 64, 132) == (2, 16)
    assert impl._split(8, 1, 64, 256, 132) == (32, 2)
    assert impl._split(512, 1, 32, 64, 132) == (1, 32), "enough programs already"
    assert impl._split(128, 1, 46, 16, 132) == (2, 32), "chunks of at least 512 elements (the last may be less)"
    assert impl._split(128, 1, 46, 8, 132) == (1, 46), "chunks would fall under the minimum size"
    assert impl._split(4, 1, 1, 4096, 132) == (1, 1), "one channel cannot be split by channels"
    assert impl._split(2, 1, 32, 64, 1) == (1, 32), "the CPU (one 'SM') never splits by itself"
    for N, G, cpg, hw in ((1, 1, 100, 1024), (16, 2, 24, 1024), (3, 1, 7, 300)):
        S, cps = impl._split(N, G, cpg, hw, 132)
        assert S * cps >= cpg > (S - 1) * cps and (S == 1 or cps * hw >= impl._MIN_SPLIT_ELEMS)


@pytest.mark.skipif(impl.triton is None, reason="triton is not installed")
def test_autotune_configs_fit_the_shape():
    import triton
    configs = [triton.Config({"BLOCK_C": bc, "BLOCK_HW": bhw}, num_warps=w) for bc, bhw, w in impl._GPU_TILES]
    fit = impl._fit_configs(configs, {"CPS": 4, "HW": 16})
    assert {(c.kwargs["BLOCK_C"], c.kwargs["BLOCK_HW"]) for c in fit} == {(4, 16), (2, 16)}
    assert len({(c.kwargs["BLOCK_C"], c.kwargs["BLOCK_HW"], c.num_warps) for c in fit}) == len(fit)
    assert all(c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_HW"] >= 64 * c.num_warps or c.num_warps == 1 for c in fit)
    big = impl._fit_configs(configs, {"CPS": 256, "HW": 4096})
    assert len(big) == len(configs) and max(c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_HW"] for c in big) <= 4096
    if impl._INTERPRETED:  # the interpreter would time every config on the CPU
        assert len(impl._fwd_tuned.configs) == len(impl._bwd_tuned.configs) == 1


@needs_fused
def test_autotuner_picks_and_runs_a_fitted_config(monkeypatch, poisoned):
    """The GPU's tuning path (prune, time each config, cache the winner per key, launch it) with the
    timer faked: the interpreter's own tuners hold one config."""
    timed = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()  # the config must run
        timed.append(len(timed))
        return [1.0 / len(timed)] * len(quantiles)  # the last config timed wins
    fwd, bwd = (impl._tuned(k, impl._GPU_TILES, bench=fake_bench)
                for k in (impl._gn_relu_fwd_kernel, impl._gn_relu_bwd_kernel))
    monkeypatch.setattr(impl, "_fwd_tuned", fwd)
    monkeypatch.setattr(impl, "_bwd_tuned", bwd)
    x, w, b, dy, seed = make_inputs((2, 8, 4, 4), 2, "cl")
    y, mean, rstd = impl._forward(x, 2, w, b)
    grads = impl._backward(dy, x, mean, rstd, 2, w, b)
    check_against_reference(x, 2, w, b, dy, seed, y=y, grads=grads)
    assert len(timed) == 4, "two fitted configs (4x16, 2x16) per kernel"
    assert [(c.kwargs["BLOCK_C"], c.kwargs["BLOCK_HW"]) for c in fwd.cache.values()] == [(2, 16)]
    impl._forward(x, 2, w, b)
    assert len(timed) == 4, "the winner is cached per key"


@needs_fused
@pytest.mark.parametrize("case", ["x_cl_dy_nchw", "x_nchw_dy_cl", "sliced_x_expanded_dy"])
def test_mixed_strides(case, poisoned):
    """dy may arrive in another layout than x (or expanded); x may be a strided view."""
    G = 2
    if case == "sliced_x_expanded_dy":
        big, w, b, _, seed = make_inputs((2, 8, 14, 7), G)
        x = big[:, :, ::2, :]  # H stride is not W * W stride: the generic (div/mod) indexing
        assert not impl._hw_strides(x)[4]
        dy = torch.randn(1, 1, 1, 1, device=DEV).expand(x.shape)
    else:
        fx, fdy = ("cl", "nchw") if case == "x_cl_dy_nchw" else ("nchw", "cl")
        x, w, b, dy, seed = make_inputs((3, 16, 6, 10), G, fx)
        dy = dy.to(memory_format=FORMATS[fdy])
    y, grads = run_fused(x, G, w, b, dy)
    if case != "sliced_x_expanded_dy":
        assert grads[0].stride() == x.stride(), "dx must keep x's layout"
    check_against_reference(x, G, w, b, dy, seed, y=y, grads=grads)


@needs_fused
@pytest.mark.parametrize("which", ["x_only", "params_only", "weight_only_affine", "bias_only_affine"])
def test_partial_requires_grad_and_partial_affine(which):
    G = 3
    x, w, b, dy, seed = make_inputs((2, 9, 5, 6), G)
    if which == "weight_only_affine":
        b = None
    if which == "bias_only_affine":
        w = None
    xg = x.clone().requires_grad_(which != "params_only")
    wg = None if w is None else w.clone().requires_grad_(which != "x_only")
    bg = None if b is None else b.clone().requires_grad_(which != "x_only")
    y = fk.group_norm_relu(xg, G, wg, bg)
    wanted = [t for t in (xg, wg, bg) if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, wanted, dy)
    _, ref, _ = reference(x, G, w, b, dy)
    ref_wanted = [r for t, r in zip((xg, wg, bg), ref) if t is not None and t.requires_grad]
    assert len(got) == len(ref_wanted) > 0
    for g, r in zip(got, ref_wanted):
        assert rel(g, r) < TOL, f"{which} seed={seed}"


@needs_fused
def test_no_grad_and_inference_mode():
    x, w, b, dy, seed = make_inputs((2, 8, 4, 4), 2)
    y_ref = reference(x, 2, w, b, dy)[0]
    with torch.no_grad():
        assert rel(fk.group_norm_relu(x, 2, w, b), y_ref) < TOL
    with torch.inference_mode():
        assert rel(fk.group_norm_relu(x, 2, w, b), y_ref) < TOL


@needs_fused
def test_fp16_in_place_of_fp32():
    """fp16 in, fp16 out, fp32 statistics: error is the fp16 rounding of the output."""
    x, w, b, dy, seed = make_inputs((2, 16, 8, 8), 4, "cl", dtype=torch.float16)
    check_against_reference(x, 4, w, b, dy, seed, tol=2e-3)


# ------------------------------------------------------------------------------------------------
# module, errors, fallback
# ------------------------------------------------------------------------------------------------
def test_module_matches_groupnorm_state_dict_and_repr():
    gn = nn.GroupNorm(4, 32)
    mod = fk.GroupNormReLU(4, 32)
    assert list(mod.state_dict()) == list(gn.state_dict()) == ["weight", "bias"]
    assert torch.equal(mod.weight, gn.weight) and torch.equal(mod.bias, gn.bias)  # ones / zeros
    assert repr(mod) == "GroupNormReLU(4, 32, eps=1e-05, affine=True, bias=True)"
    if "bias=" in gn.extra_repr():  # torch >= 2.6 spells out bias too
        assert mod.extra_repr() == gn.extra_repr()
    for kw in ({"affine": False}, {"bias": False}):
        try:
            gn_kw = nn.GroupNorm(2, 8, **kw)
        except TypeError:  # an older nn.GroupNorm without bias=
            continue
        assert list(fk.GroupNormReLU(2, 8, **kw).state_dict()) == list(gn_kw.state_dict())
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_(0, 0.1)
    mod.load_state_dict(gn.state_dict())
    mod, gn = mod.to(DEV), gn.to(DEV)
    x = torch.randn(2, 32, 6, 6, device=DEV).to(memory_format=torch.channels_last)
    want = F.relu(gn.double()(x.double()))
    assert rel(mod(x), want) < TOL


def test_errors_are_clear():
    x = torch.randn(2, 6, 4, 4, device=DEV)
    with pytest.raises(ValueError, match="divisible"):
        fk.group_norm_relu(x, 4)
    with pytest.raises(ValueError, match="divisible"):
        fk.GroupNormReLU(4, 6)
    with pytest.raises(ValueError, match="4-D"):
        fk.group_norm_relu(torch.randn(2, 6, 16, device=DEV), 2)
    with pytest.raises(ValueError, match="shape"):
        fk.group_norm_relu(x, 2, torch.ones(5, device=DEV))
    with pytest.raises(ValueError, match="positive"):
        fk.group_norm_relu(x, 0)


def test_fused_available_answers():
    assert fk.fused_available("meta") is False
    assert fk.fused_available(torch.empty(1, dtype=torch.float64, device=DEV)) is False  # fp64: torch path
    assert fk.fused_available(torch.empty(1, dtype=torch.float32, device=DEV)) == fk.fused_available(DEV)
    assert fk.fused_available(torch.device(DEV)) == fk.fused_available(str(DEV))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_torch_fallback_matches_float64(fmt, monkeypatch, poisoned):
    monkeypatch.setenv("FASTCIFAR_KERNELS_DISABLE", "1")
    impl._reset_routes()
    assert not fk.fused_available(DEV)
    x, w, b, dy, seed = make_inputs((2, 24, 8, 8), 3, fmt)
    y, grads = run_fused(x, 3, w, b, dy)
    assert not poisoned, "the kernels ran although disabled"
    assert y.stride() == x.stride() and grads[0].stride() == x.stride()
    check_against_reference(x, 3, w, b, dy, seed, y=y, grads=grads)


def test_torch_path_on_a_strided_view(monkeypatch):
    """Outputs of the torch implementation are laid out as the op's fake says (empty_like, preserve_format)."""
    monkeypatch.setenv("FASTCIFAR_KERNELS_DISABLE", "1")
    big, w, b, _, seed = make_inputs((2, 8, 14, 7), 2, "cl")
    x = big[:, :, ::2, :]
    dy = torch.randn(1, 1, 1, 1, device=DEV).expand(x.shape)
    y, grads = run_fused(x, 2, w, b, dy)
    want = torch.empty_like(x, memory_format=torch.preserve_format).stride()
    assert y.stride() == want and grads[0].stride() == want
    check_against_reference(x, 2, w, b, dy, seed, y=y, grads=grads)


@needs_fused
def test_environment_is_read_once(monkeypatch, poisoned):
    x, w, b, dy, _ = make_inputs((2, 8, 4, 4), 2)
    fk.group_norm_relu(x, 2, w, b)
    n = len(poisoned)
    assert n > 0
    monkeypatch.setenv("FASTCIFAR_KERNELS_DISABLE", "1")  # too late: the route was decided on first use
    fk.group_norm_relu(x, 2, w, b)
    assert len(poisoned) > n
    impl._reset_routes()
    n = len(poisoned)
    fk.group_norm_relu(x, 2, w, b)
    assert len(poisoned) == n, "after a reset the environment is read again"


def test_float64_runs_the_torch_path(poisoned):
    x, w, b, dy, seed = make_inputs((2, 8, 5, 5), 2, dtype=torch.float64)
    y, grads = run_fused(x, 2, w, b, dy)
    assert not poisoned
    check_against_reference(x, 2, w, b, dy, seed, tol=1e-12, y=y, grads=grads)


def test_bf16_before_sm80_is_refused(monkeypatch):
    """A bf16 kernel on a GPU without bf16 would be miscompiled or rejected by ptxas: a clear error instead."""
    assert impl._dtype_gate(torch.bfloat16, (8, 0)) is None and impl._dtype_gate(torch.bfloat16, (9, 0)) is None
    assert impl._dtype_gate(torch.float16, (7, 5)) is None and impl._dtype_gate(torch.float32, (6, 0)) is None
    assert "sm_75" in impl._dtype_gate(torch.bfloat16, (7, 5)) and "float16" in impl._dtype_gate(torch.bfloat16, (7, 5))
    if impl.triton is None:
        pytest.skip("the route is torch without triton")
    monkeypatch.setattr(impl, "_INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    cuda = torch.device("cuda")
    assert impl._static_route(cuda, torch.float16) == "triton"
    assert impl._static_route(cuda, torch.bfloat16).startswith("error: bfloat16 needs")
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        fk.verify_kernel("cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert impl._static_route(cuda, torch.bfloat16) == "triton"


# ------------------------------------------------------------------------------------------------
# in a model
# ------------------------------------------------------------------------------------------------
@needs_fused
def test_fused_model_matches_unfused_model():
    models = pytest.importorskip("fastcifar.models")
    ref = models.make_model("ln").to(DEV)
    fused = models.make_model("ln", fused=True).to(DEV)
    gns = [m for m in ref.modules() if isinstance(m, nn.GroupNorm)]
    fus = [m for m in fused.modules() if isinstance(m, fk.GroupNormReLU)]
    assert len(gns) == len(fus) > 0
    with torch.no_grad():
        for m in gns:
            m.weight.normal_(1, 0.2)
            m.bias.normal_(0, 0.1)
    fused_sd = {}  # copy every parameter in module order (the fused model nests one level less)
    for (k_f, _), (_, v_r) in zip(fused.state_dict().items(), ref.state_dict().items(), strict=True):
        fused_sd[k_f] = v_r
    fused.load_state_dict(fused_sd)
    x = torch.randn(2, 3, 32, 32, device=DEV).to(memory_format=torch.channels_last)
    outs = []
    for m in (ref, fused):
        m.zero_grad()
        out = m(x)
        out.square().sum().backward()
        outs.append((out.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    assert rel(outs[1][0], outs[0][0]) < 1e-4
    for g_f, g_r in zip(outs[1][1], outs[0][1], strict=True):
        assert rel(g_f, g_r) < 1e-3  # fp32 vs fp32 through five layers, different reduction order


# ------------------------------------------------------------------------------------------------
# self-check: verify_kernel, kernel_status
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_status(monkeypatch):
    """Verification results and routes of this test only."""
    monkeypatch.setattr(impl, "_STATUS", {})
    monkeypatch.setattr(impl, "_ROUTES", {})


@needs_fused
@pytest.mark.parametrize("cl", [True, False])
def test_correct_kernel_verifies(cl, fresh_status):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fk.verify_kernel(DEV, torch.float32, channels_last=cl, strict=True) is True
    key = f"{DEV.type}/float32/{'channels_last' if cl else 'contiguous'}"
    assert fk.kernel_status() == {key: "ok"}


@needs_fused
@pytest.mark.parametrize("broken", ["forward", "backward"])
def test_broken_kernel_is_caught_and_falls_back(broken, fresh_status, monkeypatch, poisoned):
    real = impl._forward if broken == "forward" else impl._backward

    def perturbed(*args, **kwargs):
        out = real(*args, **kwargs)
        bad = out[0] if broken == "forward" else out[2]  # y, or db
        bad[(0,) * bad.dim()] += 0.5
        return out
    monkeypatch.setattr(impl, "_forward" if broken == "forward" else "_backward", perturbed)
    layer = fk.GroupNormReLU(3, 12).to(DEV)
    x, w, b, dy, seed = make_inputs((2, 12, 4, 4), 3, "cl")
    with pytest.warns(RuntimeWarning, match="disagrees with torch.*max relative error") as record:
        y = layer(x.requires_grad_())  # first use runs the self-check
        y.backward(dy)
        assert fk.verify_kernel(DEV, torch.float32, channels_last=True) is False
        layer(x).backward(dy)
    assert len([r for r in record if issubclass(r.category, RuntimeWarning)]) == 1, "warns once"
    status = fk.kernel_status()[f"{DEV.type}/float32/channels_last"]
    assert status.startswith("mismatch: max relative error") and ("y" if broken == "forward" else "db") in status
    assert not fk.fused_available(x)
    n = len(poisoned)
    y, grads = run_fused(x, 3, layer.weight, layer.bias, dy)
    assert len(poisoned) == n, "the kernels ran after failing their check"
    check_against_reference(x, 3, layer.weight, layer.bias, dy, seed, y=y, grads=grads)
    with pytest.raises(RuntimeError, match="mismatch"):
        fk.verify_kernel(DEV, torch.float32, channels_last=True, strict=True)


@needs_fused
def test_fused_available_is_never_true_before_the_self_check(fresh_status, monkeypatch):
    x = make_inputs((2, 8, 4, 4), 2, "cl")[0]
    assert fk.fused_supported(DEV) is True and fk.fused_supported(DEV, torch.float64) is False
    assert fk.kernel_status() == {}, "fused_supported runs nothing"
    assert fk.fused_available(x) is True
    assert fk.kernel_status() == {f"{DEV.type}/float32/channels_last": "ok"}, "True only after a passed check"
    real = impl._forward
    monkeypatch.setattr(impl, "_forward", lambda *a, **k: (lambda out: (out[0].add_(1), *out[1:]))(real(*a, **k)))
    with pytest.warns(RuntimeWarning, match="disagrees"):
        assert fk.fused_available(DEV, torch.float32, channels_last=False) is False
    assert fk.kernel_status()[f"{DEV.type}/float32/contiguous"].startswith("mismatch")


def test_verify_where_the_kernels_cannot_run(fresh_status):
    assert fk.verify_kernel("meta") is False
    with pytest.raises(RuntimeError, match="unavailable"):
        fk.verify_kernel("meta", strict=True)
    assert fk.kernel_status() == {}, "an unavailable key is not a verified one"


# ------------------------------------------------------------------------------------------------
# the torch.library op: opcheck, and torch.compile with inductor
# ------------------------------------------------------------------------------------------------
def _op_args(fmt, requires_grad=True):
    x, w, b, _, _ = make_inputs((2, 8, 3, 4), 2, fmt)
    return tuple(t.requires_grad_(requires_grad) for t in (x, w, b))


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_opcheck(path, fmt, monkeypatch, poisoned):
    if path == "triton" and not FUSED_HERE:
        pytest.skip("Triton cannot run here")
    if path == "torch":
        monkeypatch.setenv("FASTCIFAR_KERNELS_DISABLE", "1")
    x, w, b = _op_args(fmt)
    for args in ((x, 2, w, b, 1e-5), (x, 2, None, None, 1e-5)):
        torch.library.opcheck(torch.ops.fastcifar_kernels.group_norm_relu.default, args)
    y, mean, rstd = torch.ops.fastcifar_kernels.group_norm_relu(x, 2, w, b, 1e-5)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastcifar_kernels.group_norm_relu_backward.default,
                          (dy, x.detach(), mean, rstd, 2, w.detach(), b.detach(), True, True, False))
    assert bool(poisoned) == (path == "triton")


def _compile_check(backend, fmt):
    torch._dynamo.reset()
    mod = nn.Sequential(nn.Conv2d(4, 8, 1), fk.GroupNormReLU(2, 8), nn.Conv2d(8, 8, 1), fk.GroupNormReLU(1, 8)).to(DEV)
    with torch.no_grad():
        for m in mod:
            if isinstance(m, fk.GroupNormReLU):
                m.bias.normal_(0, 0.1)
    x = torch.randn(2, 4, 6, 6, device=DEV).to(memory_format=FORMATS[fmt])
    dy = torch.randn(2, 8, 6, 6, device=DEV)
    compiled = torch.compile(mod, backend=backend, fullgraph=True)
    outs = []
    for fn in (compiled, mod):
        mod.zero_grad()
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.backward(dy)
        outs.append((y.detach(), y.stride(), xg.grad, [p.grad.clone() for p in mod.parameters()]))
    torch._dynamo.reset()
    (y_c, s_c, gx_c, gp_c), (y_e, s_e, gx_e, gp_e) = outs
    assert s_c == s_e and rel(y_c, y_e) < 1e-5 and rel(gx_c, gx_e) < 1e-5
    assert all(rel(a, b) < 1e-5 for a, b in zip(gp_c, gp_e, strict=True))


@needs_fused
def test_torch_compile_fullgraph_aot_eager(poisoned):
    """Fast: one graph through the op and its registered autograd, on the Triton path."""
    _compile_check("aot_eager", "cl")
    assert poisoned, "the kernels did not run"


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor_cpu(monkeypatch, poisoned):
    """Inductor on the CPU, where the op's torch implementation runs (the kernels are the interpreter's)."""
    monkeypatch.setenv("FASTCIFAR_KERNELS_DISABLE", "1")
    _compile_check("inductor", "cl")
    assert not poisoned


@pytest.mark.parametrize("hidden", ["triton", "numpy"])
def test_imports_and_runs_without(hidden):
    """fastcifar_kernels must import and train (the torch implementation) where triton cannot be imported, and
    where numpy cannot: torch does not depend on it, and only triton's interpreter, not asked for here, needs it."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys, warnings
        warnings.simplefilter("ignore")  # torch's own "Failed to initialize NumPy"
        class Hide(importlib.abc.MetaPathFinder):  # as if not installed
            def __init__(self, f):
                self.f = f
            def find_spec(self, name, path=None, target=None):
                return None if name.split(".")[0] == {hidden!r} else self.f.find_spec(name, path, target)
        sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
        import torch, torch.nn.functional as F, fastcifar_kernels as fk
        assert not fk.fused_available("cpu") and not fk.verify_kernel("cpu")
        x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
        layer = fk.GroupNormReLU(2, 8).double()
        layer(x).square().sum().backward()
        x2 = x.detach().requires_grad_()
        F.relu(F.group_norm(x2, 2, layer.weight, layer.bias)).square().sum().backward()
        assert torch.allclose(x.grad, x2.grad, atol=1e-12) and {hidden!r} not in sys.modules
        print("ok", sys.modules["fastcifar_kernels.group_norm_relu"].triton is None)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", str(hidden == "triton" or impl.triton is None)]


# ------------------------------------------------------------------------------------------------
# real compilation for a GPU, without one
# ------------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import sys
import fastcifar_kernels  # noqa: F401
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
m = sys.modules["fastcifar_kernels.group_norm_relu"]
assert not m._INTERPRETED
STATS = ("MEAN", "RSTD", "DWP", "DBP", "PMEAN", "PM2", "S1P", "S2P")
TENSORS = ("X", "Y", "DY", "DX", "W", "B")
n = 0
for dt in ("fp32", "bf16"):
    # (cpg, hw, affine, ints equal to 1, phase, BLOCK_C, BLOCK_HW, warps): the model shapes' tiles, both split
    # phases, the looped paths, and the constexpr-1 arguments the launcher makes of cpg = HW = 1
    for cpg, hw, affine, ones, phase, bc, bhw, warps in [
            (32, 64, True, False, 0, 32, 64, 8), (46, 16, False, False, 0, 64, 16, 4),
            (46, 16, True, False, 0, 16, 16, 4), (8, 64, True, False, 1, 8, 64, 4), (8, 64, True, False, 2, 8, 64, 4),
            (24, 1024, True, False, 2, 4, 512, 4), (1, 1, True, True, 0, 1, 16, 1)]:
        for kern in (m._gn_relu_fwd_kernel, m._gn_relu_bwd_kernel):
            flags = dict(HAS_W=affine, HAS_B=affine, STORE_DW=affine, STORE_DB=affine, COMPUTE_DX=True, FLAT_HW=True,
                         BLOCK_C=bc, BLOCK_HW=bhw, ONE_TILE=bc >= cpg and bhw >= hw, PHASE=phase)
            consts = {k: v for k, v in flags.items() if k in kern.arg_names}
            if ones:
                consts.update({a: 1 for a in ("cpg", "HW", "G", "width", "CPS", "S") if a in kern.arg_names})
            sig = {a: "constexpr" if a in consts else "*fp32" if a in STATS else "*" + dt if a in TENSORS
                   else "fp32" if a == "eps" else "i32" for a in kern.arg_names}
            k = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert k.asm.get("cubin"), "no cubin"
            n += 1
print("compiled", n)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter accepts code the compiler rejects (types, loop-carried values, constexpr-1
    arguments): compile the model shapes' variants and both split phases to sm_90 cubins with ptxas,
    in a process where TRITON_INTERPRET is unset."""
    try:
        from triton.backends.nvidia import compiler as _  # noqa: F401
    except Exception:  # noqa: BLE001
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: really compile
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled 28" in r.stdout



# ------------------------------------------------------------------------------------------------
# CUDA only: low precision and a bigger batch on the compiled kernels
# ------------------------------------------------------------------------------------------------
def verified_then_poisoned(poisoned, dtype, fmt):
    """The self-check for this key first (strict), so the allocations counted after it are the call's own."""
    fk.verify_kernel("cuda", dtype, channels_last=fmt == "cl", strict=True)
    return len(poisoned)


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cuda_dtypes_on_model_shapes(dtype, tol, fmt, poisoned):
    """Low-precision inputs are compared with float64 math on the same (rounded) inputs; the
    tolerance is a couple of output ulps (fp16 2**-10, bf16 2**-7), statistics being fp32."""
    for C, H, W, G in MODEL_SHAPES:
        x, w, b, dy, seed = make_inputs((64, C, H, W), G, fmt, dtype=dtype)
        n = verified_then_poisoned(poisoned, dtype, fmt)
        y, grads = run_fused(x, G, w, b, dy)
        assert len(poisoned) > n, "the Triton path did not run"
        assert y.dtype == dtype and grads[1].dtype == dtype
        assert y.is_contiguous(memory_format=FORMATS[fmt])
        check_against_reference(x, G, w, b, dy, seed, tol=tol, y=y, grads=grads)


@needs_cuda
def test_cuda_fp32_weight_with_bf16_activations(poisoned):
    """What autocast produces: bf16 activations, fp32 parameters; grads keep each input's dtype."""
    x, _, _, dy, seed = make_inputs((8, 40, 16, 16), 5, "cl", dtype=torch.bfloat16)
    w = 1 + 0.2 * torch.randn(40, device="cuda")
    b = 0.05 * torch.randn(40, device="cuda")
    n = verified_then_poisoned(poisoned, torch.bfloat16, "cl")
    y, grads = run_fused(x, 5, w, b, dy)
    assert len(poisoned) > n, "the Triton path did not run"
    assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    check_against_reference(x, 5, w, b, dy, seed, tol=1.6e-2, y=y, grads=grads)


# ------------------------------------------------------------------------------------------------
# benchmark on a machine without CUDA
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; a GPU would start timing")
def test_kernel_benchmark_skips_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # benchmarks/ runs from the checkout; it is not installed
    bench = importlib.import_module("benchmarks.kernels")
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    with open(tmp_path / "kernels.json") as f:
        report = json.load(f)
    assert report["skipped"] is True and "CUDA" in report["reason"]
