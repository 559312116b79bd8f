"""Checkpoints that do not fit: a one-line CheckpointError naming the file and the piece, never a traceback from
load_state_dict, and never a state that loads and breaks the first step after it."""
import os

import pytest
import torch
from torch import nn

from fastcifar.checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint


def parts(seed=0, width=4):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(2, 3, 6, 6))
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 5e-4},
                           {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def stepped(seed=0, width=4):
    model, opt, sched = parts(seed, width)
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def full_state(model, opt, sched, epoch=1):
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "loader": {"generator": torch.Generator().get_state()}, "rng": {"cpu": torch.get_rng_state()},
            "device": "cpu", "epoch": epoch,
            "history": [{"epoch": i + 1, "train_loss": 1.0, "test_acc": 0.5} for i in range(epoch)],
            "config": {"norm": "bn", "epochs": 2}, "model_config": {"norm": "bn", "arch": "lean"},
            "compile_time_s": 0.0}


def expect(match, fn, *a):
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*a)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_a_fitting_checkpoint_restores_every_piece(tmp_path):
    p = str(tmp_path / "model.pt")
    save_checkpoint(p, full_state(*stepped()))
    ckpt = load_checkpoint(p)
    model, opt, sched = parts(seed=1)
    for what, obj in (("model", model), ("optimizer", opt), ("scheduler", sched)):
        load_state(obj, ckpt[what], what, p)
    want = stepped()[0].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert sched.last_epoch == 1 and len(opt.state) == 6
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    opt.step()  # and the restored state trains on


def _model_state(edit):
    model = stepped()[0]
    s = model.state_dict()
    edit(s)
    return s


MODEL_MISFITS = {
    "a wider conv": (lambda s: s.update({"0.weight": torch.zeros(8, 3, 3, 3)}), "size mismatch"),
    "a missing key": (lambda s: s.pop("1.running_mean"), "Missing key"),
    "an extra key": (lambda s: s.update({"9.weight": torch.zeros(1)}), "Unexpected key"),
    "a list for a tensor": (lambda s: s.update({"0.bias": [0.0] * 4}), "0.bias"),
}


@pytest.mark.parametrize("case", MODEL_MISFITS)
def test_a_model_state_that_does_not_fit(tmp_path, case):
    edit, match = MODEL_MISFITS[case]
    p = str(tmp_path / "model.pt")
    msg = expect(match, load_state, parts()[0], _model_state(edit), "model", p)
    assert msg.startswith(f"{p}: the checkpoint's model state does not fit this run"), msg


def _opt_state(edit):
    s = stepped()[1].state_dict()
    edit(s)
    return s


OPT_MISFITS = {
    "a momentum buffer of another shape": (lambda s: s["state"][0].update(momentum_buffer=torch.zeros(5, 3)),
                                           r"state\[0\]\['momentum_buffer'\] has shape \(5, 3\)"),
    "a momentum buffer that is a string": (lambda s: s["state"][1].update(momentum_buffer="x"), "is a str"),
    "one group": (lambda s: s["param_groups"].pop(), "1 parameter groups, not 2"),
    "a group short of a parameter": (lambda s: s["param_groups"][1]["params"].pop(), "does not list its 4"),
    "a string learning rate": (lambda s: s["param_groups"][0].update(lr="0.1"), r"\['lr'\] is '0.1', not a number"),
    "a group without momentum": (lambda s: s["param_groups"][0].pop("momentum"), "lacks 'momentum'"),
    "state for no parameter": (lambda s: s["state"].update({7: {"momentum_buffer": torch.zeros(1)}}),
                               "which no group lists"),
    "no state at all": (lambda s: s.pop("state"), "not an optimizer's state dict"),
}


@pytest.mark.parametrize("case", OPT_MISFITS)
def test_an_optimizer_state_that_does_not_fit(tmp_path, case):
    edit, match = OPT_MISFITS[case]
    p = str(tmp_path / "model.pt")
    opt = parts()[1]
    msg = expect(match, load_state, opt, _opt_state(edit), "optimizer", p)
    assert msg.startswith(f"{p}: the checkpoint's optimizer state does not fit this run"), msg


def test_a_wider_runs_optimizer_does_not_fit(tmp_path):
    """The same structure with other shapes: torch itself would load it and fail at the next step."""
    expect(r"has shape \(8, 3, 3, 3\), not \(4, 3, 3, 3\)", load_state, parts()[1], stepped(width=8)[1].state_dict(),
           "optimizer", "x/model.pt")


SCHED_MISFITS = {
    "a string epoch": (lambda s: s.update(last_epoch="3"), r"\['last_epoch'\] is '3', not a number"),
    "a missing key": (lambda s: s.pop("base_lrs"), "lacks 'base_lrs'"),
    "three learning rates": (lambda s: s.update(base_lrs=[0.1] * 3), r"\['base_lrs'\] is not a list of 2"),
    "empty": (lambda s: s.clear(), "lacks"),
}


@pytest.mark.parametrize("case", SCHED_MISFITS)
def test_a_scheduler_or_loader_state_that_does_not_fit(case):
    edit, match = SCHED_MISFITS[case]
    s = stepped()[2].state_dict()
    edit(s)
    expect(match, load_state, parts()[2], s, "scheduler", "r/model.pt")


def test_a_loader_state_that_does_not_fit():
    from fastcifar.data.loaders import ResidentLoader

    class Tiny(ResidentLoader):  # its state is its generator's: no data needed
        def __init__(self):
            self.generator = torch.Generator()
    expect(r"loader\['generator'\] has shape \(7,\)", load_state, Tiny(),
           {"generator": torch.zeros(7, dtype=torch.uint8)}, "loader", "r/model.pt")
    expect("lacks 'generator'", load_state, Tiny(), {}, "loader", "r/model.pt")
    load_state(Tiny(), {"generator": torch.Generator().get_state()}, "loader", "r/model.pt")


TOP_LEVEL = {
    "epoch as a string": (lambda s: s.update(epoch="1"), "'epoch' is '1'"),
    "a negative epoch": (lambda s: s.update(epoch=-1), "'epoch' is -1"),
    "history shorter than its epochs": (lambda s: s.update(epoch=2), "not a list of 2 epochs"),
    "a history entry that is a string": (lambda s: s["history"].__setitem__(0, "x"), "entry 0"),
    "a history of another epoch": (lambda s: s["history"][0].update(epoch=5), "entry 0 is not epoch 1"),
    "config as a list": (lambda s: s.update(config=["--norm", "bn"]), "'config' is not a dict"),
    "no model config": (lambda s: s.pop("model_config"), "'model_config' is not a dict"),
    "no optimizer": (lambda s: s.pop("optimizer"), "'optimizer' is not a state dict"),
    "an rng state of another length": (lambda s: s["rng"].update(cpu=torch.zeros(7, dtype=torch.uint8)),
                                       "'rng' does not hold"),
    "no compile time": (lambda s: s.pop("compile_time_s"), "'compile_time_s'"),
    "a device of another kind": (lambda s: s.update(device="tpu"), "'device' is 'tpu'"),
    "an rng state of floats": (lambda s: s["rng"].update(cpu=torch.zeros(5)), "'rng' does not hold"),
    "a cuda rng state that is not a list": (lambda s: s["rng"].update(cuda=torch.zeros(5, dtype=torch.uint8)),
                                            "'rng' does not hold"),
    "no rng": (lambda s: s.pop("rng"), "'rng' does not hold"),
    "a model that is a tensor": (lambda s: s.update(model=torch.zeros(3)), "'model' is not a state dict"),
    "a compile time that is a string": (lambda s: s.update(compile_time_s="1s"), "'compile_time_s'"),
}


@pytest.mark.parametrize("case", TOP_LEVEL)
def test_a_checkpoint_whose_top_level_is_wrong(tmp_path, case):
    edit, match = TOP_LEVEL[case]
    s = full_state(*stepped())
    edit(s)
    p = str(tmp_path / "model.pt")
    save_checkpoint(p, s)
    msg = expect(match, load_checkpoint, p)
    assert msg.startswith(f"{p}: damaged checkpoint: "), msg


def test_unreadable_and_foreign_checkpoints(tmp_path):
    p = str(tmp_path / "model.pt")
    expect("no such checkpoint", load_checkpoint, p)
    open(p, "wb").write(b"PK\x03\x04 not really a zip")
    expect("not a readable checkpoint", load_checkpoint, p)
    torch.save({"state_dict": {}}, p)
    expect("not a fastcifar checkpoint", load_checkpoint, p)
    assert os.path.exists(p)
