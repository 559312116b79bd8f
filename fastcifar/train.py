"""Train a <=50K-parameter CIFAR-10 network with BatchNorm, GroupNorm or LayerNorm.

    python -m fastcifar.train --norm bn --amp --data PATH --out runs/bn

Reads top to bottom: presets, settings, set-up, compile warm-up, one epoch, evaluation and checkpoint,
artefacts, and train(), which strings them together.
"""
import argparse
import contextlib
import json
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import CLASSES, DataError, prepare_betons, resolve_source
from .data.loaders import LOADERS
from .device import ConfigError, default_threads, device_name, pick_device, sync
from .evaluate import TTA, evaluate, per_class_accuracy, tta_logits
from .io import atomic_write_json
from .models import ARCHS, NORMS, PARAM_BUDGET, count_params, make_model
from .plots import plot_curves, plot_misclassified

EPOCH_BUDGET = 20
# measured (benchmarks/NOTES.md): the shortest schedules whose last epoch reaches 70% on every seed
FAST_EPOCHS = {"bn": 2, "gn": 3, "ln": 3}
# batch size and peak learning rate per device type, a value or one per norm. CPU, measured
# (benchmarks/NOTES.md): batch 128 learns far more per second than 512; bn's 2-epoch schedule ends higher at
# lr 0.45 (20-seed mean 71.62% against 71.49% at 0.3). CUDA, not yet measured (benchmarks/GPU.md): 512 keeps
# the device busy, and the learning rate grows with the square root of the batch
PER_DEVICE = {"batch_size": {"cpu": 128, "cuda": 512}, "lr": {"cpu": 0.2, "cuda": 0.4}}
PRESETS = {
    # the lean layout learns most per second; stops at the target only at its own epoch count
    "fast": dict(arch={n: "lean" for n in NORMS}, epochs=FAST_EPOCHS, stop_at_target=True,
                 **{**PER_DEVICE, "lr": {"cpu": {"bn": 0.45, "gn": 0.2, "ln": 0.2}, "cuda": 0.4}}),
    # the layout that learns most in 20 epochs (measured), inside 10 minutes on a 2-core CPU; gn and ln, whose
    # separable pairs standardize their composite filter, end higher at half bn's learning rate (CUDA: scaled alike)
    "best": dict(arch={n: "separable" for n in NORMS}, epochs={n: 20 for n in NORMS}, stop_at_target=False,
                 **{**PER_DEVICE, "lr": {"cpu": {"bn": 0.2, "gn": 0.1, "ln": 0.1},
                                         "cuda": {"bn": 0.4, "gn": 0.2, "ln": 0.2}}}),
}
WHITEN_IMAGES = 5_000  # 1.3M patches for the stem's 12x12 covariance: plenty, and a fraction of a second
# flags that describe this machine, not the experiment: a resumed run takes them from its own command line
MACHINE_FLAGS = ("device", "threads", "compile", "cuda_graphs", "fused_norm", "quiet", "no_plots", "resume", "out")
# where the data lives on this machine: a resumed run reuses the saved paths unless given new ones
DATA_FLAGS = ("data", "beton_dir")


# ---------------------------------------------------------------- settings

def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastcifar.train", description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--norm", default="bn", choices=NORMS)
    p.add_argument("--preset", default="fast", choices=sorted(PRESETS),
                   help="fast: the lean network, short schedule, stop at the target; best: 20 epochs of the "
                        "separable network")
    p.add_argument("--arch", choices=sorted(ARCHS), help="network layout (default: from the preset: fast lean, "
                                                         "best separable)")
    p.add_argument("--epochs", type=int, help="epochs (default: best 20; fast bn 2, gn and ln 3)")
    p.add_argument("--batch-size", type=int, help="default: from the preset, per device (CPU 128, CUDA 512)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: from the preset per device and norm)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast (CUDA without bf16: fp16 + grad scaler; a CPU without native bf16: fp32)")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model (auto: on with CUDA, off on the CPU; a bare --compile: on)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="capture the training step in CUDA graphs (torch.compile mode reduce-overhead, so not "
                        "with --compile off); CUDA only: refused on the CPU")
    p.add_argument("--fused-norm", default="auto", choices=["auto", "on", "off"],
                   help="Triton GroupNorm+ReLU for gn/ln (auto: where it can run and agrees with torch on a "
                        "small check, else the torch path; on: the kernel or a one-line error)")
    p.add_argument("--target-acc", type=float, default=0.70)
    p.add_argument("--stop-at-target", action=argparse.BooleanOptionalAction, default=None,
                   help="stop once test accuracy reaches the target (default: the fast preset at its own "
                        "epoch count)")
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
    p.add_argument("--resume", metavar="OUT",
                   help="continue the run in OUT with its own settings; --epochs may extend it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None):
    """The parsed flags, plus `explicit`: the names of those given on the command line. Settings that depend
    on the device (batch size, learning rate) stay None until resolve_settings."""
    p = build_parser()
    args = p.parse_args(argv)
    bare = build_parser()
    for a in bare._actions:
        a.default = argparse.SUPPRESS
    args.explicit = sorted(vars(bare.parse_args(argv)))
    preset = PRESETS[args.preset]
    if args.arch is None:
        args.arch = preset["arch"][args.norm]
    if args.epochs is None:
        args.epochs = preset["epochs"][args.norm]
    if args.stop_at_target is None:
        args.stop_at_target = preset["stop_at_target"] and args.epochs == preset["epochs"][args.norm]
    if args.epochs < 1 or (args.limit is not None and args.limit < 1):
        p.error("--epochs and --limit must be at least 1")
    if (args.lr is not None and args.lr <= 0) or (args.batch_size is not None and args.batch_size < 1) \
            or args.weight_decay < 0:
        p.error("--lr must be positive, --batch-size at least 1, --weight-decay not negative")
    if not 0 < args.target_acc <= 1:
        p.error("--target-acc is a fraction in (0, 1]")
    if args.cuda_graphs and args.compile == "off":
        p.error("--cuda-graphs captures the compiled step: it cannot be used with --compile off")
    return args


def resolve_settings(args, device):
    """Fill the per-device values from the preset; returns where each came from (recorded in metrics.json)."""
    source = {}
    for k in PER_DEVICE:
        if getattr(args, k) is None:
            value = PRESETS[args.preset][k][device.type]
            setattr(args, k, value[args.norm] if isinstance(value, dict) else value)
            source[k] = f"preset {args.preset} ({device.type})"
        else:
            source[k] = "command line" if k in args.explicit else "resumed run"
    return source


def apply_resumed_settings(args, saved):
    """A resumed run keeps its own settings. A flag given now that contradicts them is refused, except a
    larger --epochs, which extends the run."""
    for k, v in saved.items():
        if k in MACHINE_FLAGS or k == "explicit" or not hasattr(args, k) or (k in DATA_FLAGS and k in args.explicit):
            continue
        if k in args.explicit and getattr(args, k) != v:
            if k == "epochs" and args.epochs > v:
                continue
            raise ConfigError(f"--{k.replace('_', '-')} {getattr(args, k)} contradicts the run being resumed "
                              f"(which has {v}); leave it out to keep the run's own setting")
        setattr(args, k, v)


def compile_settings(compile_flag, cuda_graphs, device):
    """(compile?, torch.compile mode) for --compile and --cuda-graphs on this device."""
    if cuda_graphs:  # parse_args refuses it with --compile off
        if device.type != "cuda":
            raise ConfigError("--cuda-graphs: CUDA graphs need a CUDA device; leave the flag out on the CPU")
        return True, "reduce-overhead"
    on = compile_flag == "on" or (compile_flag == "auto" and device.type == "cuda")
    return on, None


def configure_backends(device):
    # fixed input shapes: let cuDNN pick the fastest convolution once; TF32 matmuls keep fp32 range
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def lr_at(step, total, warmup):
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def make_optimizer(model, lr, weight_decay, momentum=0.9):
    # no weight decay on norm affine parameters and biases: it only fights the normalization
    trained = [p for p in model.parameters() if p.requires_grad]  # the whitening stem's filters stay frozen
    return torch.optim.SGD([{"params": [p for p in trained if p.ndim > 1], "weight_decay": weight_decay},
                            {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=True)


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


def amp_dtype(device, amp):
    """The dtype the norms see: fp32, or the autocast dtype (fp16 on CUDA without bf16)."""
    if not amp:
        return torch.float32
    return torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16


def autocast_for(device, amp):
    if not amp:
        return contextlib.nullcontext, None
    dtype = amp_dtype(device, amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def resolve_fused(mode, norm, device, dtype=torch.float32):
    """(use the fused GroupNorm+ReLU?, why not, where auto fell back). The kernel has never run on a GPU, so
    it is first checked against torch for the training dtype and channels_last, before anything compiles:
    auto falls back to the torch path on a mismatch, on fails loudly."""
    if norm == "bn" or mode == "off":
        return False, None
    try:
        import fastcifar_kernels as fk
    except ImportError:
        fk = None
    if not (fk and fk.fused_available(device)):
        if mode == "on":
            raise ConfigError("--fused-norm on: the Triton kernel cannot run here (needs CUDA, or TRITON_INTERPRET=1)")
        return False, None
    try:
        if fk.verify_kernel(device, dtype, channels_last=True, strict=mode == "on"):
            return True, None
    except RuntimeError as e:
        raise ConfigError(f"--fused-norm on: {str(e).splitlines()[0]}") from None
    key = f"{device.type}/{str(dtype).removeprefix('torch.')}/channels_last"
    return False, fk.kernel_status().get(key, "the kernel's self-check failed")


# ---------------------------------------------------------------- set-up

def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(path, device, model, opt, sched, loader):
    """Load a checkpoint to the CPU and hand each piece to its owner: parameters and optimizer state are
    copied to the device by load_state_dict, RNG states must stay CPU ByteTensors."""
    ckpt = load_checkpoint(path, map_location="cpu")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt


def setup(args):
    """Device, data, model, optimizer and schedule; on --resume, the run's own settings and state."""
    ckpt_path = os.path.join(args.resume or args.out, "model.pt")
    saved = load_checkpoint(ckpt_path) if args.resume else None  # its settings now, its state once built
    if saved:
        args.out = args.resume
        apply_resumed_settings(args, saved["args"])
    os.makedirs(args.out, exist_ok=True)
    device = pick_device(args.device)
    if saved and saved["device"] != device.type:  # a CPU and a CUDA generator do not share a state format
        raise ConfigError(f"--resume {args.out}: the run trained on {saved['device']}, this process would use "
                          f"{device.type}; resume it with --device {saved['device']}")
    settings_from = resolve_settings(args, device)
    if args.limit is not None and args.limit < args.batch_size:  # the last partial batch is dropped: no steps
        raise ConfigError(f"--limit {args.limit} is smaller than the batch size {args.batch_size}, so an epoch "
                          f"would have no training step; raise --limit or lower --batch-size")
    compile_on, compile_mode = compile_settings(args.compile, args.cuda_graphs, device)
    configure_backends(device)
    torch.manual_seed(args.seed)
    amp = amp_effective(device, args.amp)
    autocast, scaler = autocast_for(device, amp)
    fused, fused_fallback = resolve_fused(args.fused_norm, args.norm, device, amp_dtype(device, amp))

    # data: convert once to betons, then batches live on the device
    beton_dir, manifest = prepare_betons(resolve_source(args.data), args.beton_dir)
    train_loader = LOADERS[args.loader](f"{beton_dir}/train.beton", args.batch_size, device, train=True,
                                        seed=args.seed, cutout=args.cutout, limit=args.limit)
    test_loader = LOADERS["resident"](f"{beton_dir}/test.beton", 1000, device, train=False, limit=args.limit)
    # after the loaders: ffcv sets torch's thread count when it is imported and when a Loader starts
    torch.set_num_threads(args.threads or default_threads())

    model_config = {**(saved["model_config"] if saved else {"norm": args.norm, "arch": args.arch}), "fused": fused}
    model = make_model(**model_config).to(device)
    fit_time = 0.0
    if not saved:  # a resumed run loads the fitted stem from its checkpoint
        t0 = time.perf_counter()
        model.stem.fit(train_loader.sample(WHITEN_IMAGES))
        sync(device)
        fit_time = time.perf_counter() - t0
    opt = make_optimizer(model, args.lr, args.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, steps_per_epoch // 2 + 1))
    run = argparse.Namespace(
        args=args, device=device, manifest=manifest, train_loader=train_loader, test_loader=test_loader,
        model=model, model_config=model_config, opt=opt, sched=sched, autocast=autocast, scaler=scaler,
        amp=amp, fused=fused, fused_fallback=fused_fallback, compile=compile_on, compile_mode=compile_mode, settings_from=settings_from,
        ckpt_path=ckpt_path, history=[], start_epoch=0, compile_time=0.0, fit_time=fit_time, preds=None)
    if saved:
        ckpt = restore(ckpt_path, device, model, opt, sched, train_loader)
        run.history, run.start_epoch, run.compile_time = ckpt["history"], ckpt["epoch"], ckpt["compile_time_s"]
        print(f"resuming {args.out} after epoch {run.start_epoch}")
    # CUDA graphs for the training step; evaluation keeps the default mode (it sums several views' outputs,
    # which a graph replay would overwrite)
    run.train_net = torch.compile(model, mode=compile_mode, dynamic=False) if compile_on else model
    run.eval_net = torch.compile(model, dynamic=False) if compile_mode else run.train_net
    return run


# ---------------------------------------------------------------- compile warm-up

def warm_up(run):
    """Compile every graph the run will use before the clock starts: a training step at the training batch
    shape, and evaluation with its test-time views at each test batch shape. The model and optimizer are
    left as they were."""
    args, model = run.args, run.model
    t0 = time.perf_counter()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    x = run.train_loader.sample(args.batch_size)
    y = torch.zeros(len(x), dtype=torch.long, device=run.device)
    run.train_net.train()
    with run.autocast():
        F.cross_entropy(run.train_net(x).float(), y, label_smoothing=args.label_smoothing).backward()
    run.eval_net.eval()
    sizes = set()
    with torch.no_grad():
        for xb, _ in run.test_loader:  # a full test batch, and the last, shorter one
            if len(xb) not in sizes:
                sizes.add(len(xb))
                with run.autocast():
                    tta_logits(run.eval_net, xb, args.tta)
    model.load_state_dict(saved)
    run.opt.zero_grad(set_to_none=True)
    sync(run.device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- one epoch

def train_epoch(run, epoch):
    """One pass over the training data. Returns (loss sum, correct, images seen, first non-finite step or -1),
    kept on the device: no host sync inside the step loop."""
    args, net, opt, sched, scaler = run.args, run.train_net, run.opt, run.sched, run.scaler
    device, steps_per_epoch = run.device, len(run.train_loader)
    net.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    for i, (x, y) in enumerate(progress(run.train_loader, f"epoch {epoch + 1}/{args.epochs}", args.quiet)):
        if run.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with run.autocast():
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
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        bad_now = ~torch.isfinite(loss.detach()) & (first_bad < 0)
        first_bad = torch.where(bad_now, epoch * steps_per_epoch + i, first_bad)
        seen += len(y)
    return loss_sum, correct, seen, first_bad


# ---------------------------------------------------------------- evaluation and checkpoint

def evaluate_and_save(run, epoch, loss_sum, correct, seen, train_time):
    """Score the test set, append the epoch to the history, checkpoint, and return the history entry."""
    args = run.args
    t1 = time.perf_counter()
    test_loss, test_acc, run.preds = evaluate(run.eval_net, run.test_loader, run.autocast, tta=args.tta)
    run.history.append({"epoch": epoch + 1, "train_loss": (loss_sum / seen).item(),
                        "train_acc": (correct / seen).item(), "test_loss": test_loss, "test_acc": test_acc,
                        "train_time_s": train_time, "eval_time_s": time.perf_counter() - t1})
    h = run.history[-1]
    print(f"epoch {epoch + 1:2d}  train loss {h['train_loss']:.3f} acc {100 * h['train_acc']:.2f}%  "
          f"test loss {test_loss:.3f} acc {100 * test_acc:.2f}%  train time {train_time:.1f}s", flush=True)
    save_checkpoint(run.ckpt_path, {
        "model": run.model.state_dict(), "model_config": run.model_config, "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(), "loader": run.train_loader.state_dict(),
        "rng": rng_state(run.device), "device": run.device.type, "epoch": epoch + 1, "history": run.history,
        "compile_time_s": run.compile_time, "args": {k: v for k, v in vars(args).items() if k != "explicit"}})
    return h


def summarize(metrics, history, target, eval_time):
    hit = next((h for h in history if h["test_acc"] >= target), None)
    metrics.update(
        epochs_run=len(history), eval_time_s=eval_time,
        time_to_target_s=hit["train_time_s"] if hit else None, epochs_to_target=hit["epoch"] if hit else None,
        final_test_acc=history[-1]["test_acc"] if history else None,
        best_test_acc=max((h["test_acc"] for h in history), default=None))


# ---------------------------------------------------------------- artefacts

def write_artefacts(run, metrics):
    args, history = run.args, run.history
    if history and not args.no_plots:
        if run.preds is None:  # resumed after the last epoch: nothing was evaluated in this process
            _, _, run.preds = evaluate(run.eval_net, run.test_loader, run.autocast, tta=args.tta)
        plot_curves(history, os.path.join(args.out, "curves.png"), args.target_acc,
                    f"{args.norm}, {metrics['params']} params, {device_name(run.device)}")
        labels, preds = run.test_loader.labels.cpu().numpy(), run.preds.cpu().numpy()
        metrics["per_class_acc"] = per_class_accuracy(labels, preds)
        images = run.test_loader.images.permute(0, 2, 3, 1).cpu().numpy()
        plot_misclassified(images, labels, preds, CLASSES, os.path.join(args.out, "misclassified.png"))


# ---------------------------------------------------------------- the run

def train(args):
    """Run one training job; returns the metrics dict it also writes to OUT/metrics.json."""
    run = setup(args)
    args, model = run.args, run.model
    metrics_path = os.path.join(args.out, "metrics.json")
    within_budget = args.epochs <= EPOCH_BUDGET
    if not within_budget:
        warnings.warn(f"!!! {args.epochs} epochs is over the {EPOCH_BUDGET}-epoch budget: "
                      "this run is recorded as within_budget=false !!!", stacklevel=2)
    params = count_params(model)
    if params > PARAM_BUDGET:
        within_budget = False
        warnings.warn(f"!!! {params} parameters is over the {PARAM_BUDGET} budget !!!", stacklevel=2)
    if run.compile and run.start_epoch < args.epochs:
        # compiled outside the epoch loop so its cost is reported apart (and still counted in time-to-target)
        run.compile_time = warm_up(run)

    metrics = {
        "norm": args.norm, "arch": args.arch, "params": params, "epochs_run": len(run.history), "epochs_planned": args.epochs,
        "within_budget": within_budget, "device": device_name(run.device), "dataset": run.manifest["description"],
        "dataset_images": {s: v["images"] for s, v in run.manifest["splits"].items()},
        "loader": args.loader, "amp": run.amp, "amp_requested": args.amp, "compile": run.compile,
        "compile_requested": args.compile, "cuda_graphs": args.cuda_graphs, "fused_norm": run.fused,
        "fused_norm_fallback": run.fused_fallback,
        "preset": args.preset, "batch_size": args.batch_size, "lr": args.lr, "settings_from": run.settings_from,
        "seed": args.seed, "target_acc": args.target_acc, "stop_at_target": args.stop_at_target, "tta": args.tta,
        "torch_threads": torch.get_num_threads(), "compile_time_s": run.compile_time,
        "whiten_fit_time_s": run.fit_time, "status": "running", "history": run.history,
    }
    train_time = run.history[-1]["train_time_s"] if run.history else run.compile_time + run.fit_time
    eval_time = sum(h["eval_time_s"] for h in run.history)
    for epoch in range(run.start_epoch, args.epochs):
        t0 = time.perf_counter()
        loss_sum, correct, seen, first_bad = train_epoch(run, epoch)
        sync(run.device)
        train_time += time.perf_counter() - t0
        if first_bad.item() >= 0:
            metrics.update(status="failed", error=f"non-finite loss at step {first_bad.item()} "
                           f"(epoch {epoch + 1}); the last good checkpoint is kept")
            atomic_write_json(metrics_path, metrics)
            raise FloatingPointError(metrics["error"])
        h = evaluate_and_save(run, epoch, loss_sum, correct, seen, train_time)
        eval_time += h["eval_time_s"]
        summarize(metrics, run.history, args.target_acc, eval_time)
        atomic_write_json(metrics_path, metrics)
        if args.stop_at_target and h["test_acc"] >= args.target_acc:
            break

    metrics["status"] = "done"
    write_artefacts(run, metrics)
    summarize(metrics, run.history, args.target_acc, eval_time)
    atomic_write_json(metrics_path, metrics)
    return metrics


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
