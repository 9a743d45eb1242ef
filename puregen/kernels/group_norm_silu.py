"""``puregen::group_norm_silu``: GroupNorm followed by SiLU as one custom op.

The op works everywhere: its default implementation is plain torch
(`F.group_norm` then `F.silu`, used on CPU and any device without a faster
one); on CUDA tensors, when triton is installed, it runs the fused Triton
kernel (statistics in fp32, one read-normalize-activate-write pass). A fake
implementation lets `torch.compile` trace it without running it. Forward
only: purification needs no parameter gradients (use under ``torch.no_grad``).

Importing this module does not import triton; the Triton kernel module is
imported on the first CUDA call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_support


@torch.library.custom_op("puregen::group_norm_silu", mutates_args=())
def group_norm_silu_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                       eps: float) -> torch.Tensor:
    # The default (CPU and any other device) kernel: the unfused torch ops.
    # The op promises a contiguous result, like the Triton kernel gives.
    return F.silu(F.group_norm(x, groups, weight, bias, eps)).contiguous()


@group_norm_silu_op.register_fake
def _(x, weight, bias, groups, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@group_norm_silu_op.register_kernel("cuda")
def _(x, weight, bias, groups, eps):
    if not triton_support.available():  # no triton here: the unfused ops still give the answer
        return F.silu(F.group_norm(x, groups, weight, bias, eps)).contiguous()
    from . import triton_kernels

    return triton_kernels.group_norm_silu(x, weight, bias, groups, eps)


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``F.silu(norm(x))`` through the fused op, for an `nn.GroupNorm` module."""
    return group_norm_silu_op(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
