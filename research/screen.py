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
    p.add_argument("--eval-epochs", default="", help="comma-separated epochs to score (the last always is)")
    a = p.parse_args(ours)
    cfg, saved = resolved(train_argv)
    muon_options = a.muon_wd or a.muon_normalize
    r = fit(cfg, checkpoint=saved, model_factory=layout_factory(a.layout, a.stem_stride) if a.layout else None,
            optimizer_factory=muon_options_factory(a.muon_wd, a.muon_normalize) if muon_options else None,
            eval_epochs=[int(e) for e in a.eval_epochs.split(",") if e])
    m = r.metrics
    out = {"layout": a.layout or cfg.arch, "stem_stride": a.stem_stride, "optimizer": cfg.optimizer,
           "muon_lr": cfg.muon_lr, "muon_ns_steps": cfg.muon_ns_steps, "muon_wd": a.muon_wd,
           "muon_normalize": a.muon_normalize, "train_argv": train_argv, "final_test_acc": m["final_test_acc"],
           "params": m["params"], "train_time_s": m["history"][-1]["train_time_s"],
           "train_acc": m["history"][-1]["train_acc"], "scored": [(h["epoch"], h["test_acc"]) for h in m["history"]]}
    print("SCREEN", json.dumps(out), flush=True)
    atomic_write_json(os.path.join(r.out, "screen.json"), out)


if __name__ == "__main__":
    main()
