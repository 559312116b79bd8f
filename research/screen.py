"""Screen a layout or recipe on the real data through `fastcifar.fit`, scoring only some epochs.

    python -m research.screen --layout "d36p d48 d64 d72p d104 d104p d136" --eval-epochs 8,14 -- \
        --norm gn --amp --preset best --seed 0 --threads 1 --data PATH --quiet --no-plots --out runs/screen

--layout takes a name in fastcifar.models.ARCHS or a spec (fastcifar.models.Layout.parse); everything after
`--` is the trainer's own flags, so a screen is a training run with two extension points set: the model factory
and the epochs to score (skipping the test pass of the others saves a fifth of a CPU run). It prints one SCREEN
line of JSON and writes OUT/screen.json beside the run's metrics.json.
"""
import argparse
import json
import os
import sys

from torch import nn

from fastcifar.io import atomic_write_json
from fastcifar.loop import fit
from fastcifar.models import ARCHS, Layout, make_model
from fastcifar.optim import make_optimizer
from fastcifar.train import resolved


def layout_factory(layout, stem_stride=1):
    """A model factory for fit(): the named arch, or a parsed spec on a stem of that stride, built with the
    run's norm."""
    arch = layout if layout in ARCHS else Layout.parse(layout, stem_stride)
    return lambda cfg, fused: make_model(cfg.norm, arch, fused=fused)


ACTIVATIONS = {"relu": None, "gelu": nn.GELU, "silu": nn.SiLU}


class MixPool(nn.Module):
    """The mean of max and average pooling (TinyVision's head): max keeps the strongest response, average the
    spread of it."""

    def __init__(self, size):
        super().__init__()
        self.max, self.avg = (nn.AdaptiveMaxPool2d(1), nn.AdaptiveAvgPool2d(1)) if size is None else \
            (nn.MaxPool2d(size), nn.AvgPool2d(size))

    def forward(self, x):
        return 0.5 * (self.max(x) + self.avg(x))


def block_options(factory, act="relu", mix_pool="none"):
    """A model factory that builds with `factory`, then swaps the blocks' ReLUs (the whitening stem keeps its own:
    its paired +-filters rely on ReLU) for `act`, and max pools for MixPool: "global" the head's, "all" the 2x2
    ones too."""
    def build(cfg, fused):
        model = factory(cfg, fused)
        for parent in list(model.features.modules()):  # a snapshot: MixPool holds max pools of its own
            for name, child in list(parent.named_children()):
                if ACTIVATIONS[act] and isinstance(child, nn.ReLU):
                    setattr(parent, name, ACTIVATIONS[act]())
                elif mix_pool != "none" and isinstance(child, nn.AdaptiveMaxPool2d):
                    setattr(parent, name, MixPool(None))
                elif mix_pool == "all" and isinstance(child, nn.MaxPool2d):
                    setattr(parent, name, MixPool(child.kernel_size))
                elif ACTIVATIONS[act] and type(child).__name__ == "GroupNormReLU":
                    raise ValueError(f"--act {act} needs the unfused norm (--no-fused-norm): the fused kernel is ReLU's")
        return model
    return build


def muon_options_factory(weight_decay=0.0, normalize=False):
    """An optimizer factory for fit(): the recipe's optimizer, with FilterMuon's own options on its Muon groups."""
    def factory(model, cfg, **kw):
        if cfg.optimizer != "muon":
            raise ValueError("--muon-wd and --muon-normalize need --optimizer muon")
        opt = make_optimizer(model, cfg, **kw)
        for g in opt.param_groups:
            if g["muon"]:
                g.update(weight_decay=weight_decay, normalize=normalize)
        return opt
    return factory


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m research.screen", description=__doc__.split("\n")[0])
    p.add_argument("--layout", help="arch name or layout spec (default: the preset's arch)")
    p.add_argument("--stem-stride", type=int, choices=(1, 2), default=1,
                   help="a spec's whitening-stem stride: 1 keeps 32x32 (deep, separable), 2 halves it (lean)")
    p.add_argument("--muon-wd", type=float, default=0.0,
                   help="decoupled weight decay on the Muon filter banks (the recipe has none)")
    p.add_argument("--muon-normalize", action="store_true",
                   help="rescale each Muon filter bank to norm sqrt(out channels) before every step")
    p.add_argument("--act", choices=tuple(ACTIVATIONS), default="relu", help="the blocks' activation")
    p.add_argument("--mix-pool", choices=("none", "global", "all"), default="none",
                   help="mean of max and average pooling: the head's (global) or every pool (all)")
    p.add_argument("--eval-epochs", default="", help="comma-separated epochs to score (the last always is)")
    a = p.parse_args(ours)
    cfg, saved = resolved(train_argv)
    muon_options = a.muon_wd or a.muon_normalize
    factory = layout_factory(a.layout or cfg.arch, a.stem_stride)
    if a.act != "relu" or a.mix_pool != "none":
        factory = block_options(factory, a.act, a.mix_pool)
    r = fit(cfg, checkpoint=saved, model_factory=factory,
            optimizer_factory=muon_options_factory(a.muon_wd, a.muon_normalize) if muon_options else None,
            eval_epochs=[int(e) for e in a.eval_epochs.split(",") if e])
    m = r.metrics
    layout = a.layout or cfg.arch
    out = {"layout": layout, "stem_stride": ARCHS[layout].stem_stride if layout in ARCHS else a.stem_stride,
           "optimizer": cfg.optimizer,
           "muon_lr": cfg.muon_lr, "muon_ns_steps": cfg.muon_ns_steps, "muon_wd": a.muon_wd,
           "muon_normalize": a.muon_normalize, "act": a.act, "mix_pool": a.mix_pool, "train_argv": train_argv,
           "final_test_acc": m["final_test_acc"],
           "params": m["params"], "train_time_s": m["history"][-1]["train_time_s"],
           "train_acc": m["history"][-1]["train_acc"], "scored": [(h["epoch"], h["test_acc"]) for h in m["history"]]}
    print("SCREEN", json.dumps(out), flush=True)
    atomic_write_json(os.path.join(r.out, "screen.json"), out)


if __name__ == "__main__":
    main()
