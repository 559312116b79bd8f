"""What training does with run folders and resumed checkpoints: never lose a run, never trust saved settings
more than the command line, never delete on a checkpoint's word."""
import multiprocessing
import os

import pytest
import torch

from fastcifar import loop, train
from fastcifar.checkpoint import load_checkpoint, save_checkpoint
from fastcifar.loop import fit

TINY = dict(batch_size=32, limit=64, epochs=1, tta="off", quiet=True, plots=False, device="cpu")


def main_error(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_each_run_gets_its_own_folder_and_latest_points_at_the_newest(tmp_path, small_arrays, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = fit(data=small_arrays, **TINY)
    b = fit(data=small_arrays, **TINY)
    assert a.out != b.out and os.path.dirname(a.out) == "runs" and os.path.basename(a.out).startswith("bn-fast-")
    assert os.path.isfile(os.path.join(a.out, "metrics.json")) and os.path.isfile(os.path.join(b.out, "model.pt"))
    assert os.path.realpath("runs/latest") == os.path.realpath(b.out)
    assert b.metrics["settings_from"]["out"] == loop.NEW_RUN_FOLDER


def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path, small_arrays):
    out = str(tmp_path / "run")
    first = fit(data=small_arrays, out=out, **TINY)
    argv = ["--data", small_arrays, "--out", out, "--batch-size", "32", "--limit", "64", "--epochs", "1",
            "--quiet", "--no-plots", "--device", "cpu", "--tta", "off"]
    msg = main_error(argv)
    assert msg.startswith(f"error: {out} already holds a run") and "--resume" in msg and "--overwrite" in msg
    assert load_checkpoint(os.path.join(out, "model.pt"))["history"] == first.metrics["history"]
    again = fit(data=small_arrays, out=out, overwrite=True, seed=1, **TINY)
    assert again.metrics["seed"] == 1


def _hold(out, ready, release):
    from fastcifar.rundir import claim
    with claim(out):
        ready.set()
        release.wait(60)


def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path, small_arrays):
    out = str(tmp_path / "busy")
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        msg = main_error(["--data", small_arrays, "--out", out, "--quiet", "--device", "cpu"])
        assert f"{out} is in use by another run (pid {holder.pid}" in msg
    finally:
        release.set()
        holder.join(30)
    assert not os.path.exists(os.path.join(out, "metrics.json"))  # the refused run wrote nothing


def test_an_interrupt_before_the_first_checkpoint_names_no_old_checkpoint(tmp_path, small_arrays, monkeypatch):
    out = str(tmp_path / "old")
    fit(data=small_arrays, out=out, **TINY)
    os.utime(os.path.join(out, "model.pt"), (1, 1))  # the earlier run's checkpoint, from long ago

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "setup", interrupted)
    msg = main_error(["--data", small_arrays, "--out", out, "--overwrite", "--quiet", "--device", "cpu"])
    assert msg == "interrupted: no checkpoint of this run was written yet, and no beton was left that a later " \
                  "run would trust"


@pytest.fixture
def finished(tmp_path, small_source):
    out = str(tmp_path / "done")
    fit(data=small_source, out=out, **TINY)  # from betons: a checkpoint names their folder
    return out


def edit_checkpoint(out, change):
    path = os.path.join(out, "model.pt")
    state = load_checkpoint(path)
    change(state)
    save_checkpoint(path, {k: v for k, v in state.items() if k != "version"})


def test_resumed_settings_pass_the_command_lines_checks(finished):
    edit_checkpoint(finished, lambda s: s["config"].update(lr=-1.0))
    msg = main_error(["--resume", finished, "--epochs", "2", "--quiet"])
    assert msg.startswith(f"error: {finished}/model.pt: its saved settings are not valid") and "--lr" in msg
    edit_checkpoint(finished, lambda s: s["config"].update(lr=0.1, surprise=1))
    assert "unknown setting surprise" in main_error(["--resume", finished, "--epochs", "2", "--quiet"])


def test_a_checkpoint_never_makes_us_delete_in_a_folder_it_names(finished, tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "manifest.json").write_text("{}")  # a name ensure_betons would otherwise remove
    (foreign / "thesis.tex").write_text("years of work")
    edit_checkpoint(finished, lambda s: s["config"].update(beton_dir=str(foreign)))
    msg = main_error(["--resume", finished, "--epochs", "2", "--quiet"])
    assert msg.startswith("error: ") and str(foreign) in msg
    assert sorted(os.listdir(foreign)) == ["manifest.json", "thesis.tex"]
    assert (foreign / "manifest.json").read_text() == "{}"


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line(finished):
    edit_checkpoint(finished, lambda s: s["model"].update({"head.weight": torch.zeros(3, 3)}))
    msg = main_error(["--resume", finished, "--epochs", "2", "--quiet"])
    assert msg.startswith(f"error: {finished}/model.pt: the checkpoint's model state does not fit")
