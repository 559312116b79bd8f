"""Train a <=50K-parameter CIFAR-10 network with BatchNorm, GroupNorm or LayerNorm.

    python -m fastcifar.train --norm bn --amp --data PATH --out runs/bn

Reads top to bottom: settings, data, model, optimizer, the loop, the artefacts.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import CLASSES, DataError, prepare_betons, resolve_source
from .io import atomic_write_json
from .data.loaders import LOADERS
from .device import ConfigError, default_threads, device_name, pick_device, sync
from .evaluate import TTA, evaluate, per_class_accuracy
from .models import NORMS, PARAM_BUDGET, count_params, make_model
from .plots import plot_curves, plot_misclassified

EPOCH_BUDGET = 20
PRESETS = {
    "fast": dict(stop_at_target=True),
    "best": dict(epochs=20, stop_at_target=False),
}
# measured (benchmarks/NOTES.md): the shortest schedules whose last epoch reaches 70%
FAST_EPOCHS = {"bn": 2, "gn": 3, "ln": 3}
WHITEN_IMAGES = 5_000  # 1.3M patches for the stem's 12x12 covariance: plenty, and a fraction of a second


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastcifar.train", description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--norm", default="bn", choices=NORMS)
    p.add_argument("--preset", default="fast", choices=sorted(PRESETS),
                   help="fast: short schedule, stop at the target; best: the full 20 epochs")
    p.add_argument("--epochs", type=int, help="epochs (default: best 20; fast bn 2, gn and ln 3)")
    # measured (benchmarks/NOTES.md): on the CPU, batch 128 learns far more per second than 512
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast (CUDA without bf16: fp16 + grad scaler; a CPU without native bf16: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fused-norm", default="auto", choices=["auto", "on", "off"],
                   help="Triton GroupNorm+ReLU for gn/ln (auto: where it can run)")
    p.add_argument("--target-acc", type=float, default=0.70)
    p.add_argument("--stop-at-target", action=argparse.BooleanOptionalAction, default=None,
                   help="stop once test accuracy reaches the target (default: from the preset)")
    p.add_argument("--tta", default="flip-shift", choices=TTA,
                   help="test-time views: the mirror image, and one-pixel shifts (counted as evaluation time)")
    p.add_argument("--cutout", type=int, default=0, help="cutout square size in pixels (0: off)")
    p.add_argument("--loader", default="resident", choices=sorted(LOADERS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--data", help="CIFAR-10 source or a folder of converted betons "
                                   "(default: $FASTCIFAR_DATA, else download the official one)")
    p.add_argument("--beton-dir", help="where converted betons are cached (default: ~/.cache/fastcifar)")
    p.add_argument("--limit", type=int, help="use only N train and N test images, spread over the classes (smoke tests)")
    p.add_argument("--out", default="runs/latest", help="folder for metrics.json, model.pt and plots")
    p.add_argument("--resume", metavar="OUT", help="continue the run whose artefacts are in OUT")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.epochs is None:
        args.epochs = FAST_EPOCHS[args.norm]
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.lr <= 0 or args.batch_size < 1 or args.weight_decay < 0:
        p.error("--lr must be positive, --batch-size at least 1, --weight-decay not negative")
    if not 0 < args.target_acc <= 1:
        p.error("--target-acc is a fraction in (0, 1]")
    return args


def lr_at(step, total, warmup):
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def make_optimizer(model, args):
    # no weight decay on norm affine parameters and biases: it only fights the normalization
    trained = [p for p in model.parameters() if p.requires_grad]  # the whitening stem's filters stay frozen
    decay = [p for p in trained if p.ndim > 1]
    no_decay = [p for p in trained if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=args.lr, momentum=0.9, nesterov=True)


def cpu_has_native_bf16():
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # private probes: absent means unknown, so no bf16
        return False


def amp_effective(device, amp):
    """--amp on a CPU without AVX512-BF16 or AMX would emulate bf16: 2-3x slower (benchmarks/NOTES.md)."""
    if amp and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("--amp: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 autocast runs "
                      "2-3x slower than fp32; training in fp32", stacklevel=2)
        return False
    return amp


def autocast_for(device, amp):
    if not amp:
        return contextlib.nullcontext, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


def resolve_fused(mode, norm, device):
    if norm == "bn" or mode == "off":
        return False
    try:
        from fastcifar_kernels import fused_available
        ok = fused_available(device)
    except ImportError:
        ok = False
    if mode == "on" and not ok:
        raise ConfigError("--fused-norm on: the Triton kernel cannot run here (needs CUDA, or TRITON_INTERPRET=1)")
    return ok


def train(args):
    """Run one training job; returns the metrics dict it also writes to OUT/metrics.json."""
    # ---- settings
    if args.resume:
        args.out = args.resume
    os.makedirs(args.out, exist_ok=True)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    fused = resolve_fused(args.fused_norm, args.norm, device)
    within_budget = args.epochs <= EPOCH_BUDGET
    if not within_budget:
        warnings.warn(f"!!! {args.epochs} epochs is over the {EPOCH_BUDGET}-epoch budget: "
                      "this run is recorded as within_budget=false !!!", stacklevel=2)

    # ---- data: convert once to betons, then batches live on the device
    beton_dir, manifest = prepare_betons(resolve_source(args.data), args.beton_dir)
    Loader = LOADERS[args.loader]
    train_loader = Loader(f"{beton_dir}/train.beton", args.batch_size, device, train=True, seed=args.seed,
                          cutout=args.cutout, limit=args.limit)
    test_loader = LOADERS["resident"](f"{beton_dir}/test.beton", 1000, device, train=False, limit=args.limit)
    # after the loaders: ffcv sets torch's thread count when it is imported and when a Loader starts
    torch.set_num_threads(args.threads or default_threads())

    # ---- model
    model_config = {"norm": args.norm, "fused": fused}
    model = make_model(**model_config).to(device)
    params = count_params(model)
    if params > PARAM_BUDGET:
        within_budget = False
        warnings.warn(f"!!! {params} parameters is over the {PARAM_BUDGET} budget !!!", stacklevel=2)
    fit_time = 0.0
    if not args.resume:  # a resumed run loads the fitted stem from its checkpoint
        t0 = time.perf_counter()
        model.stem.fit(train_loader.sample(WHITEN_IMAGES))
        sync(device)
        fit_time = time.perf_counter() - t0
    net = torch.compile(model) if args.compile else model
    amp = amp_effective(device, args.amp)
    autocast, scaler = autocast_for(device, amp)

    # ---- optimizer and schedule, stepped per batch
    opt = make_optimizer(model, args)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, steps_per_epoch // 2 + 1))

    history, start_epoch, compile_time, preds = [], 0, 0.0, None
    ckpt_path = os.path.join(args.out, "model.pt")
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        train_loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"])
        history, start_epoch, compile_time = ckpt["history"], ckpt["epoch"], ckpt.get("compile_time_s", 0.0)
        print(f"resuming {args.out} after epoch {start_epoch}")

    if args.compile and start_epoch < args.epochs:
        # compile outside the epoch loop so its cost is reported apart (and still counted in time-to-target)
        t0 = time.perf_counter()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        x, y = next(iter(test_loader))
        net.train()
        with autocast():
            F.cross_entropy(net(x[: args.batch_size]), y[: args.batch_size]).backward()
        net.eval()
        with torch.no_grad(), autocast():
            net(x)
        model.load_state_dict(saved)
        opt.zero_grad(set_to_none=True)
        sync(device)
        compile_time = time.perf_counter() - t0

    metrics = {
        "norm": args.norm, "params": params, "epochs_run": len(history), "epochs_planned": args.epochs,
        "within_budget": within_budget, "device": device_name(device), "dataset": manifest["description"],
        "dataset_images": {s: v["images"] for s, v in manifest["splits"].items()},
        "loader": args.loader, "amp": amp, "amp_requested": args.amp, "compile": args.compile, "fused_norm": fused,
        "preset": args.preset, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "target_acc": args.target_acc, "tta": args.tta, "torch_threads": torch.get_num_threads(),
        "compile_time_s": compile_time, "whiten_fit_time_s": fit_time, "status": "running", "history": history,
    }

    # ---- the loop
    train_time = history[-1]["train_time_s"] if history else compile_time + fit_time
    eval_time = sum(h["eval_time_s"] for h in history)
    for epoch in range(start_epoch, args.epochs):
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        seen = 0
        bar = progress(train_loader, f"epoch {epoch + 1}/{args.epochs}", args.quiet)
        for i, (x, y) in enumerate(bar):
            with autocast():
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            # bookkeeping stays on the device: no host sync inside the step loop
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            bad_now = ~torch.isfinite(loss.detach()) & (first_bad < 0)
            first_bad = torch.where(bad_now, epoch * steps_per_epoch + i, first_bad)
            seen += len(y)
        sync(device)
        train_time += time.perf_counter() - t0
        if first_bad.item() >= 0:
            metrics.update(status="failed", error=f"non-finite loss at step {first_bad.item()} "
                           f"(epoch {epoch + 1}); the last good checkpoint is kept")
            atomic_write_json(os.path.join(args.out, "metrics.json"), metrics)
            raise FloatingPointError(metrics["error"])

        t1 = time.perf_counter()
        test_loss, test_acc, preds = evaluate(net, test_loader, autocast, tta=args.tta)
        eval_time += time.perf_counter() - t1
        history.append({"epoch": epoch + 1, "train_loss": (loss_sum / seen).item(),
                        "train_acc": (correct / seen).item(), "test_loss": test_loss, "test_acc": test_acc,
                        "train_time_s": train_time, "eval_time_s": time.perf_counter() - t1})
        h = history[-1]
        print(f"epoch {epoch + 1:2d}  train loss {h['train_loss']:.3f} acc {100 * h['train_acc']:.2f}%  "
              f"test loss {test_loss:.3f} acc {100 * test_acc:.2f}%  train time {train_time:.1f}s", flush=True)
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "model_config": model_config, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "loader": train_loader.state_dict(), "rng": torch.get_rng_state(),
            "epoch": epoch + 1, "history": history, "compile_time_s": compile_time, "args": vars(args)})
        summarize(metrics, history, args.target_acc, eval_time)
        atomic_write_json(os.path.join(args.out, "metrics.json"), metrics)
        if args.stop_at_target and test_acc >= args.target_acc:
            break

    # ---- artefacts
    metrics["status"] = "done"
    if history and not args.no_plots:
        if preds is None:  # resumed after the last epoch: nothing was evaluated in this process
            _, _, preds = evaluate(net, test_loader, autocast, tta=args.tta)
        plot_curves(history, os.path.join(args.out, "curves.png"), args.target_acc,
                    f"{args.norm}, {params} params, {device_name(device)}")
        labels = test_loader.labels.cpu().numpy()
        preds = preds.cpu().numpy()
        metrics["per_class_acc"] = per_class_accuracy(labels, preds)
        images = test_loader.images.permute(0, 2, 3, 1).cpu().numpy()
        plot_misclassified(images, labels, preds, CLASSES, os.path.join(args.out, "misclassified.png"))
    summarize(metrics, history, args.target_acc, eval_time)
    atomic_write_json(os.path.join(args.out, "metrics.json"), metrics)
    return metrics


def summarize(metrics, history, target, eval_time):
    hit = next((h for h in history if h["test_acc"] >= target), None)
    metrics.update(
        epochs_run=len(history), eval_time_s=eval_time,
        time_to_target_s=hit["train_time_s"] if hit else None, epochs_to_target=hit["epoch"] if hit else None,
        final_test_acc=history[-1]["test_acc"] if history else None,
        best_test_acc=max((h["test_acc"] for h in history), default=None))


def progress(iterable, desc, quiet):
    if quiet:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _what_is_kept(out):
    if os.path.isfile(os.path.join(out, "model.pt")):
        return f"the last complete epoch's checkpoint in {out} is intact; continue with --resume {out}"
    return "no checkpoint was written yet, and no beton was left that a later run would trust"


def main(argv=None):
    args = parse_args(argv)
    try:
        metrics = train(args)
    except (DataError, ConfigError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # disk full, permissions: the cause on one line
        where = f" ({e.filename})" if e.filename else ""
        sys.exit(f"error: {e.strerror or e}{where}; {_what_is_kept(args.out)}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {_what_is_kept(args.out)}")
    t = metrics["time_to_target_s"]
    print(f"{args.norm}: final test acc {100 * metrics['final_test_acc']:.2f}%, "
          + (f"reached {100 * args.target_acc:.0f}% at epoch {metrics['epochs_to_target']} after {t:.1f}s training"
             if t is not None else f"did not reach {100 * args.target_acc:.0f}%")
          + f"; artefacts in {args.out}")
    print(json.dumps({k: metrics[k] for k in ("params", "within_budget", "device")}))


if __name__ == "__main__":
    main()
