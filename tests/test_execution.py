"""How a run executes per device, decided on the CPU with mocked CUDA capabilities: precision, grad scaler,
compile, the fused kernel's route and what a refusal says."""
import json
import subprocess
import sys

import pytest
import torch

from fastcifar.config import TrainConfig
from fastcifar.device import ConfigError
from fastcifar.execution import DeviceInfo, check_fused, describe_device, plan
from fastcifar.optim import make_optimizer
from fastcifar.models import make_model

GPUS = {  # capability -> (name, native bf16)
    (7, 0): ("Tesla V100-SXM2-16GB", False), (7, 5): ("Tesla T4", False),
    (8, 0): ("NVIDIA A100-SXM4-40GB", True), (9, 0): ("NVIDIA H100 80GB HBM3", True),
}


@pytest.fixture
def mock_gpu(monkeypatch):
    """A CUDA device of the given capability, as far as describe_device can tell; nothing is allocated."""
    def use(cap):
        name, bf16 = GPUS[cap]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
        # torch counts emulation as support unless asked not to: sm70/75 say True by default
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                            bf16 or including_emulation)
        return describe_device("cuda")
    return use


@pytest.mark.parametrize("cap,precision,scaler", [((7, 0), "fp16", True), ((7, 5), "fp16", True),
                                                  ((8, 0), "bf16", False), ((9, 0), "bf16", False)])
def test_amp_per_gpu_capability(mock_gpu, monkeypatch, cap, precision, scaler):
    import fastcifar_kernels
    dev = mock_gpu(cap)
    assert dev.present and dev.capability == cap
    monkeypatch.setattr(fastcifar_kernels, "fused_supported", lambda device=None, dtype=None: True)
    for norm in ("bn", "gn", "ln"):
        ex = plan(TrainConfig.resolve(norm=norm, amp=True, device="cuda"), dev)
        assert (ex.precision, ex.grad_scaler, ex.compile) == (precision, scaler, True)
        assert ex.fused_norm == ("n/a" if norm == "bn" else "triton")
        assert any("fp16 with a grad scaler" in n for n in ex.notes) == scaler
    ex = plan(TrainConfig.resolve(amp=False, device="cuda"), dev)
    assert (ex.precision, ex.grad_scaler) == ("fp32", False)


def test_print_config_on_a_mocked_t4_shows_fp16_and_the_scaler(monkeypatch, capsys, mock_gpu):
    from fastcifar import train
    mock_gpu((7, 5))
    train.main(["--norm", "gn", "--amp", "--print-config", "cuda"])
    out = json.loads(capsys.readouterr().out)
    ex = out["resolved_execution"]
    assert (ex["precision"], ex["grad_scaler"], ex["device_name"]) == ("fp16", True, "Tesla T4")
    assert out["device"]["capability"] == [7, 5] and out["device"]["present"] is True


def test_cpu_amp_needs_native_bf16():
    cfg = TrainConfig.resolve(amp=True, device="cpu")
    ex = plan(cfg, DeviceInfo("cpu", "cpu (test)", native_bf16=False))
    assert ex.precision == "fp32" and "no native bf16" in ex.notes[0]
    assert plan(cfg, DeviceInfo("cpu", "cpu (test)", native_bf16=True)).precision == "bf16"


def test_compile_and_cuda_graphs_per_device():
    cpu, gpu = DeviceInfo("cpu", "cpu"), DeviceInfo("cuda", "gpu", (8, 0), True)
    p = lambda dev, **kw: plan(TrainConfig.resolve(device=dev.type, **kw), dev)  # noqa: E731
    assert (p(cpu).compile, p(gpu).compile, p(cpu, compile="on").compile, p(gpu, compile="off").compile) == \
        (False, True, True, False)
    assert p(gpu, cuda_graphs=True).compile_mode == "reduce-overhead" and p(gpu).compile_mode is None
    with pytest.raises(ConfigError, match="--cuda-graphs: CUDA graphs need a CUDA device"):
        p(cpu, cuda_graphs=True)


def test_a_kernel_refusal_under_auto_falls_back_with_one_warning(monkeypatch):
    """bf16 on an sm75 GPU: the kernel refuses (RuntimeError). auto trains on with the torch GroupNorm and says
    why once; on fails in one line naming only --fused-norm on, the flag the user gave."""
    import fastcifar_kernels

    def refuse(device, dtype, channels_last=True, strict=False):
        raise RuntimeError("bfloat16 needs a GPU of compute capability 8.0 or newer for the fused kernel\nmore")
    monkeypatch.setattr(fastcifar_kernels, "verify_kernel", refuse)
    with pytest.warns(RuntimeWarning, match="fused GroupNorm\\+ReLU not used") as w:
        assert check_fused("auto", torch.device("cuda"), torch.bfloat16) == \
            (False, "bfloat16 needs a GPU of compute capability 8.0 or newer for the fused kernel")
    assert len(w) == 1
    with pytest.raises(ConfigError) as e:
        check_fused("on", torch.device("cuda"), torch.bfloat16)
    msg = str(e.value)
    assert msg.startswith("--fused-norm on: bfloat16 needs") and "\n" not in msg
    assert [f for f in msg.split() if f.startswith("--")] == ["--fused-norm"]
    # a failed self-check (False) falls back the same way under auto
    monkeypatch.setattr(fastcifar_kernels, "verify_kernel", lambda *a, **k: False)
    monkeypatch.setattr(fastcifar_kernels, "kernel_status", lambda: {"cuda/float16/channels_last": "mismatch: x"})
    with pytest.warns(RuntimeWarning):
        assert check_fused("auto", torch.device("cuda"), torch.float16) == (False, "mismatch: x")


def test_the_grad_scaler_step_makes_no_host_sync():
    """GradScaler.step reads found_inf with .item() (a host sync every step) unless the optimizer takes the
    scale itself; the fp16 path builds a fused SGD, which does."""
    torch.manual_seed(0)
    model = make_model("bn", "lean")
    opt = make_optimizer(model, TrainConfig.resolve(optimizer="sgd"), fused=True)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    real, calls = torch.Tensor.item, []

    def counting(self):
        calls.append(1)
        return real(self)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        torch.Tensor.item = counting
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.Tensor.item = real
        opt.zero_grad()
    assert calls == []
    # the unfused optimizer would sync: the check above can fail
    opt = make_optimizer(model, TrainConfig.resolve(optimizer="sgd"))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    torch.Tensor.item = counting
    try:
        scaler.step(opt)
    finally:
        torch.Tensor.item = real
    assert calls


def test_describe_device_never_needs_the_device():
    r = subprocess.run([sys.executable, "-c", "import torch; from fastcifar.execution import describe_device; "
                        "d = describe_device('cuda'); print(d.present, torch.cuda.is_initialized())"],
                       capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
