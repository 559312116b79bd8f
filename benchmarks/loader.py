"""Loader throughput: training images per second delivered to the device, augmentation on.

    python -m benchmarks.loader --data PATH                      # all three loaders, batch 512
    python -m benchmarks.loader --data PATH --limit 5000 --loaders resident torchvision

Loaders, each yielding normalized float batches in channels_last plus int64 labels on --device:
  resident     fastcifar's ResidentLoader: the uint8 split lives on the device; random translate (2 px),
               flip and cutout run there, vectorized over the batch
  ffcv         fastcifar's FFCVLoader: ffcv decodes the beton on its CPU workers (one per core), ToDevice,
               then the same device-side augmentation
  torchvision  the usual recipe: a Dataset of PIL images with RandomCrop(32, padding=2),
               RandomHorizontalFlip, ToTensor, Normalize on the CPU in 2 DataLoader workers, then .to(device)
               (persistent workers and, with CUDA, pinned memory: its best case)

The torchvision pipeline has no cutout (torchvision has no such transform for PIL images); the two
project loaders run with --cutout (default 8), so they do slightly more work.

Each loader first runs one untimed warm-up epoch (ffcv compiles its pipeline with numba then; torchvision
starts its workers), then --epochs timed epochs over the training split with drop_last, each ended by a
device synchronize. Setup (reading the beton onto the device, building the Dataset) is reported apart.
Writes OUT/loader.json and OUT/loader.md and prints the table.
"""
import argparse
import os
import sys
import time

import torch

from fastcifar.data import DataError, prepare_betons, resolve_source
from fastcifar.data.prepare import FFCV_INSTALL, ffcv_problem
from fastcifar.data.loaders import FFCVLoader, ResidentLoader
from fastcifar.device import ConfigError, default_workers

from .common import (ArrayDataset, atomic_write_json, atomic_write_text, dataset_line, dataset_record,
                     environment, load_arrays, markdown_table, normalize_transform, pick_device, report_header,
                     set_all_threads, sync)

PROG = "python -m benchmarks.loader"
LOADER_NAMES = ("resident", "ffcv", "torchvision")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 source or a folder of converted betons (default: $FASTCIFAR_DATA, "
                                  "else the official download)")
    p.add_argument("--beton-dir", help="where converted betons are cached (default: fastcifar's cache)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto: CUDA if present")
    p.add_argument("--loaders", nargs="+", default=list(LOADER_NAMES), choices=LOADER_NAMES)
    p.add_argument("--batch-size", type=int, default=512, help="default 512")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs after the warm-up one (default 1)")
    p.add_argument("--limit", type=int, help="use a fixed spread of N training images (default: all)")
    p.add_argument("--cutout", type=int, default=8, help="cutout size for the project loaders (default 8; 0: off)")
    p.add_argument("--ffcv-workers", type=int, help="ffcv decoding workers (default: one per core)")
    p.add_argument("--torchvision-workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores, as training uses)")
    p.add_argument("--dataset-label", help="how the report names the data (default: guessed from the source)")
    p.add_argument("--out", default=os.path.join("results", "loader"), help="output folder")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.epochs < 1 or args.cutout < 0 or args.torchvision_workers < 0 \
            or (args.threads is not None and args.threads < 1):
        p.error("--batch-size, --epochs and --threads must be at least 1, --cutout and --torchvision-workers "
                "not negative")
    if args.limit is not None and args.limit < args.batch_size:
        p.error("--limit must be at least --batch-size (epochs drop the last partial batch)")
    args.loaders = list(dict.fromkeys(args.loaders))
    return args


class TorchvisionLoader:
    """The CPU-transform DataLoader, iterated to device tensors in the same layout as the project's loaders."""

    def __init__(self, beton_dir, batch_size, device, workers, limit=None, seed=0):
        from torchvision import transforms
        tf = transforms.Compose([transforms.RandomCrop(32, padding=2), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), normalize_transform()])
        self.device = torch.device(device)
        g = torch.Generator()
        g.manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            ArrayDataset(*load_arrays(beton_dir, "train", limit), tf), batch_size=batch_size, shuffle=True,
            drop_last=True, num_workers=workers, persistent_workers=workers > 0, generator=g,
            pin_memory=self.device.type == "cuda")

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                   y.to(self.device, non_blocking=True))


def make_loader(name, args, beton_dir, device):
    train = os.path.join(beton_dir, "train.beton")
    if name == "resident":
        return ResidentLoader(train, args.batch_size, device, train=True, cutout=args.cutout, limit=args.limit)
    if name == "ffcv":
        return FFCVLoader(train, args.batch_size, device, train=True, cutout=args.cutout, limit=args.limit,
                          num_workers=args.ffcv_workers)
    return TorchvisionLoader(beton_dir, args.batch_size, device, args.torchvision_workers, args.limit)


def run_epoch(loader, device):
    sync(device)
    t0 = time.perf_counter()
    images = batches = 0
    for x, y in loader:
        images += len(y)
        batches += 1
    sync(device)
    elapsed = time.perf_counter() - t0
    if x.shape[1:] != (3, 32, 32) or x.dtype != torch.float32 or x.device.type != device.type:
        raise RuntimeError(f"unexpected batch {tuple(x.shape)} {x.dtype} on {x.device}")
    return images, batches, elapsed


def bench(name, args, beton_dir, device):
    t0 = time.perf_counter()
    loader = make_loader(name, args, beton_dir, device)
    setup = time.perf_counter() - t0
    # after building the loader, as training does: ffcv sets torch's thread count when it starts
    threads = set_all_threads(args.threads)
    if len(loader) == 0:
        raise ValueError(f"{name}: no full batch of {args.batch_size} in the split")
    _, _, warm = run_epoch(loader, device)
    images = batches = 0
    elapsed = 0.0
    for _ in range(args.epochs):
        n, b, t = run_epoch(loader, device)
        images, batches, elapsed = images + n, batches + b, elapsed + t
    return {"loader": name, "status": "ok", "setup_s": setup, "warmup_epoch_s": warm, "timed_epochs": args.epochs,
            "images": images, "batches": batches, "time_s": elapsed, "images_per_s": images / elapsed,
            "torch_threads": threads,
            "workers": {"ffcv": args.ffcv_workers or default_workers(),
                        "torchvision": args.torchvision_workers}.get(name, 0),
            "augmentation": "translate 2 px + flip" + (f" + cutout {args.cutout}" if args.cutout else "")
            if name != "torchvision" else "RandomCrop(32, padding=2) + RandomHorizontalFlip"}


HEADER = ["loader", "images/s", "vs torchvision", "timed images", "time (s)", "warm-up epoch (s)", "setup (s)",
          "workers", "augmentation"]


def table_rows(results):
    tv = next((r["images_per_s"] for r in results["loaders"] if r["loader"] == "torchvision" and r["status"] == "ok"),
              None)
    rows = []
    for r in results["loaders"]:
        if r["status"] != "ok":
            rows.append([r["loader"], "failed", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", r["error"]])
            continue
        rows.append([r["loader"], f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / tv:.2f}x" if tv else "n/a",
                     r["images"], f"{r['time_s']:.3f}", f"{r['warmup_epoch_s']:.3f}", f"{r['setup_s']:.3f}",
                     r["workers"], r["augmentation"]])
    return rows


def render_markdown(results):
    env, st = results["environment"], results["settings"]
    return "\n".join([
        *report_header("Loader throughput (training split, augmentation on)", env,
                       f"Dataset: {dataset_line(results['dataset'])}",
                       f"Settings: device {st['device']}, batch {st['batch_size']}, {st['epochs']} timed epoch(s) "
                       "after one warm-up epoch, drop_last"),
        "",
        markdown_table(HEADER, table_rows(results)),
        "",
        "images/s: images delivered to the device as normalized float batches, over the timed epochs "
        "(synchronized at each epoch's end). Setup: building the loader (the resident loader reads the whole "
        "split onto the device then).",
    ]) + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        if ffcv_problem():  # it measures betons and ffcv's own loader
            raise ConfigError(f"the loader benchmark reads betons, which need ffcv ({ffcv_problem()}): {FFCV_INSTALL}")
        beton_dir, manifest = prepare_betons(resolve_source(args.data), args.beton_dir)
    except (DataError, ConfigError) as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.out, exist_ok=True)
    set_all_threads(args.threads)
    env = environment(device, PROG, argv)
    ds = dataset_record(manifest, args.limit, args.dataset_label)
    ds["images_used"]["test"] = 0  # only the training split is loaded
    rows = []
    for name in args.loaders:
        print(f"{name}: warm-up epoch, then {args.epochs} timed", flush=True)
        try:
            r = bench(name, args, beton_dir, device)
            print(f"{name}: {r['images_per_s']:.0f} images/s", flush=True)
        except Exception as e:  # noqa: BLE001  one broken loader must not hide the others' numbers
            r = {"loader": name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            print(f"{name}: FAILED: {r['error']}", flush=True)
        rows.append(r)
    results = {"benchmark": "loader", "environment": env, "dataset": ds,
               "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")} | {"device": device.type},
               "status": "ok" if all(r["status"] == "ok" for r in rows) else "failed", "loaders": rows}
    atomic_write_json(os.path.join(args.out, "loader.json"), results)
    md = render_markdown(results)
    atomic_write_text(os.path.join(args.out, "loader.md"), md)
    print()
    print(md)
    print(f"wrote {os.path.join(args.out, 'loader.json')} and loader.md")
    return 0 if results["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
