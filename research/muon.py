"""Muon for conv filters, Nesterov SGD for the rest: an optimizer factory for `fastcifar.fit`.

Muon replaces a filter bank's momentum update with its nearest semi-orthogonal matrix (Newton-Schulz iterations on
the (out, in*k*k) view), so every direction of the update moves at the same rate. torch.optim.Muon takes 2-D
parameters only; conv filters are 4-D, and a depthwise bank is a (C, 9) matrix, hence this version. Biases, norm
affines, the head and the frozen stem keep the project's SGD.

    python -m research.screen --optimizer muon --muon-lr 0.5 -- --norm bn --amp --seed 0 --data PATH ...
"""
import torch

from fastcifar.loop import make_optimizer


def orthogonalize(g, steps=5, eps=1e-7):
    """The nearest semi-orthogonal matrix to g (2-D), by the quintic Newton-Schulz iteration (coefficients as in
    the Muon reference), in fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float() / (g.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class ConvMuon(torch.optim.Optimizer):
    """Groups with muon=True get orthogonalized Nesterov momentum, scaled by sqrt(max(1, rows / cols)); the
    others plain Nesterov SGD with weight decay. One optimizer, so the trainer's schedule and checkpoints see one."""

    def __init__(self, groups, lr, momentum=0.9):
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] and not group["muon"]:
                    g = g.add(p, alpha=group["weight_decay"])
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g)
                g = g.add(buf, alpha=group["momentum"])  # Nesterov
                if group["muon"]:
                    m = g.flatten(1)
                    g = orthogonalize(m).view_as(p).to(p.dtype) * max(1.0, m.shape[0] / m.shape[1]) ** 0.5
                p.add_(g, alpha=-group["lr"])


def muon_factory(muon_lr):
    """optimizer_factory(model, cfg) for fit: Muon at muon_lr on trainable conv filters, the preset's SGD (lr,
    weight decay) on everything else."""
    def factory(model, cfg, fused=False):
        trained = [p for p in model.parameters() if p.requires_grad]
        filters = [p for p in trained if p.ndim == 4]
        rest = make_optimizer(model, cfg).param_groups  # the project's own grouping for what stays on SGD
        groups = [{"params": filters, "muon": True, "lr": muon_lr}]
        for g in rest:
            params = [p for p in g["params"] if p.ndim != 4]
            if params:
                groups.append({"params": params, "weight_decay": g["weight_decay"], "lr": cfg.lr})
        return ConvMuon(groups, lr=cfg.lr)
    return factory
