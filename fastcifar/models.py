"""One small CIFAR-10 network family, built with BatchNorm, GroupNorm or LayerNorm.

Layout (benchmarks/NOTES.md has the measurements behind each choice):
- a frozen 2x2 stride-2 patch-whitening stem takes 32x32 to 16x16 at almost no cost;
- four 3x3 convs; two of them max-pool before their norm, so the norm runs on a quarter of the pixels;
- global max pool and one linear layer.
GN and LN standardize their conv weights, which lets them learn about as fast as BN in a few epochs.
LayerNorm is GroupNorm with one group: statistics over (C, H, W), affine per channel, so the
norm costs 2*C parameters rather than the 2*C*H*W of nn.LayerNorm([C, H, W]).
"""
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


class StandardizedConv2d(nn.Conv2d):
    """Conv whose filters are standardized to zero mean and unit variance before use (weight standardization).

    GN and LN normalize no statistic across the batch; standardized filters restore the smooth loss
    surface BN gives, and measured, lift GN/LN's 3-epoch accuracy by about 4 points.
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

    def __init__(self, in_channels=3, patch=2, eps=5e-4):
        super().__init__()
        self.patch, self.eps = patch, eps
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
        return F.relu(F.conv2d(x, self.weight, self.bias, stride=self.patch))


def conv(norm, c_in, c_out):
    # BN already standardizes per channel over the batch: standardizing its filters too buys nothing (measured)
    Conv = nn.Conv2d if norm == "bn" else StandardizedConv2d
    return Conv(c_in, c_out, 3, padding=1, bias=False)


class Net(nn.Module):
    def __init__(self, norm="bn", widths=(32, 46), num_classes=10, fused=False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        w1, w2 = widths
        self.norm, self.fused = norm, fused
        self.stem = PatchWhitening()                                                # 32 -> 16
        self.features = nn.Sequential(
            conv(norm, self.stem.out_channels, w1), nn.MaxPool2d(2), norm_relu(norm, w1, fused),  # 16 -> 8
            conv(norm, w1, w1), norm_relu(norm, w1, fused),
            conv(norm, w1, w2), nn.MaxPool2d(2), norm_relu(norm, w2, fused),        # 8 -> 4
            conv(norm, w2, w2), norm_relu(norm, w2, fused),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(w2, num_classes)

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def make_model(norm="bn", fused=False, **kw):
    """Build the network in channels_last. Call `model.stem.fit(images)` before training."""
    return Net(norm, fused=fused, **kw).to(memory_format=torch.channels_last)


def count_params(model):
    """Every parameter, frozen ones included: the 50K budget counts what the network stores."""
    return sum(p.numel() for p in model.parameters())
