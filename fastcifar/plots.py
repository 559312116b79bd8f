"""Figures a person would rather look at than read: training curves and misclassified images."""
import numpy as np

from .io import save_figure


def _figure(**kw):
    # a bare Figure, not pyplot: no global backend is switched (a notebook keeps its inline plots), nothing to close
    from matplotlib.figure import Figure
    return Figure(**kw)


def _save(fig, path):
    save_figure(fig, path, dpi=110, bbox_inches="tight")


def plot_curves(history, path, target=None, title=""):
    ep = [h["epoch"] for h in history]
    fig = _figure(figsize=(10, 4))
    a, b = fig.subplots(1, 2)
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train (label-smoothed)")
    a.plot(ep, [h["test_loss"] for h in history], "o-", label="test")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.plot(ep, [100 * h["train_acc"] for h in history], "o-", label="train")
    b.plot(ep, [100 * h["test_acc"] for h in history], "o-", label="test")
    if target:
        b.axhline(100 * target, color="gray", ls="--", lw=1, label=f"target {100 * target:.0f}%")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)


def plot_misclassified(images, labels, preds, classes, path, n=20):
    """images: uint8 (N, 32, 32, 3); shows up to n test images the model got wrong, taken in turn from each true
    class (the first n alone would all be airplanes: the test set is sorted by class)."""
    wrong_all = np.flatnonzero(labels != preds)
    by_class = [wrong_all[labels[wrong_all] == c] for c in range(len(classes))]
    wrong = [w[i] for i in range(n) for w in by_class if i < len(w)][:n]
    cols = 5
    rows = max(1, -(-len(wrong) // cols))
    fig = _figure(figsize=(2 * cols, 2.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(f"true: {classes[labels[i]]}\npred: {classes[preds[i]]}", fontsize=8)
    fig.suptitle(f"misclassified test images ({len(wrong)} of {len(wrong_all)} shown)")
    _save(fig, path)
