"""Every preset recipe per device type, beside the measured record behind it: runs, how many reached the
target, the mean and lowest final accuracy, and the optimizer steps to the target.

    python -m benchmarks.recipes [--json OUT.json]

On a GPU, time to the target is mostly optimizer steps x step time (a small network's step is launch-bound), so
steps are the figure to compare recipes by across devices. Steps per epoch: the training images over the batch
size, the last partial batch dropped.
"""
import argparse
import glob
import json
import os
import statistics

from fastcifar.config import DEVICE_TYPES, PRESETS, RECORDS, TrainConfig
from fastcifar.io import atomic_write_json
from fastcifar.models import NORMS

from .common import ROOT, markdown_table
from .throughput import TRAIN_IMAGES


def record_runs(path):
    """The runs of a sweep's results.json, or of a folder of per-run metrics files (repository path)."""
    full = os.path.join(ROOT, path)
    if full.endswith(".json"):
        with open(full) as f:
            return json.load(f)["runs"]
    runs = []
    for name in sorted(glob.glob(os.path.join(full, "*.json"))):
        with open(name) as f:
            m = json.load(f)
        if "final_test_acc" in m and m.get("epochs_run") == m.get("epochs_planned"):
            # a screening run built its model from a layout spec and recorded the preset's default arch
            runs.append({k: v for k, v in m.items() if not ("screen_layout" in m and k == "arch")})
    return runs


def run_arch(r):
    """A recorded run's arch: a metrics file's own, else a sweep run's train_config's; None where unrecorded."""
    return r.get("arch") or (r.get("train_config") or {}).get("arch")


def matching_runs(cfg):
    """The recorded runs of exactly this recipe (norm, preset, batch size, lr, optimizer, epochs, arch where
    recorded); records from before the recipe named its optimizer trained SGD, and Muon's from before it named its
    Newton-Schulz steps ran 5."""
    return [r for r in record_runs(RECORDS[cfg.preset][cfg.norm]) if r["norm"] == cfg.norm
            and r["preset"] == cfg.preset and (r["batch_size"], r["lr"], r["epochs_planned"]) ==
            (cfg.batch_size, cfg.lr, cfg.epochs) and (run_arch(r) or cfg.arch) == cfg.arch
            and (r.get("optimizer") or "sgd", r.get("muon_lr")) == (cfg.optimizer, cfg.muon_lr)
            and (cfg.optimizer != "muon" or r.get("muon_ns_steps", 5) == cfg.muon_ns_steps)]


def summary(cfg):
    runs = matching_runs(cfg)
    accs = [r["final_test_acc"] for r in runs]
    hit = [r["epochs_to_target"] for r in runs if r.get("epochs_to_target")]
    steps = TRAIN_IMAGES // cfg.batch_size
    return {"preset": cfg.preset, "norm": cfg.norm, "arch": cfg.arch, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "optimizer": cfg.optimizer, "muon_lr": cfg.muon_lr, "muon_ns_steps": cfg.muon_ns_steps,
            "epochs": cfg.epochs,
            "record": RECORDS[cfg.preset][cfg.norm], "runs": len(runs),
            "reached": sum(a >= cfg.target_acc for a in accs), "mean_acc": statistics.mean(accs) if accs else None,
            "min_acc": min(accs, default=None), "steps_per_epoch": steps,
            # a preset that stops at the target; the best preset's screens scored only some epochs
            "median_steps_to_target": int(statistics.median(hit) * steps) if hit and cfg.stop_at_target else None}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    rows = [{"device": d, **summary(TrainConfig.resolve(norm=n, preset=pr, device_type=d))}
            for pr in sorted(PRESETS) for n in NORMS for d in DEVICE_TYPES]
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    print(markdown_table(["preset", "norm", "device", "recipe", "record runs", "reached 70%", "mean (min)",
                          "steps to 70% (median)"],
                         [[r["preset"], r["norm"], r["device"],
                           f"{r['arch']}, {r['epochs']} ep, batch {r['batch_size']}, "
                           + (f"Muon {r['muon_lr']} ({r['muon_ns_steps']} NS steps) + SGD {r['lr']}"
                              if r["optimizer"] == "muon" else f"SGD {r['lr']}"),
                           r["runs"],
                           f"{r['reached']} / {r['runs']}", f"{pct(r['mean_acc'])} ({pct(r['min_acc'])})",
                           r["median_steps_to_target"] or "-"] for r in rows]))
    if a.json:
        atomic_write_json(a.json, rows)


if __name__ == "__main__":
    main()
