"""Score a checkpoint on any CIFAR-10 source.

    python -m fastcifar.evaluate --checkpoint runs/bn/model.pt --data PATH [--json OUT.json]
"""
import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_checkpoint, load_state
from .config import TTA_VIEWS as TTA
from .data import CLASSES, DataError, prepare_data, resolve_source
from .data.loaders import ResidentLoader
from .device import ConfigError, pick_device
from .io import atomic_write_json
from .models import make_model


def shifted(x, d):
    """x moved by d pixels down and right (d = +-1), the uncovered edge filled by reflection."""
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return padded[:, :, 1 - d:x.shape[2] + 1 - d, 1 - d:x.shape[3] + 1 - d]


def tta_logits(model, x, tta="off"):
    """Logits summed over test-time views: off (1 view), flip (+ mirror), flip-shift (+ one-pixel shifts
    of both, at half weight: 4 views). What each adds is measured in benchmarks/NOTES.md."""
    if tta not in TTA:
        raise ValueError(f"unknown tta {tta!r}; choose one of {', '.join(TTA)}")
    logits = model(x)
    if tta == "off":
        return logits
    mirrored = x.flip(3)
    logits = logits + model(mirrored)
    if tta == "flip-shift":
        logits = logits + 0.5 * (model(shifted(x, -1)) + model(shifted(mirrored, 1)))
    return logits


@torch.no_grad()
def evaluate(model, loader, autocast=contextlib.nullcontext, tta="off"):
    """Returns (mean loss, accuracy, predictions as a device tensor). One host sync, at the end."""
    model.eval()
    loss_sum = torch.zeros((), device=loader.device)
    preds = []
    for x, y in loader:
        with autocast():
            logits = tta_logits(model, x, tta)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        preds.append(logits.argmax(1))
    preds = torch.cat(preds)
    n = len(preds)
    acc = (preds == loader.labels[:n]).float().mean()
    return (loss_sum / n).item(), acc.item(), preds


def per_class_accuracy(labels, preds):
    """{class: accuracy}, None for a class with no test images (a --limit subset)."""
    return {c: float((preds[labels == i] == i).mean()) if (labels == i).any() else None for i, c in enumerate(CLASSES)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastcifar.evaluate", description="Score a fastcifar checkpoint.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="CIFAR-10 source (default: $FASTCIFAR_DATA, else download)")
    p.add_argument("--beton-dir", help="where converted betons are cached")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--tta", choices=TTA, help="test-time views (default: what the run was evaluated with)")
    p.add_argument("--json", help="also write the scores to this JSON file")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
        ckpt = load_checkpoint(args.checkpoint)
        # the torch norm path: the same function as the fused kernel, and it runs on any device
        try:
            model = make_model(ckpt["model_config"].get("norm"), ckpt["model_config"].get("arch"), fused=False)
        except ValueError as e:
            raise CheckpointError(f"{args.checkpoint}: {e}") from None
        load_state(model, ckpt["model"], "model", args.checkpoint)
        data = prepare_data(resolve_source(args.data), args.beton_dir)
        loader = ResidentLoader(data.paths["test"], args.batch_size, device, train=False)
    except (DataError, ConfigError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    tta = args.tta or ckpt["config"].get("tta", "off")
    loss, acc, preds = evaluate(model.to(device), loader, tta=tta)
    labels = loader.labels.cpu().numpy()
    per_class = per_class_accuracy(labels, preds.cpu().numpy())
    print(f"test accuracy {100 * acc:.2f}%  loss {loss:.4f}  (tta {tta}) on {data.manifest['description']}")
    for c, a in per_class.items():
        print(f"  {c:<10} " + ("no test images" if a is None else f"{100 * a:6.2f}%"))
    if args.json:
        atomic_write_json(args.json, {"checkpoint": args.checkpoint, "dataset": data.manifest["description"],
                                      "test_acc": acc, "test_loss": loss, "tta": tta, "per_class": per_class})


if __name__ == "__main__":
    main()
