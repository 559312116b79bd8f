"""Training-step throughput, and the convolution throughput that bounds it.

    python -m benchmarks.throughput                              # every norm, fp32 and bf16, batch 128
    python -m benchmarks.throughput --norm bn --precision fp32 --batch-size 256
    python -m benchmarks.throughput --arch lean deep deep8 separable --norm bn --precision bf16   # layouts side by side

For each layout, norm and precision, on random data in channels_last:
  step       --steps timed training steps (forward, label-smoothed loss, backward, Nesterov SGD step) of
             `make_model(norm, arch)` after --warmup untimed ones: images per second, and the FLOPs those
             images cost per second (convolutions and the linear layer, forward and backward).
  conv only  the model's convolutions alone, each run forward and backward at the shape it sees
             in the model, nothing in between: the speed of the conv kernels themselves. Its images per
             second is the ceiling of any training step that keeps these convolutions, so with the
             epochs a recipe needs it gives the floor on its time to target.
Writes OUT/throughput.json, OUT/throughput.md and OUT/throughput.png and prints the table.
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F
import torch.utils.flop_counter as flop_formulas
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastcifar import TrainConfig
from fastcifar.execution import cpu_has_native_bf16
from fastcifar.optim import make_optimizer
from fastcifar.models import ARCHS, NORMS, count_params, make_model

from .common import (atomic_write_json, atomic_write_text, environment, fmt, markdown_table, report_header,
                     pick_device, save_figure_atomic, set_all_threads, sync)

PROG = "python -m benchmarks.throughput"
PRECISIONS = ("fp32", "bf16")
TRAIN_IMAGES = 50_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["lean"], choices=sorted(ARCHS), help="layouts (default: lean)")
    p.add_argument("--norm", nargs="+", default=list(NORMS), choices=NORMS, help="norms (default: all)")
    p.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                   help="fp32, and bf16 autocast (default: both)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed steps per measurement (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per cell; the fastest is kept (default 3)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--out", default=os.path.join("results", "throughput"), help="output folder")
    args = p.parse_args(argv)
    if min(args.batch_size, args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--batch-size, --steps and --repeats must be at least 1, --warmup not negative")
    return args


def timed(fn, steps, warmup, repeats, device):
    """Fastest of `repeats` timings of `steps` calls, in seconds per call: the others met interference."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape=None, **kwargs):
    """Each gradient of a conv costs what its forward does. torch's own formula counts the weight gradient
    as if groups were 1, which makes a depthwise conv's backward C times too large."""
    if transposed:
        return flop_formulas.conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation,
                                                transposed, output_padding, groups, output_mask, out_shape)
    return (int(output_mask[0]) + int(output_mask[1])) * flop_formulas.conv_flop_count(x_shape, w_shape,
                                                                                      grad_out_shape)


def count_flops(run):
    """FLOPs of one call of `run` in its convolutions and matrix products, forward and backward."""
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) as counter:
        run()
    return counter.get_total_flops()


def autocast(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def measure(arch, norm, precision, args, device):
    torch.manual_seed(0)
    model = make_model(norm, arch).to(device)
    model.stem.fit(torch.randn(256, 3, 32, 32, device=device))
    opt = make_optimizer(model, TrainConfig.resolve(norm=norm, arch=arch, device=device.type))  # training's own
    b = args.batch_size
    x = torch.randn(b, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (b,), device=device)

    def forward_backward():
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        loss.backward()

    def step():
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = count_flops(forward_backward) / b  # the network's; Muon's Newton-Schulz is per step, not per image
    opt.zero_grad(set_to_none=True)
    step_s = timed(step, args.steps, args.warmup, args.repeats, device)

    # each conv at the input shape it meets in the model
    convs, shapes = [m for m in model.modules() if isinstance(m, nn.Conv2d)], []
    hooks = [m.register_forward_hook(lambda m, inp, out: shapes.append(inp[0].shape)) for m in convs]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    inputs = [torch.randn(s, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
              for s in shapes]

    def convs_only():
        with autocast(device, precision):
            outs = [m(i) for m, i in zip(convs, inputs)]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    conv_flops = count_flops(convs_only) / b
    conv_s = timed(convs_only, args.steps, args.warmup, args.repeats, device)
    return {"arch": arch, "norm": norm, "precision": precision, "params": count_params(model), "batch_size": b,
            "train_gflop_per_image": flops / 1e9, "conv_gflop_per_image": conv_flops / 1e9,
            "step_images_per_s": b / step_s, "step_gflop_per_s": flops * b / step_s / 1e9,
            "conv_images_per_s": b / conv_s, "conv_gflop_per_s": conv_flops * b / conv_s / 1e9,
            "conv_share_of_step": conv_s / step_s, "epoch_s_at_step_speed": TRAIN_IMAGES * step_s / b,
            "epoch_s_floor_at_conv_speed": TRAIN_IMAGES * conv_s / b}


def report(rows, env, args):
    header = ["norm", "arch", "precision", "params", "GFLOP/image (train)", "step img/s", "step GFLOP/s",
              "conv-only img/s", "conv GFLOP/s", "conv share of step", "epoch (s)", "epoch floor (s)"]
    table = markdown_table(header, [
        [r["norm"], r.get("arch", "lean"), r["precision"], r["params"], fmt(r["train_gflop_per_image"], 4), f"{r['step_images_per_s']:.0f}",
         fmt(r["step_gflop_per_s"], 1), f"{r['conv_images_per_s']:.0f}", fmt(r["conv_gflop_per_s"], 1),
         f"{100 * r['conv_share_of_step']:.0f}%", fmt(r["epoch_s_at_step_speed"], 1),
         fmt(r["epoch_s_floor_at_conv_speed"], 1)] for r in rows])
    bf16 = "" if env["device"] == "cuda" else \
        f"; native bf16 (AVX512-BF16 or AMX): {'yes' if env['cpu_native_bf16'] else 'no'}"
    return "\n".join([
        *report_header("Training-step throughput", env,
                       f"Batch {args.batch_size}, random data, fastest of {args.repeats} x {args.steps} steps",
                       machine_note=bf16), "",
        table, "",
        "GFLOP/image: forward and backward of the whole model's convolutions and linear layer. Step: a full "
        "training step. Conv-only: the model's convolutions alone, forward and backward at their shapes in the "
        "model. Epoch: 50,000 images at step speed; epoch floor: at conv-only speed, what an epoch would cost "
        "if everything but the convolutions were free.", ""])


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r.get('arch', 'lean')}\n{r['norm']}\n{r['precision']}" for r in rows]
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["step_images_per_s"] for r in rows], 0.4, label="training step")
    ax.bar([i + 0.2 for i in xs], [r["conv_images_per_s"] for r in rows], 0.4, label="convolutions only")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("images / s")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    set_all_threads(args.threads)
    env = environment(device, PROG, argv)
    env["cpu_native_bf16"] = cpu_has_native_bf16()
    if device.type == "cpu" and "bf16" in args.precision and not env["cpu_native_bf16"]:
        print("note: this CPU has no native bf16; bf16 rows measure emulated bf16", file=sys.stderr)
    rows = []
    for arch, norm, precision in [(a, n, p) for a in args.arch for n in args.norm for p in args.precision]:
        rows.append(measure(arch, norm, precision, args, device))
        r = rows[-1]
        print(f"{arch} {norm} {precision}: step {r['step_images_per_s']:.0f} img/s, "
              f"convs alone {r['conv_images_per_s']:.0f} img/s", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    text = report(rows, env, args)
    atomic_write_json(os.path.join(args.out, "throughput.json"), {"environment": env, "rows": rows})
    atomic_write_text(os.path.join(args.out, "throughput.md"), text)
    plot(rows, os.path.join(args.out, "throughput.png"))
    print(text)


if __name__ == "__main__":
    main()
