"""Batches on the training device: a device-resident loader (default) and ffcv's streaming Loader.

Both yield (images, labels): images normalized float in channels_last, labels int64, on `device`.
Augmentation runs on that device, vectorized over the batch. The resident loader reads a beton or a cached
array file (prepare_data gives either); ffcv's Loader streams betons only.
"""
import functools

import numpy as np
import torch

from ..device import ConfigError, default_workers
from .arrays import SUFFIX as ARRAY_SUFFIX, read_arrays
from .beton import read_beton, validate_beton
from .prepare import FFCV_INSTALL, ffcv_problem

# per-channel statistics of the CIFAR-10 training set, 0..255 scale
MEAN = (125.31, 122.95, 113.87)
STD = (62.99, 62.09, 66.70)


def subset_indices(n, limit):
    """A fixed spread of `limit` of n images: betons are sorted by class, so a prefix would be one class."""
    return np.sort(np.random.default_rng(0).permutation(n)[:limit])


def read_split(path):
    """(images uint8 (N,32,32,3), labels int64 (N,)) from a beton or an array file, the same for the same source."""
    return read_arrays(path) if str(path).endswith(ARRAY_SUFFIX) else read_beton(path)


def augment(x, generator, translate=2, flip=True, cutout=0):
    """Random translate (zero padding), horizontal flip and cutout for a uint8 (B, C, H, W) batch."""
    b, _, h, w = x.shape
    dev = x.device
    if translate:
        padded = torch.nn.functional.pad(x, (translate,) * 4)
        dy, dx = (torch.randint(0, 2 * translate + 1, (2, b), device=dev, generator=generator))
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]
        # advanced indexing puts the gathered (B, H, W) dims first: the result is NHWC in memory
        x = padded[torch.arange(b, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    if cutout:
        cy, cx = torch.randint(0, h, (b,), device=dev, generator=generator), \
            torch.randint(0, w, (b,), device=dev, generator=generator)
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        # rows cy - cutout//2 .. cy - cutout//2 + cutout - 1: exactly cutout wide (clipped at the border)
        top, left = cy - cutout // 2, cx - cutout // 2
        dy, dx = ys[None, :, None] - top[:, None, None], xs[None, None, :] - left[:, None, None]
        inside = (dy >= 0) & (dy < cutout) & (dx >= 0) & (dx < cutout)
        x = x * ~inside[:, None]
    return x


@functools.lru_cache(maxsize=None)
def _mean_std(device, dtype):
    # built once per device: a fresh torch.tensor per batch would be a host-to-device copy every step
    return (torch.tensor(MEAN, device=device, dtype=dtype).view(1, 3, 1, 1),
            torch.tensor(STD, device=device, dtype=dtype).view(1, 3, 1, 1))


def normalize(x, dtype=torch.float32):
    """uint8 (B, C, H, W) -> normalized float in channels_last."""
    mean, std = _mean_std(x.device, dtype)
    return ((x.to(dtype) - mean) / std).contiguous(memory_format=torch.channels_last)


class ResidentLoader:
    """The whole split lives on the device as one uint8 tensor; each batch is augmented there."""

    def __init__(self, path, batch_size, device, train, seed=0, translate=2, flip=True, cutout=0,
                 limit=None, drop_last=None):
        images, labels = read_split(path)
        if limit:
            keep = subset_indices(len(labels), limit)
            images, labels = images[keep], labels[keep]
        # NHWC bytes seen as NCHW: channels_last from the start, no copy
        self.images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(labels).to(device)
        self.batch_size, self.device, self.train = batch_size, torch.device(device), train
        self.aug = dict(translate=translate, flip=flip, cutout=cutout) if train else None
        self.drop_last = train if drop_last is None else drop_last
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def sample(self, n):
        """A fixed spread of n normalized, unaugmented images (e.g. to fit the whitening stem)."""
        return normalize(self.images[torch.from_numpy(subset_indices(len(self.labels), n)).to(self.device)])

    def __iter__(self):
        n = len(self.labels)
        order = (torch.randperm(n, device=self.device, generator=self.generator) if self.train
                 else torch.arange(n, device=self.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.aug:
                x = augment(x, self.generator, **self.aug)
            yield normalize(x), self.labels[idx]


class FFCVLoader:
    """ffcv's Loader decodes on its CPU workers; the same augmentation then runs after ToDevice."""

    def __init__(self, beton, batch_size, device, train, seed=0, translate=2, flip=True, cutout=0,
                 num_workers=None, limit=None, drop_last=None):
        problem = ffcv_problem()
        if problem:
            raise ConfigError(f"--loader ffcv needs ffcv, and {problem}: {FFCV_INSTALL}, or use --loader resident")
        if str(beton).endswith(ARRAY_SUFFIX):
            raise ConfigError(f"--loader ffcv streams betons, and {beton} is an array file: use --loader resident")
        self.size = validate_beton(beton)  # before ffcv's Loader, which trusts every size and pointer in the file
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
        device = torch.device(device)
        self.beton, self.train, self.device = beton, train, device
        self.aug = dict(translate=translate, flip=flip, cutout=cutout) if train else None
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        non_blocking = device.type == "cuda"
        self.loader = Loader(
            beton, batch_size=batch_size, num_workers=num_workers or default_workers(),
            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, seed=seed,
            drop_last=train if drop_last is None else drop_last,
            # uint64 like ffcv's own default: int64 indices meet uint64 inside ffcv and become float64
            indices=subset_indices(self.size, limit).astype(np.uint64) if limit else None,
            pipelines={
                "image": [SimpleRGBImageDecoder(), ToTensor(), ToDevice(device, non_blocking),
                          ToTorchImage(channels_last=True)],
                "label": [IntDecoder(), ToTensor(), Squeeze(-1), ToDevice(device, non_blocking)],
            })

    def __len__(self):
        return len(self.loader)

    def state_dict(self):
        # ffcv orders each epoch by seed + its epoch counter: without it a resumed run replays epoch 1's order
        return {"generator": self.generator.get_state(), "epoch": self.loader.next_epoch}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.loader.next_epoch = state["epoch"]

    def sample(self, n):
        """A fixed spread of n normalized, unaugmented images (e.g. to fit the whitening stem)."""
        images, _ = read_beton(self.beton, indices=subset_indices(self.size, n))
        return normalize(torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2))

    def __iter__(self):
        for x, y in self.loader:
            if self.aug:
                x = augment(x, self.generator, **self.aug)
            yield normalize(x), y.long()


LOADERS = {"resident": ResidentLoader, "ffcv": FFCVLoader}
