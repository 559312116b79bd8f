import pytest
import torch
import torch.nn.functional as F

from fastcifar.models import ARCHS, NORMS, PARAM_BUDGET, PatchWhitening, StandardizedConv2d, count_params, make_model
from fastcifar.train import make_optimizer


# the counts the README and results report; norms cost the same 2*C parameters in every variant
KNOWN_PARAMS = {"lean": 49_514, "deep": 49_906, "deep8": 48_330, "separable": 49_598}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", NORMS)
def test_within_parameter_budget(norm, arch):
    m = make_model(norm, arch)
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    assert frozen == m.stem.weight.numel() > 0  # the frozen stem counts against the budget too
    assert count_params(m) == KNOWN_PARAMS[arch] <= PARAM_BUDGET


@pytest.mark.parametrize("arch,size", [("lean", 16), ("deep", 32), ("deep8", 32), ("separable", 32)])
def test_stem_resolution(arch, size):
    m = make_model("bn", arch)
    assert m.stem(torch.randn(2, 3, 32, 32)).shape[-2:] == (size, size)


@pytest.mark.parametrize("norm", NORMS)
def test_separable_layout_is_depthwise_then_pointwise(norm):
    convs = [m for m in make_model(norm, "separable").features.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise, pointwise = convs[0::2], convs[1::2]
    assert len(depthwise) == len(pointwise) == 7
    assert all(m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3) for m in depthwise)
    assert all(m.groups == 1 and m.kernel_size == (1, 1) for m in pointwise)
    # gn/ln standardize the pointwise filters only: a zero-mean 9-tap filter cannot pass a smooth image through
    assert not any(isinstance(m, StandardizedConv2d) for m in depthwise)
    assert all(isinstance(m, StandardizedConv2d) == (norm != "bn") for m in pointwise)


def test_ln_normalizes_over_c_h_w_with_per_channel_affine():
    norms = [m for m in make_model("ln").modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 1 and m.weight.shape == (m.num_channels,) for m in norms)
    gn = [m for m in make_model("gn").modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(1 < m.num_groups < m.num_channels for m in gn)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", NORMS)
def test_one_step_lowers_loss_on_a_fixed_batch(norm, arch):
    torch.manual_seed(0)
    m = make_model(norm, arch)
    x = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    before = F.cross_entropy(m(x), y)
    before.backward()
    opt.step()
    after = F.cross_entropy(m(x), y)
    assert after.item() < before.item()


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_weights_and_output_shape(arch):
    m = make_model("bn", arch)
    convs = [p for p in m.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_norm_or_arch_is_refused():
    with pytest.raises(ValueError, match="unknown norm"):
        make_model("xyz")
    with pytest.raises(ValueError, match="unknown arch"):
        make_model("bn", "wide")


def test_patch_whitening_decorrelates_the_patches_it_sees():
    torch.manual_seed(0)
    mix = torch.randn(3, 3) + 2 * torch.eye(3)  # correlated channels, and neighbouring pixels alike
    images = torch.einsum("oc,nchw->nohw", mix, torch.randn(400, 3, 16, 16)).repeat_interleave(2, -1)
    images = images + 0.1 * torch.randn_like(images)
    stem = PatchWhitening(eps=0.0).fit(images)
    n = stem.out_channels // 2
    z = F.conv2d(images, stem.weight[:n], stride=2).permute(0, 2, 3, 1).reshape(-1, n)
    cov = torch.cov(z.T.double())
    assert torch.allclose(cov, torch.eye(n, dtype=torch.double), atol=1e-3)
    assert torch.equal(stem.weight[n:], -stem.weight[:n])  # both signs survive the ReLU


def test_patch_whitening_refuses_the_wrong_shape():
    with pytest.raises(ValueError, match="non-empty"):
        PatchWhitening().fit(torch.randn(4, 1, 8, 8))


@pytest.mark.parametrize("norm", NORMS)
def test_training_leaves_the_whitening_filters_frozen(norm):
    torch.manual_seed(0)
    m = make_model(norm)
    m.stem.fit(torch.randn(64, 3, 32, 32))
    frozen, bias = m.stem.weight.clone(), m.stem.bias.clone()
    opt = make_optimizer(m, lr=0.2, weight_decay=5e-4)
    F.cross_entropy(m(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    opt.step()
    assert torch.equal(m.stem.weight, frozen) and not torch.equal(m.stem.bias, bias)


def test_standardized_conv_ignores_the_filters_scale_and_offset():
    torch.manual_seed(0)
    a = StandardizedConv2d(4, 6, 3, padding=1, bias=False)
    b = StandardizedConv2d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        b.weight.copy_(3 * a.weight + 0.5)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(a(x), b(x), rtol=2e-3, atol=1e-4)  # up to the 1e-5 added to the variance
    w = a.weight.double()
    w_std = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    ref = F.conv2d(x.double(), w_std, padding=1)
    assert torch.allclose(a(x).double(), ref, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm,standardized", [("bn", False), ("gn", True), ("ln", True)])
def test_gn_and_ln_standardize_their_conv_filters(norm, standardized, arch):
    convs = [m for m in make_model(norm, arch).features.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    assert convs and all(isinstance(c, StandardizedConv2d) == standardized for c in convs)
