"""fastcifar_kernels: Triton fused GroupNorm+ReLU (forward and backward) with a torch fallback.

    from fastcifar_kernels import GroupNormReLU, group_norm_relu, verify_kernel, kernel_status
"""
from .group_norm_relu import (GroupNormReLU, fused_available, fused_supported, group_norm_relu, kernel_status,
                              verify_kernel)
from .shapes import norm_shapes

__all__ = ["GroupNormReLU", "fused_available", "fused_supported", "group_norm_relu", "kernel_status", "norm_shapes",
           "verify_kernel"]
