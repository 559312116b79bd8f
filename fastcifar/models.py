"""The CIFAR-10 network family: four layouts, each with BatchNorm, GroupNorm or LayerNorm.

Every layout (benchmarks/NOTES.md has the measurements behind each choice, benchmarks/RESULTS.md what they
reach) is a frozen 2x2
patch-whitening stem, then 3x3 convs, some max-pooling before their norm so that the norm runs on a
quarter of the pixels, then global max pool and one linear layer:
- `lean` (the fast preset): a stride-2 stem takes 32x32 to 16x16; four convs on 8x8 and 4x4 maps.
  Fewest FLOPs per point of accuracy in 2-3 epochs.
- `deep`: a stride-1 stem keeps 32x32; six convs on 16x16, 8x8 and 4x4 maps. The same
  parameter budget spends more FLOPs per image at higher resolution, which is what 20 epochs
  can afford and what the lean layout lacked (it underfits: train accuracy equals test accuracy).
- `deep8`: deep without its conv on 4x4 maps; those parameters widen the convs on 16x16 and 8x8 maps instead.
- `separable` (the best preset): deep's stem and resolutions, but each conv is depthwise 3x3 then
  pointwise 1x1 (one norm after the pair). A 3x3 filter costs 9*C parameters instead of 9*C*C', so the
  same budget buys several times the width, and fewer multiply-adds.
- `separable-res` (the best preset for bn): separable's budget in eight pairs instead of seven, two of them
  with a shortcut (x + block(x)), the last pair on 8x8 maps.
- `separable-res-gelu`: separable-res with GELU after each norm instead of ReLU.
GN and LN standardize their conv weights (a separable pair: its composite filter), which lets them learn
about as fast as BN in a few epochs.
LayerNorm is GroupNorm with one group: statistics over (C, H, W), affine per channel, so the
norm costs 2*C parameters rather than the 2*C*H*W of nn.LayerNorm([C, H, W]).
"""
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

PARAM_BUDGET = 50_000
NORMS = ("bn", "gn", "ln")


def num_groups(norm, channels, min_group_size=8):
    """LN: one group. GN: the most groups that divide C and keep at least `min_group_size` channels each."""
    if norm == "ln":
        return 1
    return max(g for g in range(1, channels + 1) if channels % g == 0 and channels // g >= min_group_size) \
        if channels >= min_group_size else 1


ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def norm_relu(norm, channels, fused=False, act="relu"):
    """Norm followed by ReLU (or `act`); for GN/LN optionally the fused Triton GroupNormReLU, which is ReLU's
    alone: GroupNorm and another activation run unfused."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if norm == "bn":
        return nn.Sequential(nn.BatchNorm2d(channels), ACTIVATIONS[act]())
    groups = num_groups(norm, channels)
    if fused and act == "relu":
        from fastcifar_kernels import GroupNormReLU
        return GroupNormReLU(groups, channels)
    return nn.Sequential(nn.GroupNorm(groups, channels), ACTIVATIONS[act]())


class StandardizedConv2d(nn.Conv2d):
    """Conv whose filters are standardized to zero mean and unit variance before use (weight standardization).

    GN and LN normalize no statistic across the batch; standardized filters restore the smooth loss
    surface BN gives, and lift GN/LN's few-epoch accuracy (benchmarks/NOTES.md).
    """

    def forward(self, x):
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) * torch.rsqrt(var + 1e-5), self.bias)


class PatchWhitening(nn.Module):
    """Frozen k x k stride-k conv whose filters whiten the data's patches, then a learnable bias and ReLU.

    Filters are +-(eigenvectors / sqrt(eigenvalue + eps)) of the patch covariance, so the ReLU keeps
    both signs of each whitened direction. `fit` sets them from images; until then they are the
    identity basis, so an unfitted model still runs (as a plain space-to-depth stem).
    """

    def __init__(self, in_channels=3, patch=2, eps=5e-4, stride=None):
        super().__init__()
        self.patch, self.eps, self.stride = patch, eps, stride or patch
        n = in_channels * patch * patch
        basis = torch.eye(n).view(n, in_channels, patch, patch)
        self.weight = nn.Parameter(torch.cat([basis, -basis]), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(2 * n))

    @property
    def out_channels(self):
        return self.weight.shape[0]

    @torch.no_grad()
    def fit(self, images):
        """Set the filters from normalized float images (N, C, H, W): the patches this layer will see."""
        n = self.weight.shape[0] // 2
        if images.ndim != 4 or images.shape[1] != self.weight.shape[1] or len(images) == 0:
            raise ValueError(f"fit wants a non-empty (N, {self.weight.shape[1]}, H, W) batch, "
                             f"got {tuple(images.shape)}")
        b, c, h, w = images.shape
        k = self.patch
        # non-overlapping k x k patches, each flattened in the filters' (C, kh, kw) order
        patches = images[:, :, : h // k * k, : w // k * k].reshape(b, c, h // k, k, w // k, k)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(-1, n).double()
        patches -= patches.mean(0)
        eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigvec / (eigval.clamp_min(0) + self.eps).sqrt()).T.to(self.weight.dtype)
        self.weight.copy_(torch.cat([filters, -filters]).view_as(self.weight))
        return self

    def forward(self, x):
        if self.stride == 1:  # overlapping patches: pad so the map keeps the input's size
            x = F.pad(x, (0, self.patch - 1, 0, self.patch - 1), mode="replicate")
        return F.relu(F.conv2d(x, self.weight, self.bias, stride=self.stride))


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1: 9*C + C*C' parameters for what a 3x3 conv spends 9*C*C' on.

    standardize=True (gn, ln) standardizes the pair's composite 3x3 filter, pointwise[o, i] * depthwise[i], to
    zero mean and unit variance, as StandardizedConv2d does a full conv's. Standardizing either factor alone
    is not that: GN and LN then learn far slower than with full convs (benchmarks/NOTES.md).
    """

    def __init__(self, c_in, c_out, standardize=False):
        depthwise = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        super().__init__(depthwise, CompositeStandardizedPointwise(depthwise, c_out) if standardize
                         else nn.Conv2d(c_in, c_out, 1, bias=False))

    @property
    def standardize(self):
        return isinstance(self[1], CompositeStandardizedPointwise)


class CompositeStandardizedPointwise(nn.Conv2d):
    """The pointwise half of a standardized SeparableConv2d. Its filters are projected off each depthwise
    filter's DC gain, which zeroes the composite filter's mean, then scaled to the composite's unit variance.
    All of it is weight-space arithmetic: subtracting the mean from every tap instead needs a per-pixel pass
    over the output, which made a training step several times slower on the CPU (benchmarks/NOTES.md)."""

    def __init__(self, depthwise, c_out):
        super().__init__(depthwise.out_channels, c_out, 1, bias=False)
        self.__dict__["depthwise"] = depthwise  # read, not owned: the pair registers it

    def composite_weight(self):
        d, w = self.depthwise.weight.flatten(1), self.weight.flatten(1)  # (C, 9), (C', C)
        gain = d.sum(1)
        # elementwise sums, not matmuls: autocast would take those to bf16
        w = w - (w * gain).sum(1, keepdim=True) * gain / (gain * gain).sum().clamp_min(1e-12)
        var = (w * w * (d * d).sum(1)).sum(1, keepdim=True) / d.numel()
        return (w * torch.rsqrt(var + 1e-5)).view_as(self.weight)

    def forward(self, x):
        return self._conv_forward(x, self.composite_weight(), None)


def conv(norm, c_in, c_out, separable=False):
    # BN already standardizes per channel over the batch: standardizing its filters too buys nothing (measured)
    if separable:
        return SeparableConv2d(c_in, c_out, standardize=norm != "bn")
    Conv = nn.Conv2d if norm == "bn" else StandardizedConv2d
    return Conv(c_in, c_out, 3, padding=1, bias=False)


class Block(NamedTuple):
    width: int   # output channels of the block's conv (or depthwise + pointwise pair)
    pool: bool   # 2x2 max-pool after the conv, before the norm: the norm runs on a quarter of the pixels
    residual: bool = False  # add the block's input to its output (same width, no pool)


class Residual(nn.Sequential):
    """x + block(x): a shortcut costs no parameters, and keeps a deeper stack of blocks trainable."""

    def forward(self, x):
        return x + super().forward(x)


class Layout(NamedTuple):
    stem_stride: int
    blocks: tuple        # of Block
    separable: bool = False
    act: str = "relu"    # the blocks' activation (the whitening stem's stays ReLU: its +-filter pairs need it)

    @classmethod
    def parse(cls, spec, stem_stride=1, act="relu"):
        """A layout from a spec such as "d36p d48 d64 d64r": c = 3x3 conv, d = depthwise + pointwise pair (all
        blocks one kind), the number its width, p a max-pool before its norm, r a shortcut around the block."""
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
        kinds = {tok[:1] for tok in spec.split()}
        if not spec.split() or not kinds <= {"c", "d"} or len(kinds) != 1:
            raise ValueError(f"layout spec {spec!r}: blocks are c<width>[p|r] or d<width>[p|r], all of one kind")
        tokens = [re.fullmatch(r"[cd](\d+)([pr]?)", t) for t in spec.split()]
        if not all(tokens):
            raise ValueError(f"layout spec {spec!r}: a block is its kind, a whole-number width and at most one of "
                             f"p (pool) or r (shortcut)")
        blocks = tuple(Block(int(m[1]), m[2] == "p", m[2] == "r") for m in tokens)
        return cls(stem_stride, blocks, separable=kinds == {"d"}, act=act)


def _blocks(*pairs):
    return tuple(Block(w, p) for w, p in pairs)


# every layout stays under PARAM_BUDGET
ARCHS = {
    "lean": Layout(2, _blocks((32, True), (32, False), (46, True), (46, False))),  # 16 -> 8 -> 4
    # lean with GELU after each norm: +0.8 points in the same steps, but a dearer step on the CPU (not a preset's)
    "lean-gelu": Layout(2, _blocks((32, True), (32, False), (46, True), (46, False)), act="gelu"),
    "deep": Layout(1, _blocks((20, True), (20, False), (32, True), (32, False), (40, True), (40, False))),  # 32 -> 4
    "deep8": Layout(1, _blocks((20, True), (28, False), (36, True), (40, False), (44, True))),  # 32 -> 16 -> 8 -> 4
    "separable": Layout(1, _blocks((36, True), (48, False), (64, False), (72, True), (104, False), (104, True),
                                   (136, False)), separable=True),
    # separable's parameters in eight pairs, two of them behind a shortcut, the last conv on 8x8 maps
    "separable-res": Layout.parse("d36p d48 d64 d64r d80p d96 d96r d112p"),
    # the same with GELU after each norm: smooth where ReLU is flat, for the same parameters
    "separable-res-gelu": Layout.parse("d36p d48 d64 d64r d80p d96 d96r d112p", act="gelu"),
}


class Net(nn.Module):
    def __init__(self, norm="bn", arch="lean", num_classes=10, fused=False):
        """arch: a name in ARCHS, or a Layout of one's own."""
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        if not isinstance(arch, Layout) and arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        layout = arch if isinstance(arch, Layout) else ARCHS[arch]
        self.stem = PatchWhitening(stride=layout.stem_stride)
        blocks, c = [], self.stem.out_channels
        for width, pool, residual in layout.blocks:
            if residual and (pool or width != c):
                raise ValueError(f"a shortcut needs a block that keeps its input's shape ({c} -> {width} channels"
                                 f"{', pooled' if pool else ''})")
            block = [conv(norm, c, width, layout.separable), *([nn.MaxPool2d(2)] if pool else []),
                     norm_relu(norm, width, fused, layout.act)]
            blocks += [Residual(*block)] if residual else block
            c = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def make_model(norm="bn", arch="lean", fused=False):
    """Build the network (arch: a name in ARCHS or a Layout) in channels_last. Call `model.stem.fit(images)`
    before training."""
    return Net(norm, arch, fused=fused).to(memory_format=torch.channels_last)


def count_params(model):
    """Every parameter, frozen ones included: the 50K budget counts what the network stores."""
    return sum(p.numel() for p in model.parameters())
