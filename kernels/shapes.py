"""The (N, C, H, W, G) of every group norm a model runs, found by running it."""
import torch
from torch import nn

from .group_norm_relu import GroupNormReLU


def norm_shapes(model: nn.Module, input_shape, channels_last=True):
    """(N, C, H, W, G) of the input of every nn.GroupNorm / GroupNormReLU call in one forward pass of
    `model` on a random batch of `input_shape`, in call order (a module called twice appears twice)."""
    found = []
    hook = lambda m, inp, out: found.append((*inp[0].shape, m.num_groups))  # noqa: E731
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.GroupNorm, GroupNormReLU))]
    try:
        p = next(model.parameters(), torch.empty(0))
        x = torch.randn(*input_shape, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            model(x.to(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x)
    finally:
        for h in hooks:
            h.remove()
    return found
