"""python -m benchmarks.gpu_report on the CPU: what it runs and skips, how failures are recorded, and the
configuration-to-flags table that the GPU runs will use."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import gpu_report as G  # noqa: E402
from benchmarks import time_to_accuracy as TTA  # noqa: E402
from fastcifar import train as T  # noqa: E402

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


# ---------------------------------------------------------------- the whole command without CUDA

@no_cuda_only
def test_cpu_run_reports_no_cuda_and_what_it_skipped(tmp_path, synthetic_tests):
    out = tmp_path / "report"
    assert G.main(["--out", str(out), "--test-paths", synthetic_tests]) == 0
    rep, md = load(out)
    assert rep["cuda"] is False and rep["state"] == "complete"
    assert rep["environment"]["torch"] == torch.__version__ and rep["environment"]["git_commit"]
    parts = rep["parts"]
    assert list(parts) == list(G.PARTS) and all(p["status"] == "skipped" for p in parts.values())
    # the CUDA tests were selected and skipped; the plain one and the skip-with-CUDA one were not selected
    names = {t["test"].split("::")[1]: t["outcome"] for t in parts["tests"]["tests"]}
    assert names == {"test_needs_cuda": "skipped", "test_marked_cuda": "skipped"}
    assert "no CUDA" in parts["tests"]["reason"] and "no CUDA" in parts["kernels"]["reason"]
    assert "no CUDA" in parts["time_to_target"]["reason"] and "--cpu-smoke" in parts["time_to_target"]["reason"]
    assert "**no CUDA device**" in md and "test_needs_cuda" in md
    assert all(f"| {p} | skipped |" in md for p in G.PARTS)


@pytest.mark.slow
@no_cuda_only
def test_real_suite_selects_the_cuda_tests(tmp_path):
    assert G.main(["--out", str(tmp_path), "--parts", "tests"]) == 0
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
    monkeypatch.setattr(G, "run_logged", fake_pytest)
    ctx = G.Context(str(tmp_path), True, {})
    rec = G.part_tests(G.parse_args(["--out", str(tmp_path), "--test-paths", "x.py"]), ctx)
    assert rec["status"] == "failed" and rec["reason"].startswith("1 failed, 1 errors")
    assert [(t["test"], t["outcome"], t["message"]) for t in rec["tests"]] == [
        ("t::ok", "passed", ""), ("t::bad", "failed", "assert 1 == 2"), ("t::boom", "error", "fixture broke"),
        ("t::later", "skipped", "needs CUDA")]


def test_pytest_that_writes_no_junit_is_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "run_logged", lambda cmd, log, timeout: ("timeout", 9.0))
    args = G.parse_args(["--out", str(tmp_path), "--test-paths", "x.py"])
    rec = G.part_tests(args, G.Context(str(tmp_path), True, {}))
    assert rec["status"] == "failed" and "timeout" in rec["reason"]


# ---------------------------------------------------------------- failures are recorded, the rest still runs

def test_a_part_that_raises_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    ran = []

    def boom(args, ctx):
        ran.append("tests")
        raise RuntimeError("the GPU caught fire")

    def fine(name):
        def part(args, ctx):
            ran.append(name)
            return {"status": "ok", "reason": f"{name} fine"}
        return part
    monkeypatch.setitem(G.PART_FNS, "tests", boom)
    monkeypatch.setitem(G.PART_FNS, "kernels", fine("kernels"))
    monkeypatch.setitem(G.PART_FNS, "time_to_target", fine("time_to_target"))
    assert G.main(["--out", str(tmp_path)]) == 1
    rep, md = load(tmp_path)
    assert ran == ["tests", "kernels", "time_to_target"] and rep["state"] == "complete"
    t = rep["parts"]["tests"]
    assert t["status"] == "failed" and t["reason"] == "RuntimeError: the GPU caught fire" and "boom" in t["traceback"]
    assert rep["parts"]["kernels"]["status"] == rep["parts"]["time_to_target"]["status"] == "ok"
    assert "the GPU caught fire" in md and "| kernels | ok | kernels fine |" in md


def test_interrupt_keeps_the_report(tmp_path, monkeypatch):
    def interrupted(args, ctx):
        raise KeyboardInterrupt
    monkeypatch.setitem(G.PART_FNS, "tests", lambda args, ctx: {"status": "ok", "reason": "done"})
    monkeypatch.setitem(G.PART_FNS, "kernels", interrupted)
    assert G.main(["--out", str(tmp_path), "--parts", "tests", "kernels"]) == 130
    rep, _ = load(tmp_path)
    assert rep["state"] == "interrupted" and rep["parts"]["tests"]["status"] == "ok"
    assert rep["parts"]["kernels"] == {"status": "failed", "reason": "interrupted"}


def test_crashed_and_hung_processes_are_named(tmp_path):
    log = str(tmp_path / "x.log")
    rc, _ = G.run_logged([sys.executable, "-c", "import os; print('last words', flush=True); os.abort()"], log, 60)
    assert rc not in (0, "timeout") and "last words" in G.crash_note(rc, log, 60)
    rc, secs = G.run_logged([sys.executable, "-c", "import time; time.sleep(60)"], log, 1)
    assert rc == "timeout" and secs < 30 and "1 s timeout" in G.crash_note(rc, log, 1)


# ---------------------------------------------------------------- configuration -> training flags

def test_configuration_table_gives_the_intended_flags():
    assert G.config_flags("eager") == ["--compile", "off", "--fused-norm", "off", "--no-cuda-graphs"]
    assert G.config_flags("compile-graphs") == ["--compile", "on", "--fused-norm", "off", "--cuda-graphs"]
    assert G.config_flags("fused") == ["--compile", "off", "--fused-norm", "on", "--no-cuda-graphs"]
    assert G.config_flags("compile-fused-graphs") == ["--compile", "on", "--fused-norm", "on", "--cuda-graphs"]
    assert len({tuple(G.config_flags(c)) for c in G.CONFIGS}) == 6  # distinct: graphs only with compile
    assert G.configs_for("bn", list(G.CONFIGS)) == ["eager", "compile", "compile-graphs"]
    assert G.configs_for("ln", list(G.CONFIGS)) == list(G.CONFIGS)


def test_train_argv_per_configuration(tmp_path):
    args = G.parse_args(["--out", str(tmp_path), "--train-args=--batch-size 512", "--epochs", "4"])
    runs, warm = G.train_argvs(args, "gn", "compile-fused-graphs", [0, 1], "/betons", str(tmp_path / "c"),
                               torch.device("cuda"))
    assert sorted(runs) == [0, 1]
    a = runs[1]
    assert a[a.index("--norm") + 1] == "gn" and a[a.index("--seed") + 1] == "1" and a[a.index("--device") + 1] == "cuda"
    assert a[a.index("--data") + 1] == "/betons" and a[a.index("--out") + 1] == str(tmp_path / "c" / "s1")
    assert a[a.index("--epochs") + 1] == "4" and "--amp" in a and a[a.index("--batch-size") + 1] == "512"
    assert a[-5:] == ["--compile", "on", "--fused-norm", "on", "--cuda-graphs"]
    # the untimed warm-up: same norm and kernel, no compile, no graphs, one epoch on a small subset
    assert warm[-5:] == ["--compile", "off", "--fused-norm", "on", "--no-cuda-graphs"]
    assert warm[warm.index("--epochs") + 1] == "1" and warm[warm.index("--limit") + 1] == str(TTA.WARMUP_IMAGES)


def _train_has_new_flags():
    return G.train_rejects(["--compile", "off", "--fused-norm", "off", "--no-cuda-graphs"]) is None


@pytest.mark.skipif(not _train_has_new_flags(),
                    reason="fastcifar.train has no --compile {auto,on,off} / --cuda-graphs yet")
@pytest.mark.parametrize("name", list(G.CONFIGS))
def test_train_parses_every_configuration(name, tmp_path):
    compile_, fused, graphs = G.CONFIGS[name]
    args = G.parse_args(["--out", str(tmp_path)])
    runs, warm = G.train_argvs(args, "gn", name, [0], "/betons", str(tmp_path), torch.device("cuda"))
    t = T.parse_args(runs[0])
    assert t.compile in ((True, "on") if compile_ else (False, "off"))
    assert t.fused_norm == ("on" if fused else "off") and t.cuda_graphs is graphs
    w = T.parse_args(warm)
    assert w.compile in (False, "off") and w.cuda_graphs is False and w.epochs == 1


def test_rejected_flags_are_a_one_line_error():
    assert "--no-such-flag" in G.train_rejects(["--no-such-flag"])
    assert G.train_rejects(["--norm", "gn"]) is None


# ---------------------------------------------------------------- time to target, as it runs on a GPU

def _fake_run(seed, status="reached", t=1.0):
    return {"norm": "x", "seed": seed, "status": status, "time_to_target_s": t if status == "reached" else None,
            "epochs_to_target": 2 if status == "reached" else None, "final_test_acc": 0.72, "best_test_acc": 0.72,
            "compile_time_s": 3.0, "eval_time_s": 0.1, "params": 49514,
            "error": None if status == "reached" else "did not reach 70% in 3 epoch(s) (best 69.00%)"}


def test_time_to_target_records_each_configuration(tmp_path, monkeypatch):
    import fastcifar.data
    manifest = {"description": "image folder x.tar.gz (JPEG)", "splits": {"train": {"images": 50000},
                                                                         "test": {"images": 10000}}}
    monkeypatch.setattr(fastcifar.data, "resolve_source", lambda p: p)
    monkeypatch.setattr(fastcifar.data, "prepare_betons", lambda src, d: ("/betons", manifest))
    monkeypatch.setattr(G, "train_rejects", lambda argv: "error: no graphs with the fused norm"
                        if "--cuda-graphs" in argv and argv[argv.index("--fused-norm") + 1] == "on" else None)
    children = []

    def fake_child(kind, spec, out, name, timeout):
        children.append((name, spec))
        assert kind == "tta" and spec["seeds"] == [0, 1] and spec["warmup"][-5:-3] == ["--compile", "off"]
        if name == "tta-gn-compile":
            return None, -11, 5.0, "/logs/crash.log"  # killed by a signal before writing anything
        runs = [_fake_run(0), _fake_run(1, "not_reached" if name == "tta-gn-fused" else "reached", 2.0)]
        return {"runs": runs, "summary": TTA.summarize_norm(runs), "warmup": {"status": "reached"}}, 0, 9.0, "/l"
    monkeypatch.setattr(G, "run_child", fake_child)
    args = G.parse_args(["--out", str(tmp_path), "--data", str(tmp_path), "--norm", "bn", "gn", "--seeds", "2"])
    report = {"cuda": True, "state": "running", "environment": G.environment_record(False, []), "parts": {}}
    ctx = G.Context(str(tmp_path), True, report)
    rec = G.part_time_to_target(args, ctx)

    by = {(c["norm"], c["config"]): c for c in rec["configs"]}
    assert len(by) == 3 + 6 and ("bn", "fused") not in by
    refused = by[("gn", "compile-fused-graphs")]
    assert refused["status"] == "failed" and "no graphs" in refused["reason"]
    names = [n for n, _ in children]
    assert "tta-gn-compile-fused-graphs" not in names and "tta-gn-compile-graphs" in names  # no child when refused
    assert by[("gn", "compile")]["status"] == "failed" and "status -11" in by[("gn", "compile")]["reason"]
    assert by[("gn", "fused")]["status"] == "failed" and "seed 1: did not reach" in by[("gn", "fused")]["reason"]
    ok = by[("gn", "compile-fused")]
    assert ok["status"] == "ok" and ok["summary"]["time_to_target_s"]["median"] == 1.5
    assert ok["argv"][-5:] == ["--compile", "on", "--fused-norm", "on", "--no-cuda-graphs"]
    assert rec["status"] == "failed" and "gn compile" in rec["reason"]
    assert ctx.report["dataset"]["images"] == {"train": 50000, "test": 10000}

    report["parts"]["time_to_target"] = rec
    md = G.render_markdown(report)
    assert "| gn | compile-fused | `--compile on --fused-norm on --no-cuda-graphs` | 2 / 2 | 1.50 (1.00-2.00) |" in md
    assert "| gn | fused |" in md and "1 / 2" in md


@pytest.mark.slow
@no_cuda_only
def test_cpu_smoke_trains_in_child_processes(small_source, tmp_path, monkeypatch):
    # flags every version of the trainer takes for an eager, unfused, graph-free run
    monkeypatch.setitem(G.TRAIN_FLAGS, "compile", {False: [], True: ["--compile"]})
    monkeypatch.setitem(G.TRAIN_FLAGS, "graphs", {False: [], True: []})
    out = tmp_path / "r"
    rc = G.main(["--out", str(out), "--parts", "time_to_target", "--cpu-smoke", "--data", small_source,
                 "--beton-dir", str(tmp_path / "b"), "--norm", "bn", "--configs", "eager", "compile", "--limit", "200",
                 "--target", "0.01", "--no-amp"])
    rep, md = load(out)
    p = rep["parts"]["time_to_target"]
    assert rc == 0 and p["status"] == "ok" and p["device"] == "cpu", p
    (c,) = p["configs"]  # compile is left out on the CPU
    assert c["config"] == "eager" and c["warmup"]["status"] in ("reached", "not_reached")
    assert c["runs"][0]["status"] == "reached" and c["runs"][0]["epochs_run"] == 1
    assert os.path.isfile(out / "time_to_target" / "bn-eager" / "s0" / "metrics.json")
    assert rep["dataset"]["images_used"]["train"] == 200 and "| bn | eager |" in md


# ---------------------------------------------------------------- the kernel timing, on the CPU's interpreter

@pytest.fixture
def interpreted_kernels(monkeypatch):
    import fastcifar_kernels as fk
    from conftest import WE_SET_INTERPRET
    if WE_SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not fk.fused_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("the Triton kernels cannot run here")
    return fk


def test_kernel_timing_checks_the_fused_result(interpreted_kernels, monkeypatch):
    fk = interpreted_kernels
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    rows, check = G.time_kernel_config(fk, (4, 32, 8, 8, 4), "fp32", "cl", ["fwd", "fwdbwd"], ["eager", "fused"], dev,
                                       lambda fn: (fn(), calls.append(1), 0.5)[2])
    assert [(r["impl"], r["mode"], r["ms"]) for r in rows] == [
        ("eager", "fwd", 0.5), ("eager", "fwdbwd", 0.5), ("fused", "fwd", 0.5), ("fused", "fwdbwd", 0.5)]
    assert len(calls) == 4 and check["ok"] and check["keeps_format"] and max(check["rel_err"].values()) < 1e-5
    # a kernel whose gradient is off must be caught by the check, not timed as if it were right
    real = fk.group_norm_relu

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.01 * g
    monkeypatch.setattr(fk, "group_norm_relu", lambda *a: Scaled.apply(real(*a)))
    _, check = G.time_kernel_config(fk, (4, 32, 8, 8, 4), "fp32", "nchw", ["fwd"], ["fused"], dev, lambda fn: 1.0)
    assert not check["ok"] and check["rel_err"]["y"] < 1e-5 and check["rel_err"]["dx"] > 1e-3


def test_kernel_timing_refuses_to_time_the_torch_path(monkeypatch):
    fk = G.importlib.import_module("fastcifar_kernels")
    monkeypatch.setattr(fk, "fused_available", lambda x=None: False)
    with pytest.raises(RuntimeError, match="fused kernel cannot run"):
        G.time_kernel_config(fk, (2, 8, 4, 4, 2), "fp32", "cl", ["fwd"], ["fused"], "cpu", lambda fn: 1.0)


# ---------------------------------------------------------------- input and import hygiene

def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    for argv in (["--data", str(tmp_path / "missing")], ["--seeds", "0"], ["--target", "70"]):
        with pytest.raises(SystemExit) as e:
            G.parse_args(["--out", str(tmp_path), *argv])
        assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_import_leaves_triton_alone():
    """pytest loads the module as a plugin before tests/conftest.py sets TRITON_INTERPRET: triton must not be
    imported by then, or the kernel tests would lose the interpreter."""
    code = "import sys, benchmarks.gpu_report; sys.exit('triton' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
