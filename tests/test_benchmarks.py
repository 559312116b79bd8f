"""The benchmark harnesses, run in-process on a tiny random-pixel dataset (CPU).

benchmarks/ runs from the checkout (it is not installed), so the repository root goes on sys.path.
"""
import copy
import importlib
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import baseline as B  # noqa: E402
from benchmarks import loader as L  # noqa: E402
from benchmarks import throughput as TP  # noqa: E402
from benchmarks import time_to_accuracy as TTA  # noqa: E402
from benchmarks.common import parse_markdown_table  # noqa: E402
from fastcifar import train as T  # noqa: E402
from fastcifar.data import prepare_betons  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def betons(small_source, tmp_path_factory):
    """The small source converted once for the module: --data takes a beton folder as it is."""
    folder, _ = prepare_betons(small_source, str(tmp_path_factory.mktemp("betons")))
    return folder


def tta(betons, out, *extra):
    # 1 epoch, fp32, no warm-up job: the smallest real run
    return TTA.main(["--data", betons, "--out", str(out), "--seeds", "1", "--epochs", "1", "--no-amp",
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
    out = tmp_path / "tta"
    # 1% on 100 test images means one right answer: reached by any model that predicts a class
    assert tta(betons, out, "--norm", "bn", "gn", "--target", "0.01") == 0
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
        assert int(row["params"]) == s["params"] and row["reached / runs"] == "1 / 1"
        assert row["speed-up vs baseline"] == "n/a"
    md = (out / "results.md").read_text()
    assert env["command"] in md and env["date"] in md and res["dataset"]["source"] in md

    png = (out / "time_to_accuracy.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_failed_and_unreached_runs_report_failures_not_times(betons, tmp_path, monkeypatch):
    real = T.train

    def flaky(args):
        if args.norm == "gn":
            raise RuntimeError("simulated crash")
        return real(args)

    monkeypatch.setattr(T, "train", flaky)
    out = tmp_path / "tta"
    # 100% on random pixels is out of reach: bn trains but never gets there
    assert tta(betons, out, "--norm", "bn", "gn", "--target", "1.0") == 1  # a crash makes the exit status 1
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


def fake_train(times):
    """T.train stand-in: per seed, a time-to-target, None (not reached) or an exception to raise."""
    def train(args):
        t = times[args.seed]
        if isinstance(t, Exception):
            raise t
        hist = [{"epoch": 1, "train_loss": 2.0, "train_acc": 0.3, "test_loss": 2.0, "test_acc": 0.5 if t else 0.2,
                 "train_time_s": t or 9.0, "eval_time_s": 0.1}]
        return {"norm": args.norm, "params": 1234, "history": hist, "time_to_target_s": t,
                "epochs_to_target": 1 if t else None, "final_test_acc": hist[-1]["test_acc"],
                "best_test_acc": hist[-1]["test_acc"], "compile_time_s": 0.5, "eval_time_s": 0.1, "epochs_run": 1}
    return train


def test_medians_are_over_the_seeds_that_reached_the_target(betons, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "train", fake_train({0: 3.0, 1: FloatingPointError("non-finite loss"), 2: 5.0, 3: 10.0,
                                                4: None}))
    out = tmp_path / "tta"
    assert TTA.main(["--data", betons, "--out", str(out), "--norm", "ln", "--seeds", "5", "--target", "0.4",
                     "--no-warmup"]) == 1
    s = load(out)["norms"]["ln"]
    assert s["time_to_target_s"] == {"median": 5.0, "min": 3.0, "max": 10.0}
    assert (s["runs"], s["reached"], s["failed"], s["not_reached"], s["failures"], s["status"]) == (5, 3, 1, 1, 2,
                                                                                                     "partial")
    assert s["final_test_acc"]["n"] == 4 and s["compile_time_s"] == 0.5
    assert [e["seed"] for e in s["errors"]] == [1, 4]
    assert table(out)["ln"]["reached / runs"] == "3 / 5"


def test_speedup_and_its_lower_bound():
    norm = {"time_to_target_s": {"median": 2.0}}
    reached = {"status": "reached", "time_to_target_s": 10.0, "train_time_s": 12.0}
    unreached = {"status": "not_reached", "time_to_target_s": None, "train_time_s": 30.0}
    assert TTA.speedup(reached, norm) == {"ratio": 5.0, "lower_bound": False}
    assert TTA.speedup(unreached, norm) == {"ratio": 15.0, "lower_bound": True}
    assert TTA.fmt_speedup(TTA.speedup(unreached, norm)) == ">= 15.00x"
    assert TTA.speedup({"status": "failed"}, norm) is None
    assert TTA.speedup(reached, {"time_to_target_s": {"median": None}}) is None


def test_bad_training_flags_stop_before_any_run(betons, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tta(betons, tmp_path / "tta", "--norm", "bn", "--train-args=--no-such-flag")
    assert "fastcifar.train" in capsys.readouterr().err  # training's own parser refused it
    assert not (tmp_path / "tta" / "runs").exists()


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
    out = tmp_path / "tta"
    assert tta(betons, out, "--norm", "bn", "--target", "0.01", "--baseline", "--baseline-epochs", "1") == 0
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
    monkeypatch.setattr(T, "train", fake_train({0: 0.5}))
    out = tmp_path / "tta"
    assert tta(betons, out, "--norm", "bn", "--target", "0.99", "--baseline", "--baseline-epochs", "1") == 0
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
    tta_argv = suite.part_argv(args, "time_to_accuracy")
    assert TTA.parse_args(tta_argv).norm == ["bn", "ln"]
    a = TTA.parse_args(tta_argv)
    assert (a.out, a.data, a.device, a.seeds, a.baseline, a.limit) == (os.path.join("R", "time_to_accuracy"), "D",
                                                                        "cpu", 2, False, 300)
    la = L.parse_args(suite.part_argv(args, "loader") + ["--batch-size", "100"])
    assert (la.out, la.data, la.device, la.limit) == (os.path.join("R", "loader"), "D", "cpu", 300)
    assert suite.part_argv(args, "kernels") == ["--out", os.path.join("R", "kernels")]
    ta = TP.parse_args(suite.part_argv(args, "throughput"))
    assert (ta.out, ta.device) == (os.path.join("R", "throughput"), "cpu")


def test_results_md_is_rendered_from_the_json(betons, tmp_path, monkeypatch):
    """Re-rendering the saved JSON gives the saved Markdown: the table has no numbers of its own."""
    monkeypatch.setattr(T, "train", fake_train({0: 1.25, 1: 2.5}))
    out = tmp_path / "tta"
    assert TTA.main(["--data", betons, "--out", str(out), "--norm", "bn", "--seeds", "2", "--no-warmup"]) == 0
    res = load(out)
    assert TTA.render_markdown(copy.deepcopy(res)) == (out / "results.md").read_text()
    row = table(out)["bn"]
    assert num(row["time to target, median (s)"]) == 1.88 and row["min (s)"] == "1.25" and row["max (s)"] == "2.50"


# ---------------------------------------------------------------- throughput

def test_throughput_counts_the_models_flops_and_times_both_ways(tmp_path):
    out = tmp_path / "tp"
    TP.main(["--norm", "bn", "ln", "--precision", "fp32", "--steps", "1", "--repeats", "1", "--warmup", "0",
             "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    rows = load(out, "throughput.json")["rows"]
    assert [(r["norm"], r["precision"]) for r in rows] == [("bn", "fp32"), ("ln", "fp32")]
    for r in rows:
        # forward + backward of the 3x3 convs: 3 x 2 x MACs; the stem (no input grad) and head add a little
        macs = 16 * 16 * 32 * 24 * 9 + 8 * 8 * 32 * 32 * 9 + 8 * 8 * 46 * 32 * 9 + 4 * 4 * 46 * 46 * 9
        assert r["conv_gflop_per_image"] == pytest.approx(6 * macs / 1e9, rel=1e-6)
        assert r["conv_gflop_per_image"] < r["train_gflop_per_image"] < 1.05 * r["conv_gflop_per_image"]
        assert r["step_images_per_s"] > 0 and r["conv_images_per_s"] > 0
        assert r["epoch_s_at_step_speed"] == pytest.approx(50_000 / r["step_images_per_s"])
    md = table(out, "norm", "throughput.md")
    assert set(md) == {"bn", "ln"} and md["bn"]["params"] == str(rows[0]["params"])
    assert (out / "throughput.png").read_bytes().startswith(PNG_MAGIC)
