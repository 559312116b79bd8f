# Record: the wrapper that ran the layout screens in this folder (see results.md for the commands).
# Kept as it ran; not part of the package or the tests. Run from the repository root.
# ../best-separable/screen_layouts.py plus: token e (separable pair, composite filter standardized exactly), token m
# (MobileNet v1 block: depthwise, norm+ReLU, pointwise), and --layout pkg (the package's make_model with --arch).
"""Scratch: layouts with residual convs and head variants, swapped into the trainer; eval after last epoch."""
import sys, json, os, time, argparse
import torch, torch.nn.functional as F
from torch import nn
import fastcifar.train as T
import fastcifar.models as M

def conv_for(norm, cin, cout, k=3, groups=1):
    Conv = nn.Conv2d if norm == "bn" or os.environ.get("NOWS") else M.StandardizedConv2d
    return Conv(cin, cout, k, padding=k // 2, groups=groups, bias=False)

class SepWS(nn.Module):
    """depthwise 3x3 + pointwise 1x1, output equal to a 3x3 conv with the composite filter weight-standardized"""
    def __init__(self, cin, cout):
        super().__init__()
        self.dw = nn.Parameter(nn.Conv2d(cin, cin, 3, groups=cin, bias=False).weight.detach().clone())
        self.pw = nn.Parameter(nn.Conv2d(cin, cout, 1, bias=False).weight.detach().clone())
    def forward(self, x):
        cin = x.shape[1]; d = self.dw.view(cin, 9); w = self.pw.view(-1, cin)
        n = 9 * cin
        mean = (w * d.sum(1)).sum(1) / n                       # (cout,)
        var = (w * w * (d * d).sum(1)).sum(1) / n - mean * mean
        inv = torch.rsqrt(var + 1e-5)
        y = F.conv2d(F.conv2d(x, self.dw, padding=1, groups=cin), (w * inv[:, None]).view(-1, cin, 1, 1))
        box = F.conv2d(x.sum(1, keepdim=True), torch.ones(1, 1, 3, 3, dtype=x.dtype, device=x.device), padding=1)
        return y - (mean * inv).view(1, -1, 1, 1).to(y.dtype) * box

class Res(nn.Module):
    def __init__(self, body): super().__init__(); self.body = body
    def forward(self, x): return x + self.body(x)

class AvgMax(nn.Module):
    def forward(self, x): return torch.cat([x.amax((2, 3)), x.mean((2, 3))], 1)

class Net(nn.Module):
    # spec: "c20p c20 r20 ..." c=conv, r=residual conv (same width), d=dw+pw, suffix p = maxpool before norm
    def __init__(self, norm, spec, head="max", fused=False):
        super().__init__()
        self.stem = M.PatchWhitening(stride=1)
        c = self.stem.out_channels; layers = []
        for tok in spec.split():
            pool = tok.endswith("p"); kind = tok[0]; w = int(tok[1:].rstrip("p"))
            if kind == "r":
                assert w == c and not pool
                layers.append(Res(nn.Sequential(conv_for(norm, c, c), M.norm_relu(norm, c, fused))))
            elif kind == "c":
                layers += [conv_for(norm, c, w), *([nn.MaxPool2d(2)] if pool else []), M.norm_relu(norm, w, fused)]
            elif kind == "d":  # depthwise 3x3 then pointwise, one norm after
                layers += [(conv_for(norm, c, c, 3, groups=c) if os.environ.get('DWSTD') else conv_for('bn', c, c, 3, groups=c)), conv_for(norm, c, w, 1), *([nn.MaxPool2d(2)] if pool else []), M.norm_relu(norm, w, fused)]
            elif kind == "m":  # depthwise, norm+ReLU, pointwise, norm+ReLU (MobileNet v1 block)
                layers += [conv_for('bn', c, c, 3, groups=c), M.norm_relu(norm, c, fused), conv_for(norm, c, w, 1),
                           *([nn.MaxPool2d(2)] if pool else []), M.norm_relu(norm, w, fused)]
            elif kind == "e":
                layers += [SepWS(c, w), *([nn.MaxPool2d(2)] if pool else []), M.norm_relu(norm, w, fused)]
            c = w
        if head == "max":
            layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]; hc = c
        else:
            layers += [AvgMax()]; hc = 2 * c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hc, 10)
    def forward(self, x): return self.head(self.features(self.stem(x)))

SPECS = {
 "deep": "c20p c20 c32p c32 c40p c40",
 "deepR": "c20p r20 c32p r32 c40p r40",
 "w1": "c20p c28 c36p c40 c44p",
 "w2": "c20p c32 c32 c40p c40",
 "r3": "c20p r20 r20 c32p r32 c40p r40",
 "n16": "c16p c24 c32p c36 c40p c40",
 "tv": "d32 d48p d64 d64p d96 d96p d128",
}

def build(norm, name, head, fused=False):
    return Net(norm, SPECS.get(name, name), head, fused).to(memory_format=torch.channels_last)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="deep"); ap.add_argument("--head", default="max")
    ap.add_argument("--tp", action="store_true"); ap.add_argument("--eval-epochs", default="")
    a, rest = ap.parse_known_args()
    if a.tp:
        from torch.utils.flop_counter import FlopCounterMode
        torch.set_num_threads(int(os.environ.get("NT", 2)))
        for name in a.layout.split(","):
            for norm in ["bn", "gn"]:
                m = build(norm, name, a.head).train()
                x = torch.randn(128, 3, 32, 32).to(memory_format=torch.channels_last); y = torch.randint(0, 10, (128,))
                opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                with FlopCounterMode(display=False) as fc:
                    F.cross_entropy(m(x).float(), y).backward()
                for i in range(13):
                    if i == 3: t = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        l = F.cross_entropy(m(x).float(), y)
                    l.backward(); opt.step(); opt.zero_grad()
                dt = (time.perf_counter() - t) / 10
                print(f"{name:6s} {norm} {M.count_params(m):6d} {fc.get_total_flops()/128/1e6:6.1f} MFLOP/img {128/dt:6.0f} img/s  20ep {20*50000/(128/dt)/60:5.1f} min", flush=True)
        sys.exit()
    if a.layout != "pkg":
        T.make_model = lambda norm="bn", arch=None, fused=False: build(norm, a.layout, a.head, fused)
    args0 = T.parse_args(rest)
    ev = {int(e) for e in a.eval_epochs.split(",") if e} | {args0.epochs}
    n = [0]; real = T.evaluate
    def lazy(net, loader, autocast, tta):
        n[0] += 1
        return real(net, loader, autocast, tta=tta) if n[0] in ev else (float("nan"), 0.0, None)
    T.evaluate = lazy
    m = T.train(args0)
    out = {"layout": a.layout, "spec": SPECS.get(a.layout, a.layout), "head": a.head, "argv": rest,
           "final": m["final_test_acc"], "params": m["params"], "train_time_s": m["history"][-1]["train_time_s"],
           "train_acc": m["history"][-1]["train_acc"], "hist": [(h["epoch"], h.get("test_acc")) for h in m["history"]]}
    print("SCREEN", json.dumps(out), flush=True)
    with open(os.path.join(args0.out, "screen.json"), "w") as f: json.dump(out, f, indent=1)
