import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_tar
from fastcifar import loop, train as train_mod
from fastcifar.checkpoint import load_checkpoint
from fastcifar.config import preset_value
from fastcifar.execution import DeviceInfo, check_fused, configure_backends, cpu_has_native_bf16, fused_route
from fastcifar.loop import fit
from fastcifar.data.sources import CLASSES
from fastcifar.device import ConfigError
from fastcifar.models import make_model
from fastcifar.optim import make_optimizer

HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "train_time_s"}
REQUIRED = {"norm", "params", "epochs_run", "within_budget", "device", "dataset", "history",
            "time_to_target_s", "epochs_to_target", "final_test_acc", "best_test_acc"}


def run(tmp_path, source, *extra, out="out"):
    out = str(tmp_path / out)
    argv = ["--data", source, "--out", out, "--batch-size", "32", "--quiet", "--device", "cpu", *extra]
    cfg, saved = train_mod.resolved(argv)
    return fit(cfg, checkpoint=saved).metrics, out


def resolved(argv):
    return train_mod.resolved(argv)[0]


@pytest.fixture(scope="module")
def learnable_source(tmp_path_factory):
    """20 train and 10 test images per class, each class a colour of its own under heavy noise: a network
    that learns scores far above chance (10%) within the fast preset, a broken one does not."""
    from PIL import Image
    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, (len(CLASSES), 3))
    for split, n in (("train", 20), ("test", 10)):
        for ci, c in enumerate(CLASSES):
            os.makedirs(root / "tree" / split / c)
            for j in range(n):
                im = np.clip(colours[ci] + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(im).save(root / "tree" / split / c / f"{j:04d}.png")
    return make_tar(str(root / "tree"), str(root / "learnable.tar.gz"))


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_cli_smoke_learns_and_writes_all_artefacts(tmp_path, learnable_source, norm):
    # measured with seed 0: bn 40% after its 2 epochs of SGD at lr 0.3, gn 87% after 3; chance is 10%.
    # bn's preset (chosen over hundreds of steps of the real data) overshoots on this toy set's few steps (30%),
    # so bn keeps the SGD recipe this threshold was measured at; ln trains its preset's Muon
    lr = ["--lr", "0.3", "--optimizer", "sgd"] if norm == "bn" else []
    metrics, out = run(tmp_path, learnable_source, "--norm", norm, "--target-acc", "0.35", *lr)
    on_disk = json.load(open(os.path.join(out, "metrics.json")))
    assert REQUIRED <= set(on_disk) and on_disk["status"] == "done"
    assert on_disk["norm"] == norm and on_disk["within_budget"] is True and on_disk["params"] <= 50_000
    assert "tarball" in on_disk["dataset"] and HISTORY_KEYS <= set(on_disk["history"][0])
    assert on_disk["final_test_acc"] >= 0.35 and on_disk["epochs_to_target"] == len(on_disk["history"])
    assert on_disk["stop_at_target"] is True and len(on_disk["history"]) <= preset_value("fast", "epochs", norm, "cpu")
    for f in ("model.pt", "curves.png", "misclassified.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    ckpt = load_checkpoint(os.path.join(out, "model.pt"))
    assert ckpt["model_config"]["norm"] == norm
    # the stem was fitted to the training images before the first step: no longer the identity basis
    stem = ckpt["model"]["stem.weight"]
    assert not torch.equal(stem, make_model(norm).stem.weight) and on_disk["whiten_fit_time_s"] > 0


def test_fast_preset_epochs_per_norm_and_explicit_epochs_win():
    fast = [preset_value("fast", "epochs", n, "cpu") for n in ("bn", "gn", "ln")]
    assert [resolved(["--norm", n]).epochs for n in ("bn", "gn", "ln")] == fast
    assert resolved(["--preset", "best"]).epochs == preset_value("best", "epochs", "bn", "cpu")
    assert resolved(["--norm", "gn", "--epochs", "5"]).epochs == 5


def test_unreached_target_is_null_and_time_is_cumulative(tmp_path, small_arrays):
    metrics, _ = run(tmp_path, small_arrays, "--epochs", "3", "--target-acc", "1.0", "--no-plots")
    assert metrics["time_to_target_s"] is None and metrics["epochs_to_target"] is None
    times = [h["train_time_s"] for h in metrics["history"]]
    assert len(times) == 3 and times == sorted(times) and times[0] > 0
    assert metrics["best_test_acc"] == max(h["test_acc"] for h in metrics["history"])


def test_over_budget_is_loud_and_recorded(tmp_path, small_arrays):
    with pytest.warns(UserWarning, match="over the 20-epoch budget"):
        metrics, _ = run(tmp_path, small_arrays, "--epochs", "21", "--limit", "40", "--no-plots",
                         "--target-acc", "0.01", "--stop-at-target")
    assert metrics["within_budget"] is False


def test_same_seed_is_bit_identical_on_cpu(tmp_path, small_arrays):
    a, _ = run(tmp_path, small_arrays, "--epochs", "2", "--stop-at-target", "--target-acc", "1.0",
               "--no-plots", "--seed", "5", out="a")
    b, _ = run(tmp_path, small_arrays, "--epochs", "2", "--stop-at-target", "--target-acc", "1.0",
               "--no-plots", "--seed", "5", out="b")
    strip = lambda m: [{k: v for k, v in h.items() if not k.endswith("time_s")} for h in m["history"]]
    assert strip(a) == strip(b)


def interrupted_after_epoch_one(tmp_path, source, *extra, out="part"):
    """A run killed by Ctrl-C during epoch 2's evaluation: its checkpoint holds epoch 1."""
    cfg = resolved(["--data", source, "--out", str(tmp_path / out), "--batch-size", "32", "--quiet",
                    "--device", "cpu", *extra])

    def interrupt(run, h):  # after epoch 1's checkpoint, as Ctrl-C during epoch 2 would leave it
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, callbacks=[interrupt])
    assert load_checkpoint(str(tmp_path / out / "model.pt"))["epoch"] == 1
    return str(tmp_path / out)


def resume(out, *extra):
    cfg, saved = train_mod.resolved(["--resume", out, "--quiet", "--device", "cpu", *extra])
    return fit(cfg, checkpoint=saved).metrics


def strip_history(m):
    return [(h["epoch"], h["train_loss"], h["train_acc"], h["test_loss"], h["test_acc"]) for h in m["history"]]


@pytest.mark.parametrize("loader", ["resident", "ffcv"])
def test_resume_matches_uninterrupted_run(tmp_path, small_source, small_arrays, loader):
    # ffcv orders each epoch by seed + its epoch counter, which a resumed run must restore
    common = ["--preset", "best", "--epochs", "3", "--no-plots", "--seed", "2", "--loader", loader]
    source = small_source if loader == "ffcv" else small_arrays  # the ffcv loader streams betons
    full, _ = run(tmp_path, source, *common, out="full")
    part = interrupted_after_epoch_one(tmp_path, source, *common)
    assert strip_history(resume(part)) == strip_history(full)  # a bare --resume: the run's own settings


def test_resume_keeps_the_runs_settings_and_refuses_contradictions(tmp_path, small_arrays, capsys):
    part = interrupted_after_epoch_one(tmp_path, small_arrays, "--preset", "best", "--epochs", "2", "--lr", "0.05",
                                       "--norm", "gn", "--no-plots", "--limit", "64")
    for flag, value in (("--norm", "ln"), ("--lr", "0.1"), ("--epochs", "1"), ("--preset", "fast")):
        with pytest.raises(SystemExit) as e:
            train_mod.main(["--resume", part, "--quiet", "--device", "cpu", flag, value])
        assert str(e.value).startswith(f"error: {flag} {value} contradicts the run being resumed") \
            and "\n" not in str(e.value)
    m = resume(part, "--norm", "gn", "--lr", "0.05")  # repeating the run's own settings is fine
    assert (m["norm"], m["lr"], m["epochs_planned"], m["epochs_run"], m["batch_size"]) == ("gn", 0.05, 2, 2, 32)
    assert (m["settings_from"]["batch_size"], m["settings_from"]["lr"]) == ("resumed run", "command line")
    # a larger --epochs extends the finished run
    m = resume(part, "--epochs", "3")
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3] and m["epochs_planned"] == 3
    # on another device type the loader's and torch's RNG states would not fit
    from fastcifar.checkpoint import save_checkpoint
    ckpt = load_checkpoint(os.path.join(part, "model.pt"))
    save_checkpoint(os.path.join(part, "model.pt"), {**ckpt, "device": "cuda"})
    with pytest.raises(ConfigError, match="the run trained on cuda, this process would use cpu; resume it with "
                                          "--device cuda"):
        resume(part, "--epochs", "4")


def test_resume_loads_to_the_cpu_and_restores_cpu_rng_states(tmp_path, small_arrays, monkeypatch):
    """Resuming on CUDA once moved the RNG ByteTensors to the GPU, which torch.set_rng_state refuses. Here a
    checkpoint loaded for any device but the CPU comes back on 'meta', as it would come back on the GPU."""
    part = interrupted_after_epoch_one(tmp_path, small_arrays, "--preset", "best", "--epochs", "2", "--no-plots")
    import fastcifar.checkpoint as ck
    real_load = torch.load

    def load(f, map_location=None, **kw):
        state = real_load(f, map_location="cpu", **kw)
        if torch.device(map_location or "cpu").type != "cpu":
            state = torch.utils._pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, state)
        return state
    monkeypatch.setattr(ck.torch, "load", load)
    got = {}
    monkeypatch.setattr(torch, "set_rng_state", lambda s: got.setdefault("cpu", s))
    cfg, ckpt = loop.configure(resume=part, device="cpu")  # loaded once, to the CPU
    model = make_model("bn", cfg.arch)  # the layout the checkpoint was saved from
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loader = type("L", (), {"load_state_dict": lambda self, s: got.setdefault("loader", s["generator"]),
                            "state_dict": lambda self: {"generator": torch.Generator().get_state()}})()
    loop.restore(ckpt, os.path.join(part, "model.pt"), torch.device("cuda"), model, opt, sched, loader)
    for k in ("cpu", "loader"):
        assert got[k].device.type == "cpu" and got[k].dtype == torch.uint8, k
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_nan_loss_stops_with_the_step_and_keeps_checkpoint(tmp_path, small_arrays, monkeypatch):
    real = torch.nn.functional.cross_entropy
    n = {"calls": 0}

    def poisoned(logits, y, **kw):
        n["calls"] += 1
        loss = real(logits, y, **kw)
        return loss * float("nan") if n["calls"] > 8 and kw.get("label_smoothing") is not None else loss
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+"):
        run(tmp_path, small_arrays, "--epochs", "3", "--preset", "best", "--no-plots")
    out = tmp_path / "out"
    m = json.load(open(out / "metrics.json"))
    assert m["status"] == "failed" and "non-finite" in m["error"]
    assert load_checkpoint(str(out / "model.pt"))["epoch"] >= 1


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastcifar.train", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("args,msg", [
    (["--norm", "xyz"], "invalid choice: 'xyz'"),
    (["--epochs", "0"], "--epochs must be a whole number, at least 1"),
    (["--limit", "0"], "--limit must be a whole number, at least 1"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--compile", "off", "--cuda-graphs"], "--cuda-graphs captures the compiled step"),
])
def test_bad_arguments_exit_cleanly(args, msg):
    r = cli(*args)
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


def test_missing_data_path_exits_cleanly(tmp_path):
    r = cli("--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
            env={"FASTCIFAR_CACHE": str(tmp_path / "c")})
    assert r.returncode == 1 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "converting" not in r.stdout  # refused before any conversion


def test_evaluate_cli_scores_a_checkpoint(tmp_path, small_arrays):
    metrics, out = run(tmp_path, small_arrays, "--epochs", "1", "--no-plots")
    r = subprocess.run([sys.executable, "-m", "fastcifar.evaluate", "--checkpoint", f"{out}/model.pt",
                        "--data", small_arrays, "--json", str(tmp_path / "e.json"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "FASTCIFAR_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    e = json.load(open(tmp_path / "e.json"))
    assert e["test_acc"] == pytest.approx(metrics["final_test_acc"]) and set(e["per_class"]) >= {"cat", "truck"}


def test_tta_views_and_their_shifts():
    from fastcifar.evaluate import shifted, tta_logits
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert torch.equal(shifted(x, 1)[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(shifted(x, -1)[..., :-1, :-1], x[..., 1:, 1:])
    seen = []
    model = lambda v: (seen.append(v.clone()), v.sum((1, 2, 3))[:, None].repeat(1, 10))[1]  # noqa: E731
    for tta, views in (("off", 1), ("flip", 2), ("flip-shift", 4)):
        seen.clear()
        out = tta_logits(model, x, tta)
        assert len(seen) == views and out.shape == (2, 10)
    assert torch.equal(seen[1], x.flip(3)) and torch.equal(seen[3], shifted(x.flip(3), 1))
    with pytest.raises(ValueError, match="unknown tta"):
        tta_logits(model, x, "rotate")


# ---------------------------------------------------------------- epochs, device-aware defaults, compile

def test_explicit_epochs_run_them_all(tmp_path, small_arrays):
    p = resolved
    fast_gn = preset_value("fast", "epochs", "gn", "cpu")
    assert p(["--norm", "gn"]).stop_at_target is True  # the fast preset at its own epoch count
    assert p(["--norm", "gn", "--epochs", str(fast_gn)]).stop_at_target is True
    assert p(["--norm", "gn", "--epochs", str(fast_gn + 1)]).stop_at_target is False
    assert p(["--epochs", "4", "--stop-at-target"]).stop_at_target is True
    assert p(["--preset", "best"]).stop_at_target is False
    m, _ = run(tmp_path, small_arrays, "--epochs", "3", "--target-acc", "0.01", "--limit", "64", "--no-plots")
    assert m["epochs_run"] == 3 and m["epochs_to_target"] == 1 and m["steps_to_target"] == m["steps_per_epoch"]


def test_flags_parse_to_the_config_fields():
    assert resolved(["--compile"]).compile == "on" and resolved([]).compile == "auto"
    assert resolved(["--cuda-graphs"]).cuda_graphs and not resolved([]).cuda_graphs
    assert resolved(["--no-plots"]).plots is False and resolved([]).plots is True
    assert resolved(["--preset", "best", "--arch", "deep"]).arch == "deep"
    cfg = resolved(["--batch-size", "64", "--amp"])
    assert (cfg.batch_size, cfg.amp, cfg.sources["batch_size"], cfg.sources["lr"]) == \
        (64, True, "command line", "preset fast (cpu)")


def test_cuda_backends_are_tuned_only_on_cuda(monkeypatch):
    b = torch.backends
    for k, v in (("benchmark", False), ("allow_tf32", False)):
        monkeypatch.setattr(b.cudnn, k, v)
    monkeypatch.setattr(b.cuda.matmul, "allow_tf32", False)
    configure_backends(torch.device("cpu"))
    assert not (b.cudnn.benchmark or b.cuda.matmul.allow_tf32)
    configure_backends(torch.device("cuda"))
    assert b.cudnn.benchmark and b.cuda.matmul.allow_tf32 and b.cudnn.allow_tf32


def test_cuda_graphs_on_the_cpu_is_one_line_error(tmp_path):
    r = cli("--cuda-graphs", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.strip() == \
        "error: --cuda-graphs: CUDA graphs need a CUDA device; leave the flag out on the CPU"


def test_limit_below_the_batch_size_is_one_line_error(tmp_path):
    # the last partial batch is dropped, so such a run used to train zero steps and print nan
    r = cli("--limit", "100", "--batch-size", "128", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.strip() == ("error: --limit 100 is smaller than the batch size 128, so an "
                                                      "epoch would have no training step; raise --limit or lower "
                                                      "--batch-size")


def test_metrics_record_effective_settings(tmp_path, small_arrays):
    m, _ = run(tmp_path, small_arrays, "--epochs", "1", "--limit", "64", "--no-plots")
    assert (m["compile"], m["compile_requested"], m["cuda_graphs"]) == (False, "auto", False)
    assert (m["batch_size"], m["lr"], m["arch"]) == (32, preset_value("fast", "lr", "bn", "cpu"), "lean")
    assert (m["settings_from"]["batch_size"], m["settings_from"]["lr"]) == ("command line", "preset fast (cpu)")
    assert m["config"]["batch_size"] == 32 and m["execution"]["precision"] == "fp32"


def test_compile_warm_up_covers_every_graph(tmp_path, small_arrays, monkeypatch):
    """After the warm-up nothing compiles again: not the test-time views, not a training batch (here 150)
    larger than the test batch (100)."""
    graphs, phase = [], {"now": "warm-up"}

    def counting(gm, example_inputs):
        graphs.append(phase["now"])
        return gm.forward
    real_compile, real_warm = torch.compile, loop.warm_up
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counting, dynamic=False))

    def warm_up(run):
        t = real_warm(run)
        phase["now"] = "training"
        return t
    monkeypatch.setattr(loop, "warm_up", warm_up)
    torch._dynamo.reset()
    m, _ = run(tmp_path, small_arrays, "--compile", "--epochs", "2", "--batch-size", "150", "--preset", "best",
               "--tta", "flip-shift")
    assert m["compile"] is True and m["compile_time_s"] > 0 and m["epochs_run"] == 2
    assert "warm-up" in graphs and "training" not in graphs, graphs


@pytest.mark.slow
def test_compile_with_inductor_trains(tmp_path, small_arrays):
    torch._dynamo.reset()
    m, _ = run(tmp_path, small_arrays, "--compile", "on", "--epochs", "1", "--limit", "64", "--no-plots",
               "--tta", "off")
    ref, _ = run(tmp_path, small_arrays, "--compile", "off", "--epochs", "1", "--limit", "64", "--no-plots",
                 "--tta", "off", out="ref")
    assert m["compile"] is True and m["compile_time_s"] > 0
    assert m["history"][0]["train_loss"] == pytest.approx(ref["history"][0]["train_loss"], rel=1e-3)


CPU = DeviceInfo("cpu", "cpu (test)")


def test_fused_norm_on_where_the_kernel_cannot_run_is_one_line_error(monkeypatch):
    import fastcifar_kernels
    monkeypatch.setattr(fastcifar_kernels, "fused_supported", lambda device=None, dtype=None: False)
    with pytest.raises(ConfigError, match="^--fused-norm on: the Triton kernel needs CUDA"):
        fused_route("on", "gn", CPU, "fp32")
    assert fused_route("auto", "gn", CPU, "fp32")[0] == "torch"
    assert fused_route("on", "bn", CPU, "fp32")[0] == "n/a"


@pytest.fixture
def interpreted_kernel(monkeypatch):
    """The kernels under the Triton interpreter with verification results of this test only."""
    from conftest import KERNELS as impl
    if not impl._INTERPRETED:
        pytest.skip("the kernels were not imported under TRITON_INTERPRET (a GPU machine)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for cache in ("_STATUS", "_ROUTES", "_ENV"):
        monkeypatch.setattr(impl, cache, {})
    return impl


@pytest.mark.slow  # every kernel launch is interpreted
def test_fused_norm_on_end_to_end_under_the_interpreter(interpreted_kernel, tmp_path, small_arrays):
    m, _ = run(tmp_path, small_arrays, "--norm", "gn", "--fused-norm", "on", "--epochs", "1", "--limit", "32",
               "--batch-size", "16", "--no-plots", "--tta", "off")
    assert m["fused_norm"] is True and m["fused_norm_fallback"] is None and m["status"] == "done"
    assert np.isfinite(m["history"][0]["train_loss"])


def test_fused_norm_verifies_the_kernel_before_trusting_it(interpreted_kernel):
    cpu = torch.device("cpu")
    assert fused_route("auto", "gn", CPU, "fp32")[0] == "triton"
    assert check_fused("auto", cpu, torch.float32) == (True, None)
    assert check_fused("on", cpu, torch.float32) == (True, None)


def test_a_broken_kernel_falls_back_under_auto_and_fails_under_on(interpreted_kernel, tmp_path, small_arrays,
                                                                    monkeypatch):
    real = interpreted_kernel._forward

    def broken(*a, **k):
        out = real(*a, **k)
        out[0][(0,) * out[0].dim()] += 0.5
        return out
    monkeypatch.setattr(interpreted_kernel, "_forward", broken)
    with pytest.raises(ConfigError, match=r"^--fused-norm on: .*mismatch: max relative error") as e:
        with pytest.warns(RuntimeWarning, match="disagrees with torch"):
            check_fused("on", torch.device("cpu"), torch.float32)
    assert "\n" not in str(e.value)
    with pytest.warns(RuntimeWarning, match="fused GroupNorm\\+ReLU not used"):
        m, _ = run(tmp_path, small_arrays, "--norm", "gn", "--fused-norm", "auto", "--epochs", "1", "--limit", "64",
                   "--no-plots", "--tta", "off")
    assert m["fused_norm"] is False and m["fused_norm_fallback"].startswith("mismatch: max relative error")
    assert np.isfinite(m["history"][0]["train_loss"])


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_amp_trains_in_bf16_on_a_cpu_with_native_bf16(tmp_path, small_arrays, monkeypatch):
    dtypes = []
    real_fwd = make_model("bn").__class__.forward

    def fwd(self, x):
        out = real_fwd(self, x)
        dtypes.append(out.dtype)
        return out
    monkeypatch.setattr(make_model("bn").__class__, "forward", fwd)
    m, _ = run(tmp_path, small_arrays, "--amp", "--epochs", "1", "--limit", "64", "--no-plots")
    assert m["amp"] is True and set(dtypes) == {torch.bfloat16} and np.isfinite(m["history"][0]["train_loss"])
