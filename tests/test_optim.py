"""fastcifar/optim.py: Muon on the conv filters against a float64 reference, and under a grad scaler."""
import pytest
import torch

from fastcifar.config import TrainConfig
from fastcifar.models import make_model
from fastcifar.optim import FilterMuon, NS_COEFFS, buckets, make_optimizer, orthogonalize


def reference_orthogonalize(g, steps, eps=1e-7):
    a, b, c = NS_COEFFS
    x = g.double() / (g.double().norm() + eps)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def reference_step(params, grads, bufs, groups_of, lr, ns_steps, momentum=0.9, normalize=False):
    """One step of the recipe in float64, a parameter at a time; a Muon bank's weight decay is decoupled."""
    for i, (p, g) in enumerate(zip(params, grads)):
        wd, muon, glr = groups_of[i]
        g = g.double() + (0.0 if muon else wd) * p
        if muon:
            p = p * (p.shape[0] ** 0.5 / p.norm() if normalize else 1.0) * (1 - glr * wd)
        bufs[i] = momentum * bufs[i] + g
        u = g + momentum * bufs[i]
        if muon:
            m = u.flatten(1)
            u = reference_orthogonalize(m, ns_steps).reshape(p.shape) * max(1.0, m.shape[0] / m.shape[1]) ** 0.5
        params[i] = p - glr * u


def test_batched_orthogonalization_matches_one_matrix_at_a_time_in_float64():
    torch.manual_seed(0)
    mats = [torch.randn(32, 24 * 9), torch.randn(46, 32 * 9), torch.randn(104, 9), torch.randn(36, 24),
            torch.randn(136, 104), torch.randn(7, 7)]
    got = orthogonalize(mats, steps=5)
    for m, o in zip(mats, got):
        ref = reference_orthogonalize(m, 5)
        assert o.shape == m.shape and torch.allclose(o.double(), ref, atol=2e-5), (m.shape, (o - ref).abs().max())
        s = torch.linalg.svdvals(o)
        assert s.max() < 1.3 and s.min() > 0.5  # Newton-Schulz pushes every singular value towards 1


def test_buckets_share_a_padded_batch_only_within_the_slack():
    shapes = [(32, 216), (46, 414), (9, 104), (9, 24)]
    groups = buckets(shapes)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    assert any(set(g) == {0, 1} for g in groups)  # similar banks share one batch
    assert not any({1, 3} <= set(g) for g in groups)  # a 9x24 matrix is not padded to 46x414


@pytest.mark.parametrize("muon_wd,normalize,ns_steps", [(0.0, False, 5), (0.05, True, 3)])
def test_muon_steps_match_the_float64_reference(muon_wd, normalize, ns_steps):
    torch.manual_seed(0)
    model = make_model("bn", "lean")
    cfg = TrainConfig.resolve(optimizer="muon", muon_lr=0.2, lr=0.4, muon_ns_steps=ns_steps)
    opt = make_optimizer(model, cfg)
    opt.param_groups[0].update(weight_decay=muon_wd, normalize=normalize)  # the options research screens set
    assert isinstance(opt, FilterMuon)
    groups_of, params = [], []
    for g in opt.param_groups:
        for p in g["params"]:
            params.append(p)
            groups_of.append((g["weight_decay"], g["muon"], g["lr"]))
    assert {p.ndim for p, (_, muon, _) in zip(params, groups_of) if muon} == {4}
    assert sum(p.numel() for p in params) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any(wd > 0 for wd, muon, _ in groups_of if not muon)  # the head keeps its weight decay
    ref = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        reference_step(ref, [p.grad for p in params], bufs, groups_of, None, ns_steps, normalize=normalize)
        opt.step()
        opt.zero_grad()
        for p, r in zip(params, ref):
            assert torch.allclose(p.double(), r, atol=1e-5), (p.shape, (p.double() - r).abs().max())
        ref = [p.detach().double().clone() for p in params]  # the next gradient is taken at the real weights


def test_sgd_is_the_default_and_muon_needs_its_lr():
    model = make_model("bn", "lean")
    assert isinstance(make_optimizer(model, TrainConfig.resolve(optimizer="sgd")), torch.optim.SGD)
    from fastcifar.device import ConfigError
    with pytest.raises(ConfigError, match="--muon-lr"):
        TrainConfig.resolve(optimizer="muon", preset="best")
    with pytest.raises(ConfigError, match="--optimizer must be one of"):
        TrainConfig.resolve(optimizer="adam")


def scaled_step(model, opt, scaler, x, y, poison=False):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if poison:
        next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    real, calls = torch.Tensor.item, []

    def counting(self):
        calls.append(1)
        return real(self)
    torch.Tensor.item = counting
    try:
        scaler.step(opt)
    finally:
        torch.Tensor.item = real
    scaler.update()
    opt.zero_grad()
    return calls


def test_under_a_grad_scaler_muon_unscales_skips_inf_steps_and_never_syncs():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cfg = TrainConfig.resolve(optimizer="muon", muon_lr=0.2)
    a, b = make_model("bn", "lean"), make_model("bn", "lean")
    b.load_state_dict(a.state_dict())
    oa, ob = make_optimizer(a, cfg, fused=True), make_optimizer(b, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert scaled_step(a, oa, scaler, x, y) == []  # no host sync in the step
    torch.nn.functional.cross_entropy(b(x), y).backward()
    ob.step()
    ob.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)  # the same step as without the scaler
    before = {k: v.clone() for k, v in a.state_dict().items()}
    bufs = [oa.state[p]["momentum_buffer"].clone() for g in oa.param_groups for p in g["params"]]
    assert scaled_step(a, oa, scaler, x, y, poison=True) == []
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items()
               if "running" not in k and "num_batches" not in k)  # BN statistics do move in the forward pass
    assert all(torch.equal(u, oa.state[p]["momentum_buffer"]) for u, p in
               zip(bufs, (p for g in oa.param_groups for p in g["params"])))
    assert scaler.get_scale() == 512.0  # the scaler saw the inf and backed off


def test_a_run_saved_before_the_recipe_named_its_optimizer_resumes_with_sgd():
    saved = TrainConfig.resolve(norm="bn").to_dict()
    saved.pop("optimizer"), saved.pop("muon_lr")
    cfg = TrainConfig.resolve(resumed=saved)
    assert (cfg.optimizer, cfg.muon_lr, cfg.sources["optimizer"]) == ("sgd", None, "resumed run")
    muon = TrainConfig.resolve(resumed=TrainConfig.resolve(optimizer="muon", muon_lr=0.3).to_dict())
    assert (muon.optimizer, muon.muon_lr) == ("muon", 0.3)


def test_an_optimizer_state_saved_before_the_normalize_option_loads_and_steps():
    model = make_model("bn", "lean")
    opt = make_optimizer(model, TrainConfig.resolve(optimizer="muon", muon_lr=0.2))
    saved = opt.state_dict()
    for g in saved["param_groups"]:
        del g["normalize"]
    fresh = make_optimizer(model, TrainConfig.resolve(optimizer="muon", muon_lr=0.2))
    fresh.load_state_dict(saved)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    fresh.step()
    assert all(g["normalize"] is False for g in fresh.param_groups)


def test_a_muon_run_saved_before_it_named_its_newton_schulz_steps_resumes_with_5():
    saved = TrainConfig.resolve(optimizer="muon", muon_lr=0.3).to_dict()
    saved.pop("muon_ns_steps")
    assert TrainConfig.resolve(resumed=saved).muon_ns_steps == 5
    saved["muon_ns_steps"] = 3
    assert TrainConfig.resolve(resumed=saved).muon_ns_steps == 3


def test_muon_lr_goes_with_muon():
    from fastcifar.device import ConfigError
    with pytest.raises(ConfigError, match="only with --optimizer muon"):
        TrainConfig.resolve(optimizer="sgd", muon_lr=0.2)
    cfg = TrainConfig.resolve(optimizer="muon", muon_lr=0.2).replace(optimizer="sgd", muon_lr=None)
    assert (cfg.optimizer, cfg.muon_lr) == ("sgd", None)
    with pytest.raises(ConfigError, match="--muon-ns-steps must be"):
        TrainConfig.resolve(optimizer="muon", muon_lr=0.2, muon_ns_steps=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_fp16_muon_matches_the_cpu_and_skips_inf_steps_without_a_sync():
    torch.manual_seed(0)
    cpu = make_model("bn", "lean")
    gpu = make_model("bn", "lean").cuda()
    gpu.load_state_dict(cpu.state_dict())
    cfg = TrainConfig.resolve(optimizer="muon", muon_lr=0.2)
    oc, og = make_optimizer(cpu, cfg), make_optimizer(gpu, cfg, fused=True)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(cpu(x), y).backward()
    oc.step()
    scaler = torch.amp.GradScaler("cuda", init_scale=256.0)
    assert scaled_step(gpu, og, scaler, x.cuda(), y.cuda()) == []
    for pc, pg in zip(cpu.parameters(), gpu.parameters()):
        assert torch.allclose(pc, pg.cpu(), atol=1e-3)  # TF32 and cuDNN: agreement to float noise
    before = [p.detach().clone() for p in gpu.parameters()]
    assert scaled_step(gpu, og, scaler, x.cuda(), y.cuda(), poison=True) == []
    assert all(torch.equal(b, p) for b, p in zip(before, gpu.parameters()))
