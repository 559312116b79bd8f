# Record: the scratch wrapper that ran the runs in this folder (see results.md for the commands).
# Kept as it ran; not part of the package or the tests.
"""Scratch screen: run the trainer with an optional scratch layout, evaluate only after the last epoch,
track weight EMAs, then score the final weights with extra test-time views."""
import sys, json, os, copy, argparse
import torch, torch.nn.functional as F
from torch import nn
import fastcifar.train as T
import fastcifar.models as M
from fastcifar.evaluate import shifted, evaluate

ap = argparse.ArgumentParser()
ap.add_argument("--layout", default="deep")
ap.add_argument("--emas", default="0.99,0.998")
ap.add_argument("--every-epoch", action="store_true")
a, rest = ap.parse_known_args()

def conv_for(norm, cin, cout, k=3, groups=1):
    Conv = nn.Conv2d if norm == "bn" else M.StandardizedConv2d
    return Conv(cin, cout, k, padding=k // 2, groups=groups, bias=False)

class DSNet(nn.Module):
    """stride-1 whitening stem, then depthwise 3x3 / pointwise 1x1 pairs; pool before the norm."""
    def __init__(self, norm, spec, fused=False):
        super().__init__()
        self.stem = M.PatchWhitening(stride=1)
        c = self.stem.out_channels
        layers = []
        for kind, w, pool in spec:
            if kind == "dw":
                layers += [conv_for(norm, c, c, 3, groups=c)]; w = c
            elif kind == "pw":
                layers += [conv_for(norm, c, w, 1)]
            else:
                layers += [conv_for(norm, c, w, 3)]
            layers += [*([nn.MaxPool2d(2)] if pool else []), M.norm_relu(norm, w, fused)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, 10)
    def forward(self, x):
        return self.head(self.features(self.stem(x)))

SPECS = {
  "tv": [("dw", 0, False), ("pw", 32, False), ("dw", 0, True), ("pw", 48, False),
         ("dw", 0, False), ("pw", 64, False), ("dw", 0, True), ("pw", 64, False),
         ("dw", 0, False), ("pw", 96, False), ("dw", 0, True), ("pw", 96, False),
         ("dw", 0, False), ("pw", 128, False)],
  # 32: dw pw dw(pool) | 16: pw dw pw dw(pool) | 8: pw dw pw dw(pool) | 4: pw
  "ds": [("c", 32, False), ("dw", 0, False), ("pw", 48, False), ("dw", 0, True),
         ("pw", 64, False), ("dw", 0, False), ("pw", 80, False), ("dw", 0, True),
         ("pw", 112, False), ("dw", 0, False), ("pw", 112, False), ("dw", 0, True),
         ("pw", 128, False), ("dw", 0, False)],
}
if a.layout in SPECS:
    spec = SPECS[a.layout]
    T.make_model = lambda norm="bn", arch=None, fused=False: DSNet(norm, spec, fused).to(memory_format=torch.channels_last)
elif "=" in a.layout:
    name, lit = a.layout.split("=", 1)
    M.ARCHS[name] = eval(lit)  # a literal ARCHS tuple
    a.layout = name

# evaluate only after the last epoch
args0 = T.parse_args(rest)
n_eval = [0]
real_eval = T.evaluate
def lazy_eval(net, loader, autocast, tta):
    n_eval[0] += 1
    if a.every_epoch or n_eval[0] >= args0.epochs:
        return real_eval(net, loader, autocast, tta=tta)
    return float("nan"), 0.0, None
T.evaluate = lazy_eval

# weight EMAs, updated after every optimizer step
decays = [float(d) for d in a.emas.split(",") if d]
emas, holder = {}, {}
real_make_opt = T.make_optimizer
def make_opt(model, lr, wd):
    opt = real_make_opt(model, lr, wd)
    holder["model"] = model
    sd = model.state_dict()
    for d in decays:
        emas[d] = {k: v.detach().clone().float() for k, v in sd.items() if v.is_floating_point()}
    cnt = [0]
    def hook(o, args_, kwargs_):
        cnt[0] += 1
        cur = [v.detach().float() for k2, v in sd.items() if v.is_floating_point()]
        for d in decays:
            dd = min(d, (1 + cnt[0]) / (10 + cnt[0]))
            torch._foreach_lerp_(list(emas[d].values()), cur, 1 - dd)
    opt.register_step_post_hook(hook)
    return opt
T.make_optimizer = make_opt
m = T.train(args0)
out = {"layout": a.layout, "argv": rest, "final": m["final_test_acc"], "params": m["params"],
       "train_time_s": m["history"][-1]["train_time_s"], "train_acc": m["history"][-1]["train_acc"]}
model = holder["model"]
# extra views on the final weights
loader = T.LOADERS["resident"](f"{T.prepare_betons(T.resolve_source(args0.data), args0.beton_dir)[0]}/test.beton", 1000, torch.device("cpu"), train=False)
ac = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(m["amp"]))
def views6(net, x):
    mir = x.flip(3)
    l = net(x) + net(mir)
    return l + 0.5 * (net(shifted(x, -1)) + net(shifted(x, 1)) + net(shifted(mir, 1)) + net(shifted(mir, -1)))
@torch.no_grad()
def score(net, fn):
    net.eval(); c = 0
    for x, y in loader:
        with ac():
            c += (fn(net, x).argmax(1) == y).sum().item()
    return c / len(loader.labels)
from fastcifar.evaluate import tta_logits
for t in ("flip-shift",):
    out[f"tta_{t}"] = score(model, lambda n, x: tta_logits(n, x, t))
out["tta_6"] = score(model, views6)
sd0 = copy.deepcopy(model.state_dict())
for d in decays:
    sd = {k: (emas[d][k].to(v.dtype) if k in emas[d] else v) for k, v in sd0.items()}
    model.load_state_dict(sd)
    out[f"ema{d}"] = score(model, lambda n, x: tta_logits(n, x, "flip-shift"))
model.load_state_dict(sd0)
print("SCREEN", json.dumps(out))
with open(os.path.join(args0.out, "screen.json"), "w") as f:
    json.dump(out, f, indent=1)
