import pytest
import torch
import torch.nn.functional as F

from fastcifar.models import (ARCHS, NORMS, PARAM_BUDGET, PatchWhitening, SeparableConv2d, StandardizedConv2d, count_params,
                              make_model)
from fastcifar.config import TrainConfig
from fastcifar.optim import make_optimizer


# the counts the README and results report; norms cost the same 2*C parameters in every variant
KNOWN_PARAMS = {"lean": 49_514, "lean-gelu": 49_514, "deep": 49_906, "deep8": 48_330, "separable": 49_598,
                "separable-res": 49_734, "separable-res-gelu": 49_734}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", NORMS)
def test_within_parameter_budget(norm, arch):
    m = make_model(norm, arch)
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    assert frozen == m.stem.weight.numel() > 0  # the frozen stem counts against the budget too
    assert count_params(m) == KNOWN_PARAMS[arch] <= PARAM_BUDGET


@pytest.mark.parametrize("arch,size", [("lean", 16), ("deep", 32), ("deep8", 32), ("separable", 32),
                                       ("separable-res", 32), ("separable-res-gelu", 32),
                                       ("lean-gelu", 16)])
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
    # gn/ln standardize the composite filter of each pair, not either factor
    assert not any(isinstance(m, StandardizedConv2d) for m in convs)
    pairs = [m for m in make_model(norm, "separable").modules() if isinstance(m, SeparableConv2d)]
    assert len(pairs) == 7 and all(p.standardize == (norm != "bn") for p in pairs)


def composite_filter(pair):
    """float64: the 3x3 filter the pair applies, pointwise[o, i] * depthwise[i]"""
    pointwise = pair[1].composite_weight() if pair.standardize else pair[1].weight
    return pointwise.double().flatten(1)[:, :, None, None] * pair[0].weight.double().squeeze(1)[None]


@pytest.mark.parametrize("c_in,c_out", [(5, 7), (24, 36), (104, 136)])
def test_standardized_separable_conv_is_a_3x3_conv_with_a_standardized_composite_filter(c_in, c_out):
    torch.manual_seed(0)
    pair = SeparableConv2d(c_in, c_out, standardize=True).double()
    with torch.no_grad():  # filters large enough that the 1e-5 added to the variance (as StandardizedConv2d) is noise
        pair[0].weight.mul_(10), pair[1].weight.mul_(10)
    w = composite_filter(pair)
    var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False)
    assert mean.abs().max() < 1e-12
    assert torch.allclose(var, torch.ones_like(var), atol=1e-3)
    x = torch.randn(3, c_in, 9, 9, dtype=torch.float64)
    assert torch.allclose(pair(x), F.conv2d(x, w, padding=1), atol=1e-10)
    # fp32 and channels_last stay close to the float64 result
    pair32 = SeparableConv2d(c_in, c_out, standardize=True)
    pair32.load_state_dict(pair.state_dict())
    out32 = pair32(x.float().contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out32.double(), F.conv2d(x, w, padding=1), atol=1e-4)


def test_standardized_separable_conv_gradients():
    torch.manual_seed(0)
    pair = SeparableConv2d(4, 5, standardize=True).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d, w: torch.func.functional_call(pair, {"0.weight": d, "1.weight": w}, (x,)),
                                    (x, pair[0].weight.detach().clone().requires_grad_(),
                                     pair[1].weight.detach().clone().requires_grad_()))


def test_standardized_separable_conv_ignores_filter_scale_and_constant_inputs():
    torch.manual_seed(0)
    pair = SeparableConv2d(6, 8, standardize=True)
    with torch.no_grad():  # filters large enough that the 1e-5 added to their variance (as in StandardizedConv2d) is noise
        pair[0].weight.mul_(10)
    x = torch.randn(2, 6, 8, 8)
    before = pair(x)
    with torch.no_grad():
        pair[1].weight.mul_(torch.rand(8, 1, 1, 1) * 3 + 1)  # any positive scale per output filter
        pair[0].weight.mul_(2.5)  # one scale for every depthwise filter
    assert torch.allclose(pair(x), before, rtol=1e-4, atol=1e-3)
    # a zero-mean composite filter maps a constant image to zero away from the zero-padded border
    assert pair(torch.full((1, 6, 8, 8), 3.0))[..., 1:-1, 1:-1].abs().max() < 1e-4
    plain = SeparableConv2d(6, 8)
    assert torch.equal(plain(x), plain[1](plain[0](x)))


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
    opt = make_optimizer(m, TrainConfig.resolve(lr=0.2))
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
    model = make_model(norm, arch)
    pairs = [m for m in model.features.modules() if isinstance(m, SeparableConv2d)]
    in_pairs = {id(c) for p in pairs for c in p}
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d) and id(m) not in in_pairs]
    # a full conv standardizes its own filter; a separable pair standardizes the composite of its two
    assert convs or pairs
    assert all(isinstance(c, StandardizedConv2d) == standardized for c in convs)
    assert all(p.standardize == standardized for p in pairs)


def test_a_shortcut_adds_the_blocks_input_and_costs_no_parameters():
    from fastcifar.models import Layout, Residual
    plain, short = (make_model("bn", Layout.parse(s)) for s in ("d24p d32 d32", "d24p d32 d32r"))
    assert count_params(plain) == count_params(short)
    assert Layout.parse("d24p d32 d32r").blocks[-1] == (32, False, True)
    res = [m for m in short.modules() if isinstance(m, Residual)]
    assert len(res) == 1
    x = torch.randn(2, 32, 8, 8)
    assert torch.allclose(res[0](x), x + torch.nn.Sequential(*res[0])(x))
    with pytest.raises(ValueError, match="keeps its input's shape"):
        make_model("bn", Layout.parse("d24p d32r"))  # 24 -> 32 channels
    for bad in ("d24p d32pr", "d24p d32rp", "d24p d3x"):
        with pytest.raises(ValueError, match="at most one of"):
            Layout.parse(bad)


@pytest.mark.parametrize("norm", NORMS)
def test_a_layouts_activation_replaces_the_blocks_relus_but_not_the_stems(norm):
    from fastcifar.models import Layout
    relu = make_model(norm, Layout.parse("d24p d32 d32r"))
    gelu = make_model(norm, Layout.parse("d24p d32 d32r", act="gelu"), fused=True)
    kinds = lambda m: [type(x).__name__ for x in m.features.modules()]  # noqa: E731
    assert "ReLU" not in kinds(gelu) and kinds(gelu).count("GELU") == 3  # the fused kernel is ReLU's: unfused
    assert count_params(gelu) == count_params(relu)
    gelu.load_state_dict(relu.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gelu.stem(x), relu.stem(x)) and not torch.allclose(gelu(x), relu(x))
    with pytest.raises(ValueError, match="unknown activation"):
        Layout.parse("d24p d32", act="tanh")
