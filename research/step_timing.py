"""Training-step throughput of layouts on this machine: images per second and the time 20 epochs would take.

    python -m research.step_timing --layout separable deep8 "d36p d48 d64" --norm bn gn ln --threads 2 [--amp]
        [--optimizer sgd muon] [--stem-stride 2]

A median over timed steps at batch 128, after warm-up steps, and the optimizer's own share of a step; no data
loading, no evaluation. Figures on a shared machine move by up to a third between runs: compare layouts within
one run.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from fastcifar.config import TrainConfig
from fastcifar.execution import cpu_has_native_bf16
from fastcifar.optim import OPTIMIZERS, make_optimizer
from fastcifar.models import count_params
from benchmarks.throughput import TRAIN_IMAGES
from research.screen import layout_factory


def step_seconds(model, batch, steps, warmup, amp, optimizer="sgd"):
    """(median seconds per training step, median seconds of its optimizer step)."""
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = make_optimizer(model, TrainConfig.resolve(lr=0.01, optimizer=optimizer,
                                                    muon_lr=0.01 if optimizer == "muon" else None))
    times, opt_times = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        t_opt = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt_times.append(time.perf_counter() - t_opt)
        times.append(time.perf_counter() - t)
    return upper_median(times[warmup:]), upper_median(opt_times[warmup:])


def upper_median(v):
    return sorted(v)[len(v) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.step_timing", description=__doc__.split("\n")[0])
    p.add_argument("--layout", nargs="+", default=["separable"])
    p.add_argument("--norm", nargs="+", default=["bn", "gn", "ln"])
    p.add_argument("--stem-stride", type=int, choices=(1, 2), default=1, help="a spec's whitening-stem stride")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=["sgd"])
    p.add_argument("--amp", action="store_true", help="bf16 autocast (only where the CPU has native bf16)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    amp = a.amp and cpu_has_native_bf16()
    print(f"{'layout':36s} norm  params optimizer   img/s  optimizer ms  20 epochs (min)  "
          f"[{'bf16' if amp else 'fp32'}, {a.threads} threads]")
    for layout in a.layout:
        for norm in a.norm:
            for optimizer in a.optimizer:
                torch.manual_seed(0)
                model = layout_factory(layout, a.stem_stride)(TrainConfig.resolve(norm=norm), False).train()
                dt, dt_opt = step_seconds(model, a.batch, a.steps, a.warmup, amp, optimizer)
                rate = a.batch / dt
                print(f"{layout:36s} {norm:4s} {count_params(model):7,d} {optimizer:9s} {rate:7.0f}  "
                      f"{1000 * dt_opt:12.2f}  {20 * TRAIN_IMAGES / rate / 60:8.1f}", flush=True)


if __name__ == "__main__":
    main()
