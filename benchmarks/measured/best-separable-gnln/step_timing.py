# Record: the step timing behind benchmarks/NOTES.md's speed figures for the composite standardization
# (2026-12-01). Run from the repository root: python benchmarks/measured/best-separable-gnln/step_timing.py 2
# The variant "out" is the exact form as the package first had it (scale and mean applied after the conv); "wt"
# folds the scale into the weights; "cat" appends the box sum as an extra pointwise input; "proj" is the form
# the package keeps; "plain" the unstandardized pair. Kept as it ran, except "out" written out here because the
# package no longer has it, and "plain" calling the raw pointwise weight (the package's pointwise half of a gn/ln
# pair now standardizes itself); the variants compute what they computed when the figures were taken.
"""step throughput of separable variants at 2 threads, bf16 autocast, batch 128"""
import time, sys, torch, torch.nn.functional as F
import fastcifar.models as M
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

def fwd_weight_scaled(self, x):
    if not self.standardize:
        return torch.nn.Sequential.forward(self, x)
    pointwise, w, mean, scale = exact_stats(self)
    y = F.conv2d(self[0](x), pointwise * scale.view(-1, 1, 1, 1))
    box = F.conv2d(x.sum(1, keepdim=True), x.new_ones(1, 1, 3, 3), padding=1)
    return y - (mean * scale).view(1, -1, 1, 1).to(y.dtype) * box

def fwd_concat(self, x):
    pointwise, w, mean, scale = exact_stats(self)
    box = F.conv2d(x.sum(1, keepdim=True), x.new_ones(1, 1, 3, 3), padding=1)
    h = torch.cat([self[0](x), box], 1)
    wcat = torch.cat([w * scale[:, None], -(mean * scale)[:, None]], 1)
    return F.conv2d(h, wcat.view(*wcat.shape, 1, 1))

def fwd_plain(self, x):
    return F.conv2d(self[0](x), self[1].weight)

def exact_stats(self):
    """the composite filter's mean and 1/std per output channel, from the raw weights"""
    pointwise = self[1].weight
    d, w = self[0].weight.flatten(1), pointwise.flatten(1)
    mean = (w * d.sum(1)).sum(1) / d.numel()
    var = (w * w * (d * d).sum(1)).sum(1) / d.numel() - mean * mean
    return pointwise, w, mean, torch.rsqrt(var.clamp_min(0) + 1e-5)

def fwd_out(self, x):
    if not self.standardize:
        return torch.nn.Sequential.forward(self, x)
    pointwise, w, mean, scale = exact_stats(self)
    box = F.conv2d(x.sum(1, keepdim=True), x.new_ones(1, 1, 3, 3), padding=1)
    return F.conv2d(self[0](x), pointwise) * scale.view(1, -1, 1, 1) - (mean * scale).view(1, -1, 1, 1) * box

orig = M.SeparableConv2d.forward
def bench(norm, arch, variant):
    M.SeparableConv2d.forward = {"out": fwd_out, "proj": orig, "wt": fwd_weight_scaled, "plain": fwd_plain, "cat": fwd_concat}[variant]
    torch.manual_seed(0)
    m = M.make_model(norm, arch).train()
    x = torch.randn(128, 3, 32, 32).to(memory_format=torch.channels_last); y = torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    ts = []
    for i in range(25):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l = F.cross_entropy(m(x).float(), y)
        l.backward(); opt.step(); opt.zero_grad()
        ts.append(time.perf_counter() - t)
    dt = sorted(ts[5:])[len(ts[5:]) // 2]
    print(f"{arch:10s} {norm} {variant:5s} {128/dt:6.0f} img/s  epoch {50000/(128/dt):5.1f} s  20ep {20*50000/(128/dt)/60:5.1f} min", flush=True)

import os
todo = [tuple(t.split(":")) for t in os.environ["TODO"].split()] if "TODO" in os.environ else None
for norm, arch, variant in todo or [("bn", "separable", "plain"), ("gn", "deep8", "plain"), ("ln", "deep8", "plain"),
                            ("gn", "separable", "out"), ("gn", "separable", "wt"), ("gn", "separable", "plain"),
                            ("ln", "separable", "out"), ("ln", "separable", "wt"), ("ln", "separable", "plain")]:
    bench(norm, arch, variant)
