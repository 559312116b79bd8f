"""The benchmark harnesses, run in-process on a tiny random-pixel dataset (CPU).

benchmarks/ runs from the checkout (it is not installed); tests/conftest.py puts the repository root on sys.path.
"""
import copy
import importlib
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from benchmarks import baseline as B
from benchmarks import loader as L
from benchmarks import ray_executor as RX
from benchmarks import throughput as TP
from benchmarks import time_to_accuracy as TA
from benchmarks.common import parse_markdown_table
from fastcifar import TrainConfig
from fastcifar.data import prepare_betons

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def betons(small_source, tmp_path_factory):
    """The small source converted once for the module: --data takes a beton folder as it is."""
    folder, _ = prepare_betons(small_source, str(tmp_path_factory.mktemp("betons")))
    return folder


def harness(betons, out, *extra):
    # 1 epoch, fp32, no warm-up job: the smallest real run
    return TA.main(["--data", betons, "--out", str(out), "--seeds", "1", "--epochs", "1", "--no-amp",
                     "--no-warmup", *extra])


def load(out, name="results.json"):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def table(out, first="recipe", name="results.md"):
    with open(os.path.join(out, name)) as f:
        return {r[first]: r for r in parse_markdown_table(f.read(), first)}


def num(cell):
    return float(cell.split("±")[0].strip().lstrip(">= ").rstrip("x"))


# ---------------------------------------------------------------- time to accuracy

def test_harness_end_to_end(betons, tmp_path):
    out = tmp_path / "accuracy"
    # 1% on 100 test images means one right answer: reached by any model that predicts a class
    assert harness(betons, out, "--norm", "bn", "gn", "--target", "0.01") == 0
    res = load(out)

    env = res["environment"]
    for k in ("device", "device_name", "cpu_model", "cpu_cores", "torch_threads", "gpu_name", "torch", "triton", "ffcv",
              "python", "git_commit", "git_dirty", "date", "command"):
        assert k in env, k
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["command"].startswith("python -m benchmarks.time_to_accuracy") and "--target 0.01" in env["command"]
    assert res["dataset"]["images"] == {"train": 200, "test": 100} and "image-folder" in res["dataset"]["source"]
    assert res["state"] == "complete" and res["status"] == "ok" and res["baseline"] is None

    for norm in ("bn", "gn"):
        s = res["norms"][norm]
        assert (s["runs"], s["reached"], s["failures"], s["status"]) == (1, 1, 0, "ok")
        # the harness reports what the real training run wrote, not numbers of its own
        with open(out / "runs" / f"{norm}-s0" / "metrics.json") as f:
            m = json.load(f)
        assert m["status"] == "done" and m["norm"] == norm and m["amp"] is False
        assert s["time_to_target_s"]["median"] == m["time_to_target_s"] > 0
        assert s["epochs_to_target"]["median"] == m["epochs_to_target"] == 1
        assert s["steps_to_target"]["median"] == m["steps_to_target"] == m["steps_per_epoch"] > 0
        assert s["final_test_acc"]["mean"] == m["final_test_acc"] and s["final_test_acc"]["std"] is None
        assert s["params"] == m["params"] and s["eval_time_s"] == m["eval_time_s"] > 0
        assert s["compile_time_s"] == 0.0 and s["speedup_vs_baseline"] is None

    rows = table(out)
    assert set(rows) == {"bn", "gn"}
    for norm, row in rows.items():
        s = res["norms"][norm]
        assert num(row["time to target, median (s)"]) == pytest.approx(s["time_to_target_s"]["median"], abs=0.006)
        assert num(row["min (s)"]) == pytest.approx(s["time_to_target_s"]["min"], abs=0.006)
        assert num(row["final test acc (%)"]) == pytest.approx(100 * s["final_test_acc"]["mean"], abs=0.006)
        assert num(row["best test acc (%)"]) == pytest.approx(100 * s["best_test_acc"]["mean"], abs=0.006)
        assert num(row["eval (s)"]) == pytest.approx(s["eval_time_s"], abs=0.006)
        assert int(row["steps to target, median"]) == s["steps_to_target"]["median"]
        assert int(row["params"]) == s["params"] and row["reached / runs"] == "1 / 1"
        assert row["speed-up vs baseline"] == "n/a"
    md = (out / "results.md").read_text()
    assert env["command"] in md and env["date"] in md and res["dataset"]["source"] in md

    png = (out / "time_to_accuracy.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_failed_and_unreached_runs_report_failures_not_times(betons, tmp_path, monkeypatch):
    real = TA.fit

    def flaky(cfg):
        if cfg.norm == "gn":
            raise RuntimeError("simulated crash")
        return real(cfg)

    monkeypatch.setattr(TA, "fit", flaky)
    out = tmp_path / "accuracy"
    # 100% on random pixels is out of reach: bn trains but never gets there
    assert harness(betons, out, "--norm", "bn", "gn", "--target", "1.0") == 1  # a crash makes the exit status 1
    res = load(out)
    assert res["status"] == "failed" and res["state"] == "complete"

    bn, gn = res["norms"]["bn"], res["norms"]["gn"]
    assert (bn["reached"], bn["not_reached"], bn["failed"], bn["failures"], bn["status"]) == (0, 1, 0, 1, "failed")
    assert (gn["reached"], gn["not_reached"], gn["failed"], gn["failures"], gn["status"]) == (0, 0, 1, 1, "failed")
    for s in (bn, gn):
        assert s["time_to_target_s"] == {"median": None, "min": None, "max": None}
        assert s["epochs_to_target"]["median"] is None
    # the unreached run still finished training: its accuracies count, its time does not
    assert bn["final_test_acc"]["n"] == 1 and gn["final_test_acc"] == {"mean": None, "std": None, "min": None, "n": 0}
    run = {r["norm"]: r for r in res["runs"]}
    assert run["gn"]["status"] == "failed" and run["gn"]["error"] == "RuntimeError: simulated crash"
    assert run["bn"]["status"] == "not_reached" and run["bn"]["time_to_target_s"] is None
    assert "did not reach 100%" in run["bn"]["error"]

    rows = table(out)
    for norm in ("bn", "gn"):
        assert rows[norm]["reached / runs"] == "0 / 1"
        assert rows[norm]["time to target, median (s)"] == "n/a"
    md = (out / "results.md").read_text()
    assert "gn seed 0: failed: RuntimeError: simulated crash" in md and "bn seed 0: not_reached" in md


def fake_fit(times):
    """fastcifar.fit stand-in: per seed, a time-to-target, None (not reached) or an exception to raise."""
    def fit(cfg):
        t = times[cfg.seed]
        if isinstance(t, Exception):
            raise t
        hist = [{"epoch": 1, "steps": 40, "train_loss": 2.0, "train_acc": 0.3, "test_loss": 2.0,
                 "test_acc": 0.5 if t else 0.2, "train_time_s": t or 9.0, "eval_time_s": 0.1}]
        return SimpleNamespace(out=cfg.out, metrics={
            "norm": cfg.norm, "params": 1234, "history": hist, "time_to_target_s": t,
            "epochs_to_target": 1 if t else None,
            "steps_to_target": 40 * cfg.seed + 40 if t else None, "final_test_acc": hist[-1]["test_acc"],
            "best_test_acc": hist[-1]["test_acc"], "compile_time_s": 0.5, "eval_time_s": 0.1, "epochs_run": 1})
    return fit


def test_medians_are_over_the_seeds_that_reached_the_target(betons, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TA, "fit", fake_fit({0: 3.0, 1: FloatingPointError("non-finite loss"), 2: 5.0, 3: 10.0,
                                              4: None}))
    out = tmp_path / "accuracy"
    assert TA.main(["--data", betons, "--out", str(out), "--norm", "ln", "--seeds", "5", "--target", "0.4",
                     "--no-warmup"]) == 1
    s = load(out)["norms"]["ln"]
    assert s["time_to_target_s"] == {"median": 5.0, "min": 3.0, "max": 10.0}
    assert s["steps_to_target"] == {"median": 120, "min": 40, "max": 160}  # seeds 0, 2, 3 reached
    assert (s["runs"], s["reached"], s["failed"], s["not_reached"], s["failures"], s["status"]) == (5, 3, 1, 1, 2,
                                                                                                     "partial")
    assert s["final_test_acc"]["n"] == 4 and s["compile_time_s"] == 0.5
    assert [e["seed"] for e in s["errors"]] == [1, 4]
    assert table(out)["ln"]["reached / runs"] == "3 / 5"
    # the success rate over every run started, beside the mean and the worst final accuracy of those that trained
    assert s["success_rate"] == 0.6
    assert s["final_test_acc"]["mean"] == pytest.approx((3 * 0.5 + 0.2) / 4) and s["final_test_acc"]["min"] == 0.2
    assert table(out)["ln"]["final test acc, min (%)"] == "20.00"
    assert "ln: 3/5 runs reached 40%; final test acc mean 42.50%, min 20.00%; median time to target 5.00 s" in \
        capsys.readouterr().out


def test_speedup_and_its_lower_bound():
    norm = {"time_to_target_s": {"median": 2.0}}
    reached = {"status": "reached", "time_to_target_s": 10.0, "train_time_s": 12.0}
    unreached = {"status": "not_reached", "time_to_target_s": None, "train_time_s": 30.0}
    assert TA.speedup(reached, norm) == {"ratio": 5.0, "lower_bound": False}
    assert TA.speedup(unreached, norm) == {"ratio": 15.0, "lower_bound": True}
    assert TA.fmt_speedup(TA.speedup(unreached, norm)) == ">= 15.00x"
    assert TA.speedup({"status": "failed"}, norm) is None
    assert TA.speedup(reached, {"time_to_target_s": {"median": None}}) is None


@pytest.mark.parametrize("bad, message", [(["--set", "no_such=1"], "unknown setting no_such"),
                                         (["--set", "lr=-1"], "--lr must be a positive number"),
                                         (["--grid", "tta=off,sideways"], "--tta must be one of")])
def test_bad_training_settings_stop_before_any_run(betons, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as e:
        harness(betons, tmp_path / "accuracy", "--norm", "bn", *bad)
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)  # TrainConfig refused it
    assert not (tmp_path / "accuracy" / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(betons, tmp_path):
    with pytest.raises(SystemExit) as e:
        harness(betons, tmp_path / "accuracy", "--device", "cuda")
    assert e.value.code == "error: --device cuda: no CUDA device is available"


# ---------------------------------------------------------------- baseline

def test_baseline_model_has_46024_parameters_in_the_reference_layout():
    model = B.make_baseline()
    assert sum(p.numel() for p in model.parameters()) == 46_024
    kinds = ["GAP" if p[0] == "GAP" else p[0] for p in B.PLAN]
    assert " ".join(kinds) == "C C c P C C C c P C C c GAP c"  # C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 c9 GAP c10
    layers = list(model.layers)
    convs = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d)]
    assert [layers[i].kernel_size[0] for i in convs] == [3 if k == "C" else 1 for k in kinds if k in "Cc"]
    for i in convs[:-1]:  # ReLU then BatchNorm after every conv but the last
        assert isinstance(layers[i + 1], torch.nn.ReLU) and isinstance(layers[i + 2], torch.nn.BatchNorm2d)
    assert convs[-1] == len(layers) - 1 and layers[-1].out_channels == 10
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_baseline_runs_beside_the_norms_and_gives_a_speedup(betons, tmp_path):
    out = tmp_path / "accuracy"
    assert harness(betons, out, "--norm", "bn", "--target", "0.01", "--baseline", "--baseline-epochs", "1") == 0
    res = load(out)
    b = res["baseline"]
    assert b["status"] == "reached" and b["params"] == 46_024 and b["epochs_run"] == 1
    assert b["time_to_target_s"] == b["history"][0]["train_time_s"] > 0 and b["amp"] is False
    sp = res["norms"]["bn"]["speedup_vs_baseline"]
    assert sp["lower_bound"] is False
    assert sp["ratio"] == pytest.approx(b["time_to_target_s"] / res["norms"]["bn"]["time_to_target_s"]["median"])
    rows = table(out)
    assert num(rows["bn"]["speed-up vs baseline"]) == pytest.approx(sp["ratio"], abs=0.006)
    assert rows["baseline"]["params"] == "46024"
    with open(out / "runs" / "baseline-s0" / "metrics.json") as f:
        assert json.load(f)["time_to_target_s"] == b["time_to_target_s"]


def test_baseline_that_misses_the_target_makes_speedups_lower_bounds(betons, tmp_path, monkeypatch):
    monkeypatch.setattr(TA, "fit", fake_fit({0: 0.5}))
    out = tmp_path / "accuracy"
    assert harness(betons, out, "--norm", "bn", "--target", "0.99", "--baseline", "--baseline-epochs", "1") == 0
    res = load(out)
    b, sp = res["baseline"], res["norms"]["bn"]["speedup_vs_baseline"]
    assert b["status"] == "not_reached" and b["time_to_target_s"] is None
    assert sp == {"ratio": pytest.approx(b["train_time_s"] / 0.5), "lower_bound": True}
    assert table(out)["bn"]["speed-up vs baseline"].startswith(">= ")
    assert "lower bound" in (out / "results.md").read_text()


# ---------------------------------------------------------------- loader

def test_loader_benchmark_measures_every_loader(betons, tmp_path):
    out = tmp_path / "loader"
    assert L.main(["--data", betons, "--batch-size", "64", "--out", str(out)]) == 0
    res = load(out, "loader.json")
    assert [r["loader"] for r in res["loaders"]] == ["resident", "ffcv", "torchvision"]
    rows = table(out, "loader", "loader.md")
    for r in res["loaders"]:
        assert r["status"] == "ok" and r["images_per_s"] > 0
        assert r["images"] == r["batches"] * 64 == 3 * 64  # 200 images, drop_last
        assert r["images_per_s"] == pytest.approx(r["images"] / r["time_s"])
        assert num(rows[r["loader"]]["images/s"]) == pytest.approx(r["images_per_s"], abs=0.51)
    assert rows["torchvision"]["vs torchvision"] == "1.00x"


def test_loader_benchmark_resident_only(betons, tmp_path):
    out = tmp_path / "loader"
    assert L.main(["--data", betons, "--batch-size", "50", "--epochs", "2", "--loaders", "resident",
                   "--out", str(out)]) == 0
    (r,) = load(out, "loader.json")["loaders"]
    assert r["loader"] == "resident" and r["images"] == 2 * 200 and r["images_per_s"] > 0
    assert table(out, "loader", "loader.md")["resident"]["vs torchvision"] == "n/a"


# ---------------------------------------------------------------- the suite

def test_suite_records_a_missing_part_and_passes_flags_through(tmp_path, monkeypatch):
    suite = importlib.import_module("benchmarks.__main__")
    monkeypatch.setitem(sys.modules, "benchmarks.kernels", None)  # import now raises ImportError
    assert suite.main(["--out", str(tmp_path), "--parts", "kernels"]) == 1
    summary = load(tmp_path, "summary.json")
    (part,) = summary["parts"]
    assert part["part"] == "kernels" and part["status"] == "missing" and "benchmarks.kernels" in part["error"]
    assert "| kernels | missing |" in (tmp_path / "summary.md").read_text()

    args = suite.parse_args(["--out", "R", "--data", "D", "--device", "cpu", "--norm", "bn", "ln", "--seeds", "2",
                             "--no-baseline", "--limit", "300"])
    harness_argv = suite.part_argv(args, "time_to_accuracy")
    assert TA.parse_args(harness_argv).norm == ["bn", "ln"]
    a = TA.parse_args(harness_argv)
    assert (a.out, a.data, a.device, a.seeds, a.baseline, a.limit) == (os.path.join("R", "time_to_accuracy"), "D",
                                                                        "cpu", 2, False, 300)
    la = L.parse_args(suite.part_argv(args, "loader") + ["--batch-size", "100"])
    assert (la.out, la.data, la.device, la.limit) == (os.path.join("R", "loader"), "D", "cpu", 300)
    assert suite.part_argv(args, "kernels") == ["--out", os.path.join("R", "kernels")]
    ta = TP.parse_args(suite.part_argv(args, "throughput"))
    assert (ta.out, ta.device) == (os.path.join("R", "throughput"), "cpu")


def test_results_md_is_rendered_from_the_json(betons, tmp_path, monkeypatch):
    """Re-rendering the saved JSON gives the saved Markdown: the table has no numbers of its own."""
    monkeypatch.setattr(TA, "fit", fake_fit({0: 1.25, 1: 2.5}))
    out = tmp_path / "accuracy"
    assert TA.main(["--data", betons, "--out", str(out), "--norm", "bn", "--seeds", "2", "--no-warmup"]) == 0
    res = load(out)
    assert TA.render_markdown(copy.deepcopy(res)) == (out / "results.md").read_text()
    row = table(out)["bn"]
    assert num(row["time to target, median (s)"]) == 1.88 and row["min (s)"] == "1.25" and row["max (s)"] == "2.50"


# ---------------------------------------------------------------- throughput

# the separable layout's convs: (H*W they run at, C_in, C_out); a pool after a conv does not change its H*W
SEPARABLE = [(32 * 32, 24, 36), (16 * 16, 36, 48), (16 * 16, 48, 64), (16 * 16, 64, 72), (8 * 8, 72, 104),
             (8 * 8, 104, 104), (4 * 4, 104, 136)]


def test_throughput_counts_the_models_flops_and_times_both_ways(tmp_path):
    out = tmp_path / "tp"
    TP.main(["--arch", "lean", "deep", "separable", "--norm", "bn", "ln", "--precision", "fp32", "--steps", "1",
             "--repeats", "1", "--warmup", "0", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    rows = load(out, "throughput.json")["rows"]
    assert [(r["arch"], r["norm"]) for r in rows] == [(a, n) for a in ("lean", "deep", "separable") for n in ("bn", "ln")]
    # multiply-accumulates of each layout's convs per image: (H*W of the output, C_out, C_in per group, k*k) per conv
    convs = {"lean": [(16 * 16, 32, 24, 9), (8 * 8, 32, 32, 9), (8 * 8, 46, 32, 9), (4 * 4, 46, 46, 9)],
             "deep": [(32 * 32, 20, 24, 9), (16 * 16, 20, 20, 9), (16 * 16, 32, 20, 9), (8 * 8, 32, 32, 9),
                      (8 * 8, 40, 32, 9), (4 * 4, 40, 40, 9)],
             # depthwise 3x3 (one input channel per filter), then pointwise 1x1
             "separable": [(hw, c_in, 1, 9) for hw, c_in, _ in SEPARABLE] + [(hw, c_out, c_in, 1)
                                                                            for hw, c_in, c_out in SEPARABLE]}
    for r in rows:
        # forward + backward: 3 x 2 x MACs, a depthwise conv's weight gradient included; stem and head add a little
        macs = sum(hw * co * ci * kk for hw, co, ci, kk in convs[r["arch"]])
        assert r["conv_gflop_per_image"] == pytest.approx(6 * macs / 1e9, rel=1e-6)
        assert r["conv_gflop_per_image"] < r["train_gflop_per_image"] < 1.05 * r["conv_gflop_per_image"]
        assert r["step_images_per_s"] > 0 and r["conv_images_per_s"] > 0
        assert r["epoch_s_at_step_speed"] == pytest.approx(50_000 / r["step_images_per_s"])
    text = (out / "throughput.md").read_text()
    assert "| bn | lean | fp32 | 49514 |" in text and "| ln | deep | fp32 | 49906 |" in text
    assert (out / "throughput.png").read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------- grids, executors, timing rules

def recording_fit(monkeypatch, fields):
    """Patch the harness's fit with fake_fit that also records `fields` of every config it is given."""
    seen, fake = [], fake_fit({0: 1.0, 1: 2.0})

    def fit(cfg):
        seen.append(tuple(getattr(cfg, f) for f in fields))
        return fake(cfg)

    monkeypatch.setattr(TA, "fit", fit)
    return seen


def test_grid_expands_into_runs_with_its_training_flags(betons, tmp_path, monkeypatch):
    seen = recording_fit(monkeypatch, ("norm", "seed", "lr", "label_smoothing"))
    out = tmp_path / "accuracy"
    assert TA.main(["--data", betons, "--out", str(out), "--norm", "bn", "gn", "--seeds", "2", "--no-warmup",
                     "--target", "0.4", "--grid", "lr=0.1,0.3", "label-smoothing=0"]) == 0
    # interleaved: seed 0 of every grid point and norm before seed 1
    assert seen == [(n, s, lr, 0.0) for s in (0, 1) for lr in (0.1, 0.3) for n in ("bn", "gn")]
    res = load(out)
    labels = [f"{n} lr={lr} label_smoothing=0" for lr in ("0.1", "0.3") for n in ("bn", "gn")]
    assert list(res["norms"]) == res["settings"]["groups"] == labels
    for label, s in res["norms"].items():
        assert (s["runs"], s["reached"]) == (2, 2) and s["config"]["lr"] in (0.1, 0.3)
    assert {r["out"] for r in res["runs"]} == {str(out / "runs" / f"{n}-lr{lr}-label_smoothing0-s{s}")
                                               for n in ("bn", "gn") for lr in ("0.1", "0.3") for s in (0, 1)}
    assert set(table(out)) == set(labels) and res["executor"] == "local"
    assert all(r["where"] == {"executor": "local", "node_id": None, "host": r["where"]["host"], "pid": os.getpid(),
                              "niceness": os.nice(0)} for r in res["runs"])


def test_points_are_whole_recipes_run_interleaved(betons, tmp_path, monkeypatch):
    seen = recording_fit(monkeypatch, ("seed", "optimizer", "muon_lr", "epochs"))
    out = tmp_path / "points"
    assert TA.main(["--data", betons, "--out", str(out), "--norm", "gn", "--seeds", "2", "--no-warmup",
                     "--target", "0.4", "--points", "", "optimizer=muon,muon_lr=0.2,epochs=1"]) == 0
    preset = TrainConfig.resolve(norm="gn")
    assert seen == [(s, *p) for s in (0, 1) for p in ((preset.optimizer, preset.muon_lr, preset.epochs),
                                                      ("muon", 0.2, 1))]
    assert list(load(out)["norms"]) == ["gn", "gn optimizer=muon muon_lr=0.2 epochs=1"]


@pytest.mark.parametrize("bad, message", [
    (["--points", "lr=1,lr=2"], "each key once"), (["--points", "lr=1", "lr=1"], "twice"),
    (["--points", "lr=1", "--grid", "lr=2"], "one of them"),
    (["--grid", "lr"], "KEY=V1,V2"), (["--grid", "lr="], "KEY=V1,V2"), (["--grid", "seed=1,2"], "--seeds"),
    (["--grid", "lr=1", "lr=2"], "twice"), (["--set", "lr=1,2"], "one value"), (["--set", "out=x"], "--out"),
    (["--gpus-per-run", "1"], "only with --executor ray"),
    (["--executor", "ray", "--gpus-per-run", "0.5"], "slow each other"),
    (["--executor", "ray", "--cpus-per-run", "0"], "at least 1"),
    (["--accuracy-only", "--baseline"], "need times")])
def test_bad_sweep_flags_get_one_line_errors(bad, message, capsys):
    with pytest.raises(SystemExit):
        TA.parse_args(bad)
    assert message in capsys.readouterr().err


def test_fractional_gpus_are_allowed_only_without_times():
    a = TA.parse_args(["--executor", "ray", "--gpus-per-run", "0.25", "--cpus-per-run", "2", "--accuracy-only"])
    assert (a.gpus_per_run, a.cpus_per_run, a.accuracy_only) == (0.25, 2, True)
    assert TA.parse_args(["--executor", "ray", "--gpus-per-run", "2"]).gpus_per_run == 2
    assert TA.ray_resources(a, torch.device("cuda")) == (2, 0.25)
    assert TA.ray_resources(TA.parse_args(["--executor", "ray"]), torch.device("cuda")) == (1, 1.0)
    assert TA.ray_resources(TA.parse_args(["--executor", "ray"]), torch.device("cpu")) == (1, 0.0)
    with pytest.raises(SystemExit, match="hides every GPU"):
        TA.ray_resources(TA.parse_args(["--executor", "ray", "--gpus-per-run", "0"]), torch.device("cuda"))
    # packed runs get the CPUs they asked for as torch threads; timed runs keep the trainer's default (all cores)
    dev = torch.device("cpu")
    assert TA.run_settings(a, "bn", 0, "D", "O", dev)["threads"] == 2
    assert "threads" not in TA.run_settings(TA.parse_args(["--executor", "ray", "--cpus-per-run", "2"]), "bn", 0,
                                             "D", "O", dev)


def test_compile_is_set_only_when_chosen():
    dev = torch.device("cpu")
    def cfg(*flags):
        return TrainConfig.resolve(**TA.run_settings(TA.parse_args(list(flags)), "bn", 0, "D", "O", dev))
    assert cfg().compile == "auto" and cfg().sources["compile"] == "default"  # the trainer's own default decides
    assert cfg("--compile").compile == "on" and cfg("--no-compile").compile == "off"
    assert (cfg("--set", "cutout=8", "arch=deep").cutout, cfg("--set", "arch=deep").arch) == (8, "deep")


def test_timed_runs_below_normal_priority_are_flagged():
    st = {"executor": "ray", "accuracy_only": False, "ray": {"address": "HEAD:6379", "gpus_per_run": 1,
                                                             "cpus_per_run": 4}}
    runs = [{"where": {"niceness": 15}}, {"where": {"niceness": 15}}]
    assert "runs at nice 15 (**below normal priority**" in TA.executor_line(st, runs)
    assert TA.executor_line(st, [{"where": {"niceness": 0}}]).endswith("one run per machine at a time, runs at nice 0")
    assert "below normal" not in TA.executor_line(dict(st, accuracy_only=True), runs)


def test_one_timed_run_per_machine():
    node = lambda i, ip, alive=True, cpu=2, gpu=0: {"NodeID": f"n{i}", "NodeManagerAddress": ip, "Alive": alive,  # noqa: E731
                                                    "Resources": {"CPU": cpu, "GPU": gpu}}
    nodes = [node(1, "10.0.0.1"), node(2, "10.0.0.1"), node(3, "10.0.0.2", alive=False), node(4, "10.0.0.3"),
             node(5, "10.0.0.4", cpu=1), node(6, "10.0.0.5", gpu=1)]
    assert RX.machines(nodes, cpus=2, gpus=0) == ["n1", "n4", "n6"]  # two Ray nodes on one machine count once
    assert RX.machines(nodes, cpus=1, gpus=1) == ["n6"]
    assert RX.machines(nodes, cpus=4, gpus=0) == []


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    # the harness's own embedded Ray for timed runs: no dashboard, a small object store, workers at nice 0
    stop, niceness = RX.start(timed=True)
    assert niceness == 0 and os.environ.get(RX.NICENESS_ENV) is None  # asked of Ray, not left in this process
    yield ray
    stop()


@pytest.mark.slow
def test_ray_sweep_runs_every_job_in_ray_workers(ray_session, betons, tmp_path):
    out = tmp_path / "accuracy"
    assert TA.main(["--data", betons, "--out", str(out), "--executor", "ray", "--accuracy-only", "--norm", "bn", "gn",
                     "--seeds", "2", "--epochs", "1", "--limit", "100", "--no-amp", "--no-warmup",
                     "--target", "0.01", "--set", "batch_size=50"]) == 0
    res = load(out)
    assert res["executor"] == "ray" and res["settings"]["ray"]["cpus_per_run"] == 1 and res["status"] == "ok"
    assert sorted((r["norm"], r["seed"]) for r in res["runs"]) == [("bn", 0), ("bn", 1), ("gn", 0), ("gn", 1)]
    for r in res["runs"]:
        w = r["where"]
        assert w["executor"] == "ray" and w["pid"] != os.getpid() and len(w["node_id"]) > 8, w
        with open(os.path.join(r["out"], "metrics.json")) as f:  # the real training run wrote it
            assert json.load(f)["final_test_acc"] == r["final_test_acc"]
    assert {w["node_id"] for w in (r["where"] for r in res["runs"])} == {ray_session.get_runtime_context().get_node_id()}
    for n in ("bn", "gn"):
        s = res["norms"][n]
        assert (s["runs"], s["reached"]) == (2, 2) and s["time_to_target_s"]["median"] is None  # accuracy only
    rows = table(out)
    assert rows["bn"]["reached / runs"] == "2 / 2" and rows["bn"]["time to target, median (s)"] == "not timed"
    md = (out / "results.md").read_text()
    assert "## Where each run ran" in md and "runs at nice 0" in md
    assert all(r["where"]["niceness"] == 0 and r["torch_threads"] == 1 for r in res["runs"])
    assert f"{res['environment']['cpu_cores']} cores, 1 torch threads" in md  # the runs' threads, not the driver's
    assert (out / "time_to_accuracy.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_ray_killed_task_is_reported_failed_and_timed_runs_never_overlap(ray_session):
    import signal
    import time

    def job(i):
        t0 = time.time()
        if i == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-run, as under the OOM killer
        time.sleep(0.2)
        return {"status": "reached", "i": i, "t0": t0, "t1": time.time(),
                "warm": os.environ.get(RX._WARM_ENV) == str(os.getpid())}  # its process ran the warm-up first

    jobs = [{"args": (i,), "record": {"norm": "bn", "seed": i}} for i in range(4)]
    seen = []
    res = RX.run(jobs, job, cpus=1, gpus=0, timed=True, warmup=(lambda: None, ()),
                 on_result=lambda i, r: seen.append(i), poll_s=0.2)
    assert sorted(seen) == [0, 1, 2, 3]
    assert res[1]["status"] == "failed" and res[1]["error"].startswith("killed: ") and res[1]["seed"] == 1
    ok = [r for r in res if r["status"] == "reached"]
    assert [r["i"] for r in ok] == [0, 2, 3] and all(r["where"]["pid"] != os.getpid() and r["warm"] for r in ok)
    assert all(r["where"]["niceness"] == 0 for r in ok)  # timed runs at normal priority, checked in the task
    spans = sorted((r["t0"], r["t1"]) for r in ok)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # one machine: one run at a time
