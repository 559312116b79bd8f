"""python -m benchmarks.gpu_report on the CPU: what it runs and skips, how failures are recorded, the settings each
time-to-target configuration trains with, the kernels part's check-before-timing, and --cpu-smoke end to end."""
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, WE_SET_INTERPRET

from benchmarks import kernels as K
from benchmarks import time_to_accuracy as TA
from benchmarks.gpu_report import cli, kernels_part, processes, render, tests_part
from benchmarks.gpu_report import time_to_target_part as TT
from fastcifar import TrainConfig
from fastcifar.device import ConfigError

no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report written without CUDA")

SYNTHETIC_TESTS = textwrap.dedent('''
    import pytest, torch

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_needs_cuda():
        assert torch.cuda.is_available()

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
    def test_only_without_gpu():
        pass

    @pytest.mark.cuda
    def test_marked_cuda():
        if not torch.cuda.is_available():
            pytest.skip("no CUDA here")

    def test_plain():
        pass
''')


def load(out):
    with open(os.path.join(out, "report.json")) as f, open(os.path.join(out, "report.md")) as g:
        return json.load(f), g.read()


@pytest.fixture
def synthetic_tests(tmp_path):
    path = tmp_path / "suite" / "test_synthetic.py"
    path.parent.mkdir()
    path.write_text(SYNTHETIC_TESTS)
    return str(path)


def context(tmp_path, cuda=True, smoke=False):
    return cli.Context(str(tmp_path), cuda, {"cuda": cuda, "state": "running", "parts": {},
                                             "environment": cli.environment_record(False, [])}, smoke)


# ---------------------------------------------------------------- the whole command without CUDA

@no_cuda_only
def test_cpu_run_reports_no_cuda_and_what_it_skipped(tmp_path, synthetic_tests):
    out = tmp_path / "report"
    assert cli.main(["--out", str(out), "--test-paths", synthetic_tests]) == 0
    rep, md = load(out)
    assert rep["cuda"] is False and rep["state"] == "complete"
    assert rep["environment"]["torch"] == torch.__version__ and rep["environment"]["git_commit"]
    parts = rep["parts"]
    assert list(parts) == list(cli.PARTS) and all(p["status"] == "skipped" for p in parts.values())
    # the CUDA tests were selected and skipped; the plain one and the skip-with-CUDA one were not selected
    names = {t["test"].split("::")[1]: t["outcome"] for t in parts["tests"]["tests"]}
    assert names == {"test_needs_cuda": "skipped", "test_marked_cuda": "skipped"}
    assert "no CUDA" in parts["tests"]["reason"] and "no CUDA" in parts["kernels"]["reason"]
    assert "no CUDA" in parts["time_to_target"]["reason"] and "--cpu-smoke" in parts["time_to_target"]["reason"]
    assert "**no CUDA device**" in md and "test_needs_cuda" in md
    assert all(f"| {p} | skipped |" in md for p in cli.PARTS)


@pytest.mark.slow
@no_cuda_only
def test_real_suite_selects_the_cuda_tests(tmp_path):
    assert cli.main(["--out", str(tmp_path), "--parts", "tests"]) == 0
    tests = {t["test"].split("::")[1].split("[")[0] for t in load(tmp_path)[0]["parts"]["tests"]["tests"]}
    assert {"test_cuda_dtypes_on_model_shapes", "test_cuda_fp32_weight_with_bf16_activations"} <= tests
    assert "test_kernel_benchmark_skips_without_cuda" not in tests  # skipped *with* CUDA: not a CUDA test
    assert "test_forward_matches_reference" not in tests


def test_failed_tests_fail_the_part(tmp_path, monkeypatch):
    junit = """<testsuites><testsuite>
      <testcase classname="t" name="ok" time="0.1"/>
      <testcase classname="t" name="bad" time="0.1"><failure message="assert 1 == 2">trace</failure></testcase>
      <testcase classname="t" name="boom" time="0"><error message="fixture broke"/></testcase>
      <testcase classname="t" name="later" time="0"><skipped message="needs CUDA"/></testcase>
    </testsuite></testsuites>"""

    def fake_pytest(cmd, log, timeout):
        path = next(a.split("=", 1)[1] for a in cmd if a.startswith("--junitxml="))
        with open(path, "w") as f:
            f.write(junit)
        return 1, 0.5
    monkeypatch.setattr(tests_part, "run_logged", fake_pytest)
    rec = tests_part.run(cli.parse_args(["--out", str(tmp_path), "--test-paths", "x.py"]), context(tmp_path))
    assert rec["status"] == "failed" and rec["reason"].startswith("1 failed, 1 errors")
    assert [(t["test"], t["outcome"], t["message"]) for t in rec["tests"]] == [
        ("t::ok", "passed", ""), ("t::bad", "failed", "assert 1 == 2"), ("t::boom", "error", "fixture broke"),
        ("t::later", "skipped", "needs CUDA")]


def test_pytest_that_writes_no_junit_is_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(tests_part, "run_logged", lambda cmd, log, timeout: ("timeout", 9.0))
    rec = tests_part.run(cli.parse_args(["--out", str(tmp_path), "--test-paths", "x.py"]), context(tmp_path))
    assert rec["status"] == "failed" and "timeout" in rec["reason"]


@pytest.mark.slow  # two pytest processes
def test_smoke_collects_the_cuda_tests_and_fails_on_a_broken_module(tmp_path, synthetic_tests):
    args = cli.parse_args(["--out", str(tmp_path), "--test-paths", synthetic_tests, "--cpu-smoke"])
    rec = tests_part.run(args, context(tmp_path, cuda=False, smoke=True))
    assert rec["status"] == "ok" and "not run" in rec["reason"], rec
    assert sorted(t["test"].split("::")[1] for t in rec["tests"]) == ["test_marked_cuda", "test_needs_cuda"]
    assert {t["outcome"] for t in rec["tests"]} == {"collected"}
    broken = tmp_path / "suite" / "test_broken.py"
    broken.write_text("import no_such_module_anywhere\n")
    args.test_paths.append(str(broken))
    rec = tests_part.run(args, context(tmp_path, cuda=False, smoke=True))
    assert rec["status"] == "failed" and "exited with status" in rec["reason"]


# ---------------------------------------------------------------- failures are recorded, the rest still run

@pytest.mark.parametrize("smoke", [[], ["--cpu-smoke"]])
def test_a_part_that_raises_is_recorded_and_the_others_run(tmp_path, monkeypatch, smoke):
    ran = []

    def boom(args, ctx):
        ran.append("tests")
        raise RuntimeError("the GPU caught fire")

    def fine(name):
        def part(args, ctx):
            ran.append(name)
            return {"status": "ok", "reason": f"{name} fine"}
        return part
    monkeypatch.setitem(cli.PART_FNS, "tests", boom)
    monkeypatch.setitem(cli.PART_FNS, "kernels", fine("kernels"))
    monkeypatch.setitem(cli.PART_FNS, "time_to_target", fine("time_to_target"))
    assert cli.main(["--out", str(tmp_path), *smoke]) == 1
    rep, md = load(tmp_path)
    assert ran == ["tests", "kernels", "time_to_target"] and rep["state"] == "complete"
    t = rep["parts"]["tests"]
    assert t["status"] == "failed" and t["reason"] == "RuntimeError: the GPU caught fire" and "boom" in t["traceback"]
    assert rep["parts"]["kernels"]["status"] == rep["parts"]["time_to_target"]["status"] == "ok"
    assert "the GPU caught fire" in md and "| kernels | ok | kernels fine |" in md
    assert rep["smoke"] is bool(smoke)


def test_interrupt_keeps_the_report(tmp_path, monkeypatch):
    def interrupted(args, ctx):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.PART_FNS, "tests", lambda args, ctx: {"status": "ok", "reason": "done"})
    monkeypatch.setitem(cli.PART_FNS, "kernels", interrupted)
    assert cli.main(["--out", str(tmp_path), "--parts", "tests", "kernels"]) == 130
    rep, _ = load(tmp_path)
    assert rep["state"] == "interrupted" and rep["parts"]["tests"]["status"] == "ok"
    assert rep["parts"]["kernels"] == {"status": "failed", "reason": "interrupted"}


def test_crashed_and_hung_processes_are_named(tmp_path):
    log = str(tmp_path / "x.log")
    rc, _ = processes.run_logged([sys.executable, "-c", "import os; print('last words', flush=True); os.abort()"],
                                 log, 60)
    assert rc not in (0, "timeout") and "last words" in processes.crash_note(rc, log, 60)
    rc, secs = processes.run_logged([sys.executable, "-c", "import time; time.sleep(60)"], log, 1)
    assert rc == "timeout" and secs < 30 and "1 s timeout" in processes.crash_note(rc, log, 1)


def test_a_child_gets_its_own_cold_caches(tmp_path):
    env = processes.fresh_caches(str(tmp_path / "c"))
    log = str(tmp_path / "x.log")
    code = "import os; print(os.environ['TORCHINDUCTOR_CACHE_DIR'], os.environ['TRITON_CACHE_DIR'])"
    assert processes.run_logged([sys.executable, "-c", code], log, 60, env)[0] == 0
    assert processes.log_tail(log, 1).split() == [str(tmp_path / "c" / "inductor"), str(tmp_path / "c" / "triton")]


# ---------------------------------------------------------------- configurations -> TrainConfig settings

def test_configuration_table_gives_the_intended_settings():
    assert TT.CONFIGS["eager"] == {"compile": "off", "fused_norm": "off", "cuda_graphs": False}
    assert TT.CONFIGS["compile-fused-graphs"] == {"compile": "on", "fused_norm": "on", "cuda_graphs": True}
    assert len({tuple(c.values()) for c in TT.CONFIGS.values()}) == 6  # distinct: graphs only with compile
    assert not any(c["cuda_graphs"] and c["compile"] == "off" for c in TT.CONFIGS.values())
    assert TT.configs_for("bn", list(TT.CONFIGS)) == ["eager", "compile", "compile-graphs"]
    assert TT.configs_for("ln", list(TT.CONFIGS)) == list(TT.CONFIGS)
    assert TT.describe("fused") == "compile=off fused_norm=on cuda_graphs=false"


@pytest.mark.parametrize("name", list(TT.CONFIGS))
def test_every_configuration_is_a_valid_train_config(name, tmp_path):
    args = cli.parse_args(["--out", str(tmp_path), "--set", "batch_size=512", "--epochs", "4"])
    cfg = TT.run_config(args, "gn", name, 1, "/betons", str(tmp_path / "c"), "cuda")
    assert (cfg.compile, cfg.fused_norm, cfg.cuda_graphs) == tuple(TT.CONFIGS[name].values())
    assert (cfg.norm, cfg.seed, cfg.device, cfg.data) == ("gn", 1, "cuda", "/betons")
    assert cfg.out == str(tmp_path / "c" / "s1")
    assert (cfg.epochs, cfg.batch_size, cfg.amp, cfg.quiet, cfg.plots, cfg.target_acc) == (4, 512, True, True, False,
                                                                                             0.7)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # what the child process gets
    # the untimed warm-up: same norm and kernel, no compile, no graphs, one epoch on a small subset
    w = TA.warmup_config(cfg, str(tmp_path / "w"))
    assert (w.compile, w.cuda_graphs, w.fused_norm, w.epochs, w.limit) == ("off", False, cfg.fused_norm, 1,
                                                                            TA.WARMUP_IMAGES)
    assert (w.norm, w.batch_size, w.out) == ("gn", 512, str(tmp_path / "w"))
    assert TA.warmup_config(cfg.replace(batch_size=2048), "w").limit == 2 * 2048  # two batches at the run's shape


def test_refused_settings_are_a_config_error(tmp_path):
    args = cli.parse_args(["--out", str(tmp_path), "--set", "no_such=1"])
    with pytest.raises(ConfigError, match="no_such"):
        TT.run_config(args, "gn", "eager", 0, "/betons", str(tmp_path), "cuda")


# ---------------------------------------------------------------- time to target, as it runs on a GPU

def _fake_run(seed, status="reached", t=1.0):
    return {"norm": "x", "seed": seed, "status": status, "time_to_target_s": t if status == "reached" else None,
            "epochs_to_target": 2 if status == "reached" else None, "steps_to_target": 782 if status == "reached"
            else None, "final_test_acc": 0.72, "best_test_acc": 0.72, "compile_time_s": 3.0, "eval_time_s": 0.1,
            "params": 49514, "error": None if status == "reached" else "did not reach 70% in 3 epoch(s) (best 69.00%)"}


def test_time_to_target_runs_every_seed_cold_and_records_each_configuration(tmp_path, monkeypatch):
    import fastcifar.data
    manifest = {"description": "image folder x.tar.gz (JPEG)", "splits": {"train": {"images": 50000},
                                                                         "test": {"images": 10000}}}
    monkeypatch.setattr(fastcifar.data, "resolve_source", lambda p: p)
    monkeypatch.setattr(fastcifar.data, "prepare_data", lambda src, d, kind: SimpleNamespace(folder="/betons",
                                                                                              manifest=manifest))
    real = TT.run_config

    def refusing(args, norm, name, *rest):
        if norm == "gn" and name == "compile-fused-graphs":
            raise ConfigError("--cuda-graphs: no graphs with the fused norm")
        return real(args, norm, name, *rest)
    monkeypatch.setattr(TT, "run_config", refusing)
    children = []

    def fake_child(kind, spec, out, name, timeout, env):
        children.append((name, spec, env))
        cfg, warm = spec["config"], spec["warmup"]
        assert kind == "time_to_target" and (warm["compile"], warm["epochs"], warm["cuda_graphs"]) == ("off", 1, False)
        assert warm["fused_norm"] == cfg["fused_norm"]
        if name == "time_to_target-gn-compile-s1":
            return None, -11, 5.0, "/logs/crash.log"  # killed by a signal before writing anything
        status = "not_reached" if name == "time_to_target-gn-fused-s1" else "reached"
        return {"run": _fake_run(cfg["seed"], status, 1.0 + cfg["seed"]), "warmup": {"status": "reached"}}, 0, 9.0, "/l"
    monkeypatch.setattr(TT, "run_child", fake_child)
    args = cli.parse_args(["--out", str(tmp_path), "--data", str(tmp_path), "--norm", "bn", "gn", "--seeds", "2"])
    ctx = context(tmp_path)
    rec = TT.run(args, ctx)

    by = {(c["norm"], c["config"]): c for c in rec["configs"]}
    assert len(by) == 3 + 6 and ("bn", "fused") not in by
    refused = by[("gn", "compile-fused-graphs")]
    assert refused["status"] == "failed" and "no graphs" in refused["reason"] and refused["runs"] == []
    names = [n for n, _, _ in children]
    assert len(names) == 2 * 8 and "time_to_target-gn-compile-fused-graphs-s0" not in names  # no child when refused
    # one process per seed, each with caches of its own: every compile is cold
    caches = [env["TORCHINDUCTOR_CACHE_DIR"] for _, _, env in children]
    assert len(set(caches)) == len(caches) and all(c.startswith(str(tmp_path)) for c in caches)
    assert {spec["config"]["seed"] for n, spec, _ in children if n.startswith("time_to_target-gn-eager")} == {0, 1}
    assert by[("gn", "compile")]["status"] == "failed" and "status -11" in by[("gn", "compile")]["reason"]
    assert by[("gn", "fused")]["status"] == "failed" and "seed 1: did not reach" in by[("gn", "fused")]["reason"]
    ok = by[("gn", "compile-fused")]
    assert ok["status"] == "ok" and ok["summary"]["time_to_target_s"]["median"] == 1.5
    assert ok["summary"]["steps_to_target"]["median"] == 782 and ok["settings"] == TT.describe("compile-fused")
    assert rec["status"] == "failed" and "gn compile" in rec["reason"]
    assert ctx.report["dataset"]["images"] == {"train": 50000, "test": 10000}

    ctx.report["parts"]["time_to_target"] = rec
    md = render.render_markdown(ctx.report)
    assert "| gn | compile-fused | `compile=on fused_norm=on cuda_graphs=false` | 2 / 2 | 1.50 (1.00-2.00) | 782 |" \
        in md
    assert "| gn | fused |" in md and "1 / 2" in md


# ---------------------------------------------------------------- the kernels part: checked, then timed

@pytest.fixture
def interpreted_kernels(monkeypatch):
    import fastcifar_kernels as fk
    if WE_SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not fk.fused_supported(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("the Triton kernels cannot run here")
    return fk


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def one_call(run, n):
    run(0)
    return 0.5


def test_kernel_timing_checks_before_it_times(interpreted_kernels, monkeypatch):
    fk = interpreted_kernels
    rows, check = K.time_config(fk, (4, 32, 8, 8, 4), "fp32", "cl", ["fwd", "fwdbwd"], ["eager", "compile", "fused"],
                                DEV, {"us": one_call}, compile_backend="eager")
    assert [(r["impl"], r["mode"], r["us"]) for r in rows] == [(i, m, 0.5) for i in ("eager", "compile", "fused")
                                                                 for m in ("fwd", "fwdbwd")]
    assert check["ok"] and check["keeps_format"] and max(check["rel_err"].values()) < 1e-5
    assert fk.kernel_status()[f"{DEV}/float32/channels_last"] == "ok"  # verified before anything was timed
    # a kernel whose gradient is off must be caught by the check, and then not timed at all
    real = fk.group_norm_relu

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.01 * g
    monkeypatch.setattr(fk, "group_norm_relu", lambda *a: Scaled.apply(real(*a)))
    timed = []
    rows, check = K.time_config(fk, (4, 32, 8, 8, 4), "fp32", "nchw", ["fwd"], ["eager", "fused"], DEV,
                                {"us": lambda run, n: timed.append(1) or 1.0})
    assert not check["ok"] and check["rel_err"]["y"] < 1e-5 and check["rel_err"]["dx"] > 1e-3
    assert rows == [] and timed == []


def test_kernel_timing_refuses_a_kernel_that_fails_its_self_check(monkeypatch):
    import fastcifar_kernels as fk

    def failed(device, dtype=torch.float32, channels_last=True, strict=False):
        raise RuntimeError("fused GroupNorm+ReLU kernel on cpu/float32/channels_last: mismatch: max relative error 1")
    monkeypatch.setattr(fk, "verify_kernel", failed)
    with pytest.raises(RuntimeError, match="mismatch"):
        K.time_config(fk, (2, 8, 4, 4, 2), "fp32", "cl", ["fwd"], ["fused"], "cpu", {"us": one_call})
    monkeypatch.setattr(fk, "verify_kernel", lambda *a, **k: True)
    monkeypatch.setattr(fk, "fused_available", lambda x=None, *a: False)
    with pytest.raises(RuntimeError, match="does not run"):
        K.time_config(fk, (2, 8, 4, 4, 2), "fp32", "cl", ["fwd"], ["fused"], "cpu", {"us": one_call})


def test_a_failed_configuration_is_a_failed_row(tmp_path, monkeypatch):
    key = {"models": "gn", "N": 512, "C": 32, "H": 8, "W": 8, "G": 4, "format": "cl"}
    good = dict(key, dtype="fp32", check={"rel_err": {"y": 1e-7, "dx": 1e-7, "dw": 1e-7, "db": 1e-7}, "tol": 1e-4,
                                          "keeps_format": True, "ok": True},
                rows=[{"impl": i, "mode": m, "us": 10.0} for i in ("eager", "compile", "fused")
                      for m in ("fwd", "fwdbwd")])
    wrong = dict(key, dtype="fp16", rows=[], check=dict(good["check"], rel_err={"y": 0.5, "dx": 0, "dw": 0, "db": 0},
                                                        ok=False))
    raised = dict(key, dtype="bf16", error="RuntimeError: fused GroupNorm+ReLU kernel on cuda/bfloat16: mismatch")
    monkeypatch.setattr(kernels_part, "run_child", lambda kind, spec, out, name, timeout, env: (
        {"shapes": 1, "planned": 3, "configs": [good, wrong, raised]}, 0, 1.0, "/l"))
    ctx = context(tmp_path)
    rec = kernels_part.run(cli.parse_args(["--out", str(tmp_path)]), ctx)
    assert rec["status"] == "failed" and rec["reason"].startswith("2 of 3 configurations failed")
    ctx.report["parts"]["kernels"] = rec
    md = render.render_markdown(ctx.report)
    assert "| gn | 512x32x8x8 | 4 | cl | fp32 | fwd | 10.0 | 10.0 | 10.0 | 1.00x | 1.00x | 1.0e-07 ok |" in md
    assert "5.0e-01 FAILED: not timed" in md and "FAILED: RuntimeError: fused GroupNorm+ReLU" in md


# ---------------------------------------------------------------- every part, toy-sized, on the CPU

@pytest.mark.slow
@no_cuda_only
def test_cpu_smoke_runs_every_part_and_each_reports_ok(small_source, tmp_path):
    """What CI runs so that a part that would crash on a GPU crashes here first: the real CUDA tests collected,
    the kernels part under the interpreter, time_to_target in its child processes."""
    out = tmp_path / "r"
    rc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", "--cpu-smoke", "--out", str(out), "--data",
                         small_source, "--beton-dir", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}).returncode
    rep, md = load(out)
    assert {n: p["status"] for n, p in rep["parts"].items()} == {n: "ok" for n in cli.PARTS}, rep["parts"]
    assert rc == 0 and rep["smoke"] is True and rep["state"] == "complete"
    assert "test_cuda_dtypes_on_model_shapes" in md
    (k,) = rep["parts"]["kernels"]["configs"]
    assert k["check"]["ok"] and {r["impl"] for r in k["rows"]} == {"eager", "compile", "fused"}
    (c,) = rep["parts"]["time_to_target"]["configs"]
    (run,) = c["runs"]
    assert (c["norm"], c["config"], run["epochs_run"], run["warmup"]["status"]) == ("gn", "eager", 1, "not_reached")
    assert os.path.isfile(out / "time_to_target" / "gn-eager" / "s0" / "metrics.json")
    assert rep["dataset"]["images_used"]["train"] == 200 and "| gn | eager |" in md


# ---------------------------------------------------------------- input and import hygiene

def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    for argv in (["--data", str(tmp_path / "missing")], ["--seeds", "0"], ["--target", "70"], ["--set", "lr"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(["--out", str(tmp_path), *argv])
        assert e.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["benchmarks.gpu_report.plugin", "benchmarks.gpu_report.cli"])
def test_import_leaves_triton_alone(module):
    """pytest loads the plugin before tests/conftest.py sets TRITON_INTERPRET: triton must not be imported by
    then, or the kernel tests would lose the interpreter."""
    code = f"import sys, {module}; sys.exit('triton' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
