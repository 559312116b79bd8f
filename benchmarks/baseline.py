"""The reference recipe the time-to-accuracy benchmark compares against: a plain 46,024-parameter
BatchNorm network fed by a torchvision DataLoader, trained in fp32 eager with SGD.

Layout "C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 c9 GAP c10" (C: 3x3 conv, padding 1; c: 1x1 conv; P: 2x2
max-pool; GAP: global average pool). Every conv but c10 is followed by ReLU, then BatchNorm; those
convs have no bias, c10 (nothing follows it) has one. Channel plan and parameters (conv weights +
bias, plus BN weight and bias):

    C1   3x3   3 -> 22    32x32      594 + BN  44 =    638
    C2   3x3  22 -> 32    32x32    6,336 + BN  64 =  6,400
    c3   1x1  32 -> 16    32x32      512 + BN  32 =    544
    P1                    16x16
    C3   3x3  16 -> 32    16x16    4,608 + BN  64 =  4,672
    C4   3x3  32 -> 32    16x16    9,216 + BN  64 =  9,280
    C5   3x3  32 -> 32    16x16    9,216 + BN  64 =  9,280
    c6   1x1  32 -> 16    16x16      512 + BN  32 =    544
    P2                      8x8
    C7   3x3  16 -> 32      8x8    4,608 + BN  64 =  4,672
    C8   3x3  32 -> 32      8x8    9,216 + BN  64 =  9,280
    c9   1x1  32 -> 16      8x8      512 + BN  32 =    544
    GAP                     1x1
    c10  1x1  16 -> 10               160 + bias 10 =   170
                                                     ------
                                                     46,024

With every 3x3 conv after the first at 32 channels and every 1x1 reduction to 16, C1's width is what
is left to fix the total: 22 channels give exactly 46,024 (32 would give 49,184).

Data: the uint8 arrays of the converted betons (bit-identical to the source's pixels), wrapped like
torchvision.datasets.CIFAR10 (a PIL image per item), ToTensor + Normalize and no augmentation, batch
128, 2 workers, shuffled. SGD lr 0.01, momentum 0.9, no weight decay, no schedule. Evaluated after
every epoch; stops at the target accuracy or after `epochs` (20). Time is training only (evaluation
excluded), cumulative, like fastcifar.train's train_time_s.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

from .common import ArrayDataset, load_arrays, normalize_transform, set_all_threads, sync

BASELINE_PARAMS = 46_024
# (kind, c_in, c_out): "C" 3x3 conv, "c" 1x1 conv, "P" 2x2 max-pool, "GAP" global average pool
PLAN = [("C", 3, 22), ("C", 22, 32), ("c", 32, 16), ("P",),
        ("C", 16, 32), ("C", 32, 32), ("C", 32, 32), ("c", 32, 16), ("P",),
        ("C", 16, 32), ("C", 32, 32), ("c", 32, 16), ("GAP",),
        ("c", 16, 10)]
BATCH_SIZE, NUM_WORKERS, LR, MOMENTUM, MAX_EPOCHS = 128, 2, 0.01, 0.9, 20


class BaselineNet(nn.Module):
    def __init__(self, plan=PLAN):
        super().__init__()
        layers, last_conv = [], max(i for i, p in enumerate(plan) if p[0] in "Cc")
        for i, (kind, *ch) in enumerate(plan):
            if kind == "P":
                layers.append(nn.MaxPool2d(2))
            elif kind == "GAP":
                layers.append(nn.AdaptiveAvgPool2d(1))
            elif i == last_conv:
                layers.append(nn.Conv2d(*ch, 1))
            else:
                k = 3 if kind == "C" else 1
                layers += [nn.Conv2d(*ch, k, padding=k // 2, bias=False), nn.ReLU(inplace=True),
                           nn.BatchNorm2d(ch[1])]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x).flatten(1)


def make_baseline():
    model = BaselineNet()
    n = sum(p.numel() for p in model.parameters())
    assert n == BASELINE_PARAMS, f"baseline has {n} parameters, not {BASELINE_PARAMS}"
    return model


def data_loaders(beton_dir, limit=None, seed=0, num_workers=NUM_WORKERS, batch_size=BATCH_SIZE):
    from torchvision import transforms
    tf = transforms.Compose([transforms.ToTensor(), normalize_transform()])
    g = torch.Generator()
    g.manual_seed(seed)
    train = torch.utils.data.DataLoader(ArrayDataset(*load_arrays(beton_dir, "train", limit), tf),
                                        batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=g)
    test = torch.utils.data.DataLoader(ArrayDataset(*load_arrays(beton_dir, "test", limit), tf),
                                       batch_size=1000, shuffle=False, num_workers=num_workers)
    return train, test


@torch.no_grad()
def evaluate(model, loader, device):
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return loss / n, correct / n


def train_baseline(beton_dir, device, target=0.70, epochs=MAX_EPOCHS, limit=None, seed=0, log=print,
                   num_workers=NUM_WORKERS, threads=None):
    """Train the reference recipe; returns a metrics dict shaped like fastcifar.train's."""
    device = torch.device(device)
    torch.manual_seed(seed)
    train_loader, test_loader = data_loaders(beton_dir, limit, seed, num_workers)
    set_all_threads(threads)
    model = make_baseline().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    history, train_time = [], 0.0
    for epoch in range(epochs):
        model.train()
        sync(device)
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # .item() per step is what a plain training loop does; it is part of the recipe's cost
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        sync(device)
        train_time += time.perf_counter() - t0
        if seen == 0:
            raise ValueError("the baseline's training set is empty")
        if not torch.isfinite(torch.tensor(loss_sum)):
            raise FloatingPointError(f"baseline: non-finite loss in epoch {epoch + 1}")
        t1 = time.perf_counter()
        test_loss, test_acc = evaluate(model, test_loader, device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "test_loss": test_loss, "test_acc": test_acc, "train_time_s": train_time,
                        "eval_time_s": time.perf_counter() - t1})
        log(f"baseline epoch {epoch + 1:2d}  train loss {loss_sum / seen:.3f}  test acc {100 * test_acc:.2f}%  "
            f"train time {train_time:.1f}s")
        if test_acc >= target:
            break
    hit = next((h for h in history if h["test_acc"] >= target), None)
    return {
        "recipe": "baseline", "params": BASELINE_PARAMS, "plan": [list(p) for p in PLAN],
        "batch_size": BATCH_SIZE, "num_workers": num_workers, "lr": LR, "momentum": MOMENTUM, "amp": False,
        "compile": False, "seed": seed, "epochs_planned": epochs, "epochs_run": len(history),
        "target_acc": target, "history": history,
        "time_to_target_s": hit["train_time_s"] if hit else None, "epochs_to_target": hit["epoch"] if hit else None,
        "steps_to_target": hit["epoch"] * len(train_loader) if hit else None,
        "train_time_s": train_time, "final_test_acc": history[-1]["test_acc"],
        "best_test_acc": max(h["test_acc"] for h in history), "compile_time_s": 0.0,
        "eval_time_s": sum(h["eval_time_s"] for h in history), "torch_threads": torch.get_num_threads(),
    }
