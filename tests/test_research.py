"""research/: screens run through fit's extension points, on a tiny source."""
import json
import os

import pytest
import torch

from fastcifar.config import TrainConfig
from fastcifar.models import count_params
from research import screen, step_timing


def test_a_layout_screen_scores_only_the_epochs_asked_for(tmp_path, small_source, capsys):
    out = str(tmp_path / "s")
    screen.main(["--layout", "d24p d32 d48p", "--eval-epochs", "1", "--", "--norm", "gn", "--epochs", "3",
                 "--batch-size", "32", "--limit", "64", "--tta", "off", "--data", small_source, "--device", "cpu",
                 "--quiet", "--no-plots", "--out", out])
    rec = json.load(open(os.path.join(out, "screen.json")))
    assert [e for e, acc in rec["scored"] if acc is not None] == [1, 3]  # the last epoch always
    built = screen.layout_factory("d24p d32 d48p")(TrainConfig.resolve(norm="gn"), False)
    assert rec["params"] == count_params(built) and "SCREEN" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "metrics.json")))["config"]["epochs"] == 3


def test_a_named_layout_screen_records_that_layouts_stem_stride(tmp_path, small_source):
    out = str(tmp_path / "s")
    screen.main(["--layout", "lean", "--", "--norm", "bn", "--epochs", "1", "--batch-size", "32", "--limit", "64",
                 "--tta", "off", "--data", small_source, "--device", "cpu", "--quiet", "--no-plots", "--out", out])
    assert json.load(open(os.path.join(out, "screen.json")))["stem_stride"] == 2  # not the spec flag's default 1


def test_step_timing_prints_a_row_per_layout_and_norm(capsys):
    step_timing.main(["--layout", "lean", "--norm", "bn", "ln", "--steps", "1", "--warmup", "0", "--batch", "8",
                      "--threads", "1", "--optimizer", "sgd", "muon"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("lean")]
    assert [r[3] for r in rows] == ["sgd", "muon"] * 2 and all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)


def test_a_spec_on_a_stride_2_stem_is_lean_when_it_spells_lean():
    cfg = TrainConfig.resolve(norm="bn")
    spelled = screen.layout_factory("c32p c32 c46p c46", stem_stride=2)(cfg, False)
    lean = screen.layout_factory("lean")(cfg, False)
    assert spelled.stem.stride == 2 and count_params(spelled) == count_params(lean)
    assert screen.layout_factory("c32p c32 c46p c46")(cfg, False).stem.stride == 1
    x = torch.randn(2, 3, 32, 32)
    spelled.load_state_dict(lean.state_dict())
    assert torch.equal(spelled.eval()(x), lean.eval()(x))


def test_the_muon_options_reach_only_the_muon_groups_and_need_muon():
    model = screen.layout_factory("lean")(TrainConfig.resolve(norm="bn"), False)
    opt = screen.muon_options_factory(0.01, True)(model, TrainConfig.resolve(optimizer="muon", muon_lr=0.1))
    assert [(g["weight_decay"], g["normalize"]) for g in opt.param_groups if g["muon"]] == [(0.01, True)]
    assert all(not g["normalize"] for g in opt.param_groups if not g["muon"])
    with pytest.raises(ValueError, match="need --optimizer muon"):
        screen.muon_options_factory(0.01)(model, TrainConfig.resolve(optimizer="sgd"))


def test_block_options_swap_the_blocks_activations_and_pools_but_not_the_stem():
    cfg = TrainConfig.resolve(norm="bn")
    plain = screen.layout_factory("d24p d32 d32r d48p")(cfg, False)
    mixed = screen.block_options(screen.layout_factory("d24p d32 d32r d48p"), "gelu", "all")(cfg, False)
    kinds = lambda m: [type(x).__name__ for x in m.features.modules()]  # noqa: E731
    assert "ReLU" not in kinds(mixed) and kinds(mixed).count("GELU") == kinds(plain).count("ReLU") == 4
    assert kinds(mixed).count("MixPool") == 3 and count_params(mixed) == count_params(plain)
    mixed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(mixed.stem(x), plain.stem(x)) and not torch.allclose(mixed.eval()(x), plain.eval()(x))
    pool = screen.MixPool(2)
    assert torch.equal(pool(torch.tensor([[[[0., 2.], [4., 6.]]]])), torch.tensor([[[[4.5]]]]))  # (6 + 3) / 2
    with pytest.raises(ValueError, match="unfused norm"):
        screen.block_options(_fused_gn_factory, "gelu")(TrainConfig.resolve(norm="gn"), True)


def _fused_gn_factory(cfg, fused):
    class GroupNormReLU(torch.nn.Module):  # the kernel module's name, without needing Triton
        pass
    model = screen.layout_factory("d24p d32")(cfg, False)
    model.features[2] = GroupNormReLU()
    return model
