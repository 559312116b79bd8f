"""Train a <=50K-parameter CIFAR-10 network with BatchNorm, GroupNorm or LayerNorm.

    python -m fastcifar.train --norm bn --amp [--data PATH] [--out runs/bn]

A thin parser over `fastcifar.fit`: every flag is a `TrainConfig` field, and only the flags given on the command
line are passed on, so the preset, a config file and a resumed run fill in the rest (fastcifar/config.py).
"""
import argparse
import json
import os
import sys
import time

from .checkpoint import CheckpointError
from .config import LOADER_NAMES, PRESETS, TTA_VIEWS, pick_device_type
from .data import DataError
from .device import ConfigError
from .execution import describe_device, plan
from .loop import assign_out, configure, fit
from .models import ARCHS, NORMS
from .optim import OPTIMIZERS

S = argparse.SUPPRESS  # a flag left out is absent from the namespace: the layers below decide its value


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastcifar.train", description=__doc__.split("\n")[1],
                                argument_default=S)
    recipe = p.add_argument_group("recipe (what is learned)")
    recipe.add_argument("--norm", choices=NORMS, help="default: bn")
    recipe.add_argument("--preset", choices=sorted(PRESETS),
                        help="fast (default): the lean network, short schedule, stop at the target; best: 20 "
                             "epochs of a separable network (bn: separable-res, with shortcuts)")
    recipe.add_argument("--arch", choices=sorted(ARCHS), help="network layout (default: the preset's)")
    recipe.add_argument("--epochs", type=int, help="default: the preset's (fast: bn and ln 2, gn 3; best: 20)")
    recipe.add_argument("--batch-size", type=int, help="default: the preset's (128; fast ln: 96)")
    recipe.add_argument("--lr", type=float, help="peak learning rate (default: the preset's, per norm)")
    recipe.add_argument("--optimizer", choices=OPTIMIZERS,
                        help="sgd (Nesterov) or muon (orthogonalized momentum on the conv filters, Nesterov SGD on "
                             "the rest); default: the preset's (fast bn and ln: muon)")
    recipe.add_argument("--muon-lr", type=float, help="Muon's peak learning rate (default: the preset's, per norm)")
    recipe.add_argument("--muon-ns-steps", type=int, help="Newton-Schulz iterations per Muon step (default: 3)")
    recipe.add_argument("--weight-decay", type=float, help="default: 5e-4")
    recipe.add_argument("--label-smoothing", type=float, help="default: 0.1")
    recipe.add_argument("--seed", type=int, help="default: 0")
    recipe.add_argument("--target-acc", type=float, help="test accuracy to reach (default: 0.70)")
    recipe.add_argument("--stop-at-target", action=argparse.BooleanOptionalAction,
                        help="stop once the target is reached (default: the fast preset at its own epoch count)")
    recipe.add_argument("--tta", choices=TTA_VIEWS,
                        help="test-time views (default: flip-shift: the image, its mirror, both moved a pixel)")
    recipe.add_argument("--cutout", type=int, help="cutout square in pixels (default: 0, off)")
    recipe.add_argument("--limit", type=int, help="only N train and N test images, spread over the classes")
    ex = p.add_argument_group("execution (how it runs; never what is learned)")
    ex.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto (CUDA when present)")
    ex.add_argument("--amp", action="store_const", const=True,
                    help="mixed precision: bf16 where the hardware has it, else fp16 + grad scaler on CUDA, "
                         "fp32 on a CPU")
    ex.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"],
                    help="torch.compile (default auto: on with CUDA, off on the CPU; a bare --compile: on)")
    ex.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                    help="capture the training step in CUDA graphs (CUDA only; not with --compile off)")
    ex.add_argument("--fused-norm", choices=["auto", "on", "off"],
                    help="Triton GroupNorm+ReLU for gn/ln (default auto: where it runs and passes its check at "
                         "start, else the torch path; on: the kernel or a one-line error)")
    ex.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    ex.add_argument("--loader", choices=LOADER_NAMES, help="default: resident (the whole split on the device)")
    files = p.add_argument_group("files")
    files.add_argument("--data", help="CIFAR-10 source or a folder of converted betons "
                                      "(default: $FASTCIFAR_DATA, else download the official one)")
    files.add_argument("--beton-dir", help="where converted data is cached (default: ~/.cache/fastcifar)")
    files.add_argument("--out", help="run folder (default: a new runs/<norm>-<preset>-<time>; runs/latest "
                                     "points at the newest)")
    files.add_argument("--overwrite", action="store_const", const=True,
                       help="train into an --out that holds an earlier run")
    files.add_argument("--no-plots", dest="plots", action="store_const", const=False)
    files.add_argument("--quiet", action="store_const", const=True, help="no progress bar")
    run = p.add_argument_group("what to do")
    run.add_argument("--resume", metavar="OUT", help="continue the run in OUT with its own recipe; a larger "
                                                     "--epochs extends it")
    run.add_argument("--config", metavar="FILE", help="settings from a JSON file (--print-config writes one); "
                                                      "flags given here override it")
    run.add_argument("--print-config", nargs="?", const="auto", choices=["auto", "cpu", "cuda"], metavar="DEVICE",
                     help="print the resolved settings for DEVICE (cpu, cuda; default: the one that would be "
                          "picked) as JSON and exit, without training and without needing that device")
    return p


def parse(argv=None):
    """(settings given on the command line, resume, config file, print-config device)."""
    settings = vars(build_parser().parse_args(argv))
    return settings, settings.pop("resume", None), settings.pop("config", None), settings.pop("print_config", None)


def resolved(argv=None, device=None):
    """The (TrainConfig, resumed checkpoint) the command line asks for; device overrides --device."""
    settings, resume, config_file, _ = parse(argv)
    if device is not None:
        settings["device"] = device
    return configure(resume=resume, config_file=config_file, explicit_source="command line", **settings)


def print_config(argv, device):
    cfg, _ = resolved(argv, device if device in ("cpu", "cuda") else None)
    dev = describe_device(device if device in ("cpu", "cuda") else pick_device_type(cfg.device))
    print(json.dumps({"config": cfg.to_dict(), "recipe": cfg.recipe(), "execution": cfg.execution(),
                      "files": cfg.files(), "sources": cfg.sources,
                      "resolved_execution": plan(cfg, dev).to_dict(),
                      "device": {"type": dev.type, "name": dev.name, "capability": dev.capability,
                                 "native_bf16": dev.native_bf16, "present": dev.present}}, indent=2))


def _what_is_kept(out, started, resumed):
    ckpt = os.path.join(out, "model.pt") if out else None
    if ckpt and os.path.isfile(ckpt) and (resumed or os.path.getmtime(ckpt) >= started):
        return f"the last complete epoch's checkpoint in {out} is intact; continue with --resume {out}"
    return "no checkpoint of this run was written yet, and no beton was left that a later run would trust"


def main(argv=None):
    _, resume, _, device = parse(argv)
    started, cfg = time.time(), None
    try:
        if device is not None:
            return print_config(argv, device)
        cfg, saved = resolved(argv)
        cfg = assign_out(cfg)
        result = fit(cfg, checkpoint=saved)
    except (DataError, ConfigError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # disk full, permissions: the cause on one line
        where = f" ({e.filename})" if e.filename else ""
        sys.exit(f"error: {e.strerror or e}{where}; {_what_is_kept(cfg and cfg.out, started, bool(resume))}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {_what_is_kept(cfg and cfg.out, started, bool(resume))}")
    m, cfg = result.metrics, result.config
    t = m["time_to_target_s"]
    print(f"{cfg.norm}: final test acc {100 * m['final_test_acc']:.2f}%, "
          + (f"reached {100 * cfg.target_acc:.0f}% at epoch {m['epochs_to_target']} ({m['steps_to_target']} steps) "
             f"after {t:.1f}s training" if t is not None else f"did not reach {100 * cfg.target_acc:.0f}%")
          + f"; artefacts in {result.out}")
    print(json.dumps({k: m[k] for k in ("params", "within_budget", "device")}))


if __name__ == "__main__":
    main()
