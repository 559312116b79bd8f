"""The optimizers a recipe can name (`TrainConfig.optimizer`): Nesterov SGD, or Muon on the conv filters.

Muon replaces a filter bank's Nesterov momentum with its nearest semi-orthogonal matrix (Newton-Schulz iterations
on the (out, in*k*k) view), so every direction of the update moves at the same rate. `torch.optim.Muon` takes 2-D
parameters only and leaves the rest to a second optimizer; here one optimizer holds both kinds, so the schedule,
checkpoints and the grad scaler see one. Biases, norm affines, the head and the frozen stem keep Nesterov SGD.
"""
import functools
import math

import torch

OPTIMIZERS = ("sgd", "muon")
MOMENTUM = 0.9
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz of the Muon reference (Keller Jordan)


def param_groups(model, weight_decay):
    """Trained parameters (the whitening stem's filters stay frozen): weight decay on filters and the head,
    none on norm affines and biases, where it only fights the normalization."""
    trained = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trained if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]


def make_optimizer(model, cfg, fused=False):
    """The recipe's optimizer. fused=True (the fp16 grad-scaler path) lets the scaler skip its per-step host sync
    on inf checks: fused SGD, or Muon, which takes the scaler's tensors itself."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "muon":
        filters = [p for p in groups[0]["params"] if p.ndim == 4]
        rest = [{**g, "params": [p for p in g["params"] if p.ndim != 4]} for g in groups]
        return FilterMuon([{"params": filters, "muon": True, "lr": cfg.muon_lr, "weight_decay": 0.0}]
                          + [g for g in rest if g["params"]], lr=cfg.lr, ns_steps=cfg.muon_ns_steps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=MOMENTUM, nesterov=True, **({"fused": True} if fused else {}))


# ---------------------------------------------------------------- Newton-Schulz

def ns_cost(shape):
    r, c = sorted(shape)
    return r * r * (2 * c + r)  # X X^T, S S, (.) X on the wide orientation


def buckets(shapes, slack=2.0):
    """Index groups whose matrices share one zero-padded batch at most `slack` times their own cost."""
    return _buckets(tuple(tuple(s) for s in shapes), slack)


@functools.lru_cache(maxsize=64)  # a run asks for the same plan every step
def _buckets(shapes, slack):
    groups = []
    for i in sorted(range(len(shapes)), key=lambda i: -ns_cost(shapes[i])):
        for g in groups:
            members = g + [i]
            padded = tuple(max(sorted(shapes[j])[k] for j in members) for k in (0, 1))
            if len(members) * ns_cost(padded) <= slack * sum(ns_cost(shapes[j]) for j in members):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def orthogonalize(mats, steps=3, eps=1e-7):
    """The nearest semi-orthogonal matrix to each 2-D matrix in `mats`, in fp32. Matrices are turned wide and
    zero-padded into a few batches: the iteration keeps zero rows and columns zero, so padding changes nothing
    but the number of kernel launches."""
    a, b, c = NS_COEFFS
    out = [None] * len(mats)
    for idx in buckets([m.shape for m in mats]):
        wide = [mats[i].T if mats[i].shape[0] > mats[i].shape[1] else mats[i] for i in idx]
        rows, cols = max(w.shape[0] for w in wide), max(w.shape[1] for w in wide)
        x = mats[idx[0]].new_zeros(len(idx), rows, cols, dtype=torch.float32)
        for k, w in enumerate(wide):
            x[k, :w.shape[0], :w.shape[1]] = w
        x /= x.norm(dim=(1, 2), keepdim=True) + eps
        for _ in range(steps):  # x <- a x + (b s + c s^2) x, s = x x^T, in two fused multiply-adds
            s = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(s, s, s, beta=b, alpha=c), x, beta=a)
        for k, i, w in zip(range(len(idx)), idx, wide):
            o = x[k, :w.shape[0], :w.shape[1]]
            out[i] = o.T if mats[i].shape[0] > mats[i].shape[1] else o
    return out


# ---------------------------------------------------------------- the optimizer

class FilterMuon(torch.optim.Optimizer):
    """Groups with muon=True: Nesterov momentum, orthogonalized per filter bank and scaled by
    sqrt(max(1, rows / cols)); their weight decay, if any, is decoupled (p *= 1 - lr * wd), since the
    orthogonalization would discard its size, and normalize=True rescales each bank to norm sqrt(rows) before
    the step (airbench94_muon's fixed weight norm: behind a norm layer the scale is free, and pinning it keeps the
    effective step on the schedule). Other groups: Nesterov SGD with their (coupled) weight decay.

    Under a GradScaler it unscales and skips inf steps itself from the scaler's `grad_scale` and `found_inf`
    tensors, so fp16 training needs no host sync per step (`_step_supports_amp_scaling`)."""
    _step_supports_amp_scaling = True

    def __init__(self, groups, lr, momentum=MOMENTUM, ns_steps=3):
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=0.0, muon=False, ns_steps=ns_steps,
                                      normalize=False))

    def __setstate__(self, state):  # a checkpoint saved before a group option existed loads with its default
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("normalize", False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        keep = None if found_inf is None else 1.0 - found_inf.float()  # 0 skips the step, without a host sync
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if scale is not None:
                grads = torch._foreach_div(grads, scale)
            if keep is not None:  # an inf or nan gradient must not reach the buffers, even times zero
                grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
            if group["weight_decay"] and not group["muon"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            m = group["momentum"]
            if keep is None:
                torch._foreach_mul_(bufs, m)
            else:
                torch._foreach_mul_(grads, keep)
                torch._foreach_mul_(bufs, 1.0 + keep * (m - 1.0))  # m, or 1 on a skipped step
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=m)  # Nesterov
            if group["muon"]:
                flat = [u.flatten(1) for u in updates]
                orth = orthogonalize(flat, group["ns_steps"])
                updates = [o.reshape(p.shape).to(p.dtype) for o, p in zip(orth, params)]
                torch._foreach_mul_(updates, [math.sqrt(max(1.0, f.shape[0] / f.shape[1])) for f in flat])
            if keep is not None:
                torch._foreach_mul_(updates, keep)
            if group["muon"] and group["normalize"]:
                torch._foreach_mul_(params, [math.sqrt(p.shape[0]) / n for p, n in
                                             zip(params, torch._foreach_norm(params))])
            if group["muon"] and group["weight_decay"]:
                decay = group["lr"] * group["weight_decay"]
                torch._foreach_mul_(params, 1.0 - decay if keep is None else 1.0 - decay * keep)
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss
