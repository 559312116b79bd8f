"""fastcifar_kernels: Triton fused GroupNorm+ReLU (forward and backward) with a torch fallback.

    from fastcifar_kernels import GroupNormReLU, group_norm_relu, fused_available
"""
from .group_norm_relu import GroupNormReLU, GroupNormReLUFunction, fused_available, group_norm_relu

__all__ = ["GroupNormReLU", "GroupNormReLUFunction", "fused_available", "group_norm_relu"]
