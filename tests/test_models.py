import pytest
import torch
import torch.nn.functional as F

from fastcifar.models import NORMS, PARAM_BUDGET, count_params, make_model


@pytest.mark.parametrize("norm", NORMS)
def test_within_parameter_budget(norm):
    m = make_model(norm)
    # every parameter counts, the norms' affine ones included
    assert count_params(m) == sum(p.numel() for p in m.parameters()) <= PARAM_BUDGET


def test_ln_normalizes_over_c_h_w_with_per_channel_affine():
    norms = [m for m in make_model("ln").modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 1 and m.weight.shape == (m.num_channels,) for m in norms)
    gn = [m for m in make_model("gn").modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(1 < m.num_groups < m.num_channels for m in gn)


@pytest.mark.parametrize("norm", NORMS)
def test_one_step_lowers_loss_on_a_fixed_batch(norm):
    torch.manual_seed(0)
    m = make_model(norm)
    x = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    before = F.cross_entropy(m(x), y)
    before.backward()
    opt.step()
    after = F.cross_entropy(m(x), y)
    assert after.item() < before.item()


def test_channels_last_weights_and_output_shape():
    m = make_model("bn")
    convs = [p for p in m.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="unknown norm"):
        make_model("xyz")
