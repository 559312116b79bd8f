"""One small CIFAR-10 network family, built with BatchNorm, GroupNorm or LayerNorm.

Layout: a full-resolution stem, then two pooled stages; the 16x16 stage has a residual conv.
LayerNorm is GroupNorm with one group: statistics over (C, H, W), affine per channel, so the
norm costs 2*C parameters rather than the 2*C*H*W of nn.LayerNorm([C, H, W]).
"""
import torch
from torch import nn

PARAM_BUDGET = 50_000
NORMS = ("bn", "gn", "ln")


def num_groups(norm, channels, min_group_size=8):
    """LN: one group. GN: the most groups that divide C and keep at least `min_group_size` channels each."""
    if norm == "ln":
        return 1
    return max(g for g in range(1, channels + 1) if channels % g == 0 and channels // g >= min_group_size) \
        if channels >= min_group_size else 1


def norm_relu(norm, channels, fused=False):
    """Norm followed by ReLU; for GN/LN optionally the fused Triton GroupNormReLU."""
    if norm == "bn":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    groups = num_groups(norm, channels)
    if fused:
        from fastcifar_kernels import GroupNormReLU
        return GroupNormReLU(groups, channels)
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.ReLU(inplace=True))


def conv_norm_relu(norm, c_in, c_out, fused=False):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm_relu(norm, c_out, fused))


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Net(nn.Module):
    def __init__(self, norm="bn", widths=(24, 40, 64), num_classes=10, fused=False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        w0, w1, w2 = widths
        self.norm, self.fused = norm, fused
        self.features = nn.Sequential(
            conv_norm_relu(norm, 3, w0, fused),            # 32x32
            nn.MaxPool2d(2),
            conv_norm_relu(norm, w0, w1, fused),           # 16x16
            Residual(conv_norm_relu(norm, w1, w1, fused)),
            nn.MaxPool2d(2),
            conv_norm_relu(norm, w1, w2, fused),           # 8x8
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(w2, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def make_model(norm="bn", fused=False, **kw):
    """Build the network in channels_last."""
    return Net(norm, fused=fused, **kw).to(memory_format=torch.channels_last)


def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
