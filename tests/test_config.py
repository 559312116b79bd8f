"""TrainConfig: one typed config, built in layers, validated alike for the CLI, the API, files and resumed runs;
and every preset recipe, for every device type, backed by a measured record."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from benchmarks.recipes import matching_runs
from fastcifar.config import DEVICE_TYPES, PRESETS, RECIPE, RESUMED, TrainConfig, load_config_file, preset_value
from fastcifar.device import ConfigError
from fastcifar.models import NORMS

def test_layers_and_where_each_value_came_from():
    c = TrainConfig.resolve(norm="gn", device_type="cpu")
    assert (c.lr, c.epochs) == (preset_value("fast", "lr", "gn", "cpu"), preset_value("fast", "epochs", "gn", "cpu"))
    assert c.sources["lr"] == "preset fast (cpu)" and c.sources["norm"] == "argument" and c.sources["seed"] == "default"
    # file over the preset, explicit over the file
    c = TrainConfig.resolve(file={"lr": 0.3, "seed": 4}, seed=5, device_type="cpu")
    assert (c.lr, c.seed, c.sources["lr"], c.sources["seed"]) == (0.3, 5, "config file", "argument")
    # a resumed run's recipe over the preset; a contradicting explicit value is refused, a larger epochs is not
    saved = TrainConfig.resolve(norm="ln", lr=0.05, epochs=2, device_type="cpu").to_dict()
    c = TrainConfig.resolve(resumed=saved, epochs=4, device_type="cpu")
    assert (c.norm, c.lr, c.epochs, c.sources["lr"], c.sources["epochs"]) == ("ln", 0.05, 4, "resumed run", "argument")
    for k, v in (("norm", "bn"), ("lr", 0.2), ("epochs", 1), ("preset", "best")):
        with pytest.raises(ConfigError, match=f"^--{k} .* contradicts the run being resumed"):
            TrainConfig.resolve(resumed=saved, **{k: v})
    # the machine a run resumes on decides how it runs: execution settings are not taken from the saved run
    saved_dev = {**saved, "device": "cuda", "threads": 7, "out": "/elsewhere"}
    c = TrainConfig.resolve(resumed=saved_dev, device="cpu")
    assert (c.device, c.threads, c.out) == ("cpu", None, None)


def test_round_trip_through_json_and_replace():
    c = TrainConfig.resolve(norm="gn", preset="best", seed=3, cutout=8, amp=True, limit=500)
    d = json.loads(json.dumps(c.to_dict()))
    assert TrainConfig.from_dict(d) == c and set(d) == {k for k in d if k != "sources"}
    r = c.replace(norm="bn")  # the preset's values follow the new norm; explicit ones stay
    assert (r.norm, r.lr, r.seed, r.cutout) == ("bn", preset_value("best", "lr", "bn", "cpu"), 3, 8)
    assert c.replace(lr=0.3).replace(norm="ln").lr == 0.3


@pytest.mark.parametrize("settings,msg", [
    ({"norm": "xyz"}, "--norm must be one of"), ({"epochs": 0}, "--epochs must be a whole number"),
    ({"epochs": 2.5}, "--epochs must be a whole number"), ({"lr": -1}, "--lr must be a positive number"),
    ({"lr": float("nan")}, "--lr must be a positive number"), ({"batch_size": True}, "--batch-size must be"),
    ({"target_acc": 1.5}, "--target-acc is a fraction"), ({"tta": "rotate"}, "--tta must be one of"),
    ({"amp": "yes"}, "--amp must be true or false"), ({"data": 3}, "--data must be a path"),
    ({"compile": "off", "cuda_graphs": True}, "--cuda-graphs captures the compiled step"),
    ({"learning_rate": 0.1}, "unknown setting learning_rate"),
])
def test_invalid_settings_are_one_line_errors(settings, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        TrainConfig.resolve(**settings)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=msg):  # a config file and a resumed run are held to the same checks
        TrainConfig.from_dict(settings)
    if set(settings) <= set(RESUMED):  # execution settings come from the machine a run resumes on
        base = TrainConfig.resolve().to_dict()
        with pytest.raises(ConfigError, match=msg):
            TrainConfig.resolve(resumed={**base, **settings})


def test_a_config_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, msg in (("missing.json", "no such file"), ("bad.json", "not a readable JSON"),
                      ("list.json", "expected a JSON object")):
        with pytest.raises(ConfigError, match=msg):
            load_config_file(str(tmp_path / name))


# ---------------------------------------------------------------- every recipe has a measured record

@pytest.mark.parametrize("device", DEVICE_TYPES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("norm", NORMS)
def test_every_preset_recipe_on_every_device_has_a_measured_record(preset, norm, device):
    """A recipe belongs to the recipe, not the device: whatever a preset gives a device type must have been
    measured, to the project's bar (fast: 20 seeds, >= 19 reach the target, mean >= 71.5%; best: 3 seeds)."""
    c = TrainConfig.resolve(norm=norm, preset=preset, device_type=device)
    runs = matching_runs(c)
    accs = [r["final_test_acc"] for r in runs]
    if preset == "fast":
        assert len(runs) >= 20, f"{preset}/{norm} on {device}: {len(runs)} measured runs of this recipe"
        assert sum(a >= c.target_acc for a in accs) >= 19 and statistics.mean(accs) >= 0.715
    else:
        assert len(runs) >= 3, f"{preset}/{norm} on {device}: {len(runs)} measured runs of this recipe"


def test_a_recorded_run_of_another_arch_is_not_the_presets_record(monkeypatch):
    c = TrainConfig.resolve(norm="bn", preset="fast", device_type="cpu")
    run = {"norm": "bn", "preset": "fast", "batch_size": c.batch_size, "lr": c.lr, "epochs_planned": c.epochs,
           "optimizer": c.optimizer, "muon_lr": c.muon_lr, "muon_ns_steps": c.muon_ns_steps}
    runs = [dict(run, train_config={"arch": c.arch}), dict(run, train_config={"arch": "deep"}),
            dict(run, arch="deep"), run]  # the last recorded no arch: taken as the preset's
    monkeypatch.setattr("benchmarks.recipes.record_runs", lambda path: runs)
    assert matching_runs(c) == [runs[0], runs[3]]


def test_the_recipe_does_not_change_with_the_device():
    for preset in PRESETS:
        for norm in NORMS:
            cpu, cuda = (TrainConfig.resolve(norm=norm, preset=preset, device_type=d).recipe() for d in DEVICE_TYPES)
            assert cpu == cuda and set(cpu) == set(RECIPE)


# ---------------------------------------------------------------- --print-config and --config

def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastcifar.train", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_print_config_then_replay_it_on_another_device(tmp_path):
    r = cli("--norm", "gn", "--amp", "--print-config", "cuda")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert set(printed) >= {"config", "recipe", "execution", "sources", "resolved_execution", "device"}
    assert printed["config"]["device"] == "cuda" and printed["sources"]["amp"] == "command line"
    assert printed["device"]["present"] is False and "generic sm80+" in printed["device"]["name"]
    assert printed["resolved_execution"]["precision"] == "bf16" and printed["resolved_execution"]["compile"] is True
    (tmp_path / "r.json").write_text(r.stdout)
    r2 = cli("--config", str(tmp_path / "r.json"), "--device", "cpu", "--print-config")
    assert r2.returncode == 0, r2.stderr
    replay = json.loads(r2.stdout)
    assert replay["recipe"] == printed["recipe"] and replay["config"]["device"] == "cpu"
    assert replay["sources"]["lr"] == "config file" and replay["sources"]["device"] == "command line"
    assert replay["resolved_execution"]["compile"] is False


def test_training_from_a_config_file_uses_its_recipe(tmp_path, small_arrays):
    from fastcifar.loop import fit
    cfg = TrainConfig.resolve(norm="ln", lr=0.07, epochs=1, batch_size=32, limit=64, tta="off", data=small_arrays,
                              device="cpu", quiet=True, plots=False)
    (tmp_path / "c.json").write_text(json.dumps({"config": cfg.to_dict()}))
    r = cli("--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "o" / "metrics.json"))
    assert (m["norm"], m["lr"], m["epochs_run"], m["config"]["limit"]) == ("ln", 0.07, 1, 64)
    assert m["settings_from"]["lr"] == "config file" and m["settings_from"]["out"] == "command line"
    # the API takes the same object and writes the same record
    api = fit(cfg, out=str(tmp_path / "api"))
    assert api.metrics["config"] == {**m["config"], "out": str(tmp_path / "api")}
    assert [h["train_loss"] for h in api.metrics["history"]] == [h["train_loss"] for h in m["history"]]


def test_the_recipes_table_shows_every_recipe_with_its_record_and_steps(tmp_path, capsys):
    from benchmarks import recipes
    recipes.main(["--json", str(tmp_path / "r.json")])
    rows = json.load(open(tmp_path / "r.json"))
    assert len(rows) == len(PRESETS) * 3 * len(DEVICE_TYPES) and all(r["runs"] > 0 for r in rows)
    for r in rows:
        cfg = TrainConfig.resolve(norm=r["norm"], preset=r["preset"], device_type=r["device"])
        assert r["steps_per_epoch"] == recipes.TRAIN_IMAGES // cfg.batch_size
        assert (r["median_steps_to_target"] is not None) == cfg.stop_at_target
    assert "| fast | bn | cuda |" in capsys.readouterr().out
