"""The EBM's input gradient `grad_x G(x)` as a plain forward graph, for export.

ONNX has no autograd, and torch's exporter cannot translate the backward
operators that `torch.autograd.grad` records. So the gradient is traced with
`torch.func` into an FX graph whose nodes are forward operators only:
`make_fx` runs `grad(G)` symbolically (a dynamic batch) and the decompositions
below rewrite the two backward operators of our EBM that have no ONNX
counterpart. Only the input gradient is built: the parameters are constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


def _convolution_input_grad(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed,
                            output_padding, groups, output_mask):
    """`convolution_backward` for the input only: the transposed convolution with the same weight."""
    if transposed or output_mask[1] or output_mask[2]:
        raise NotImplementedError("only the input gradient of a plain convolution is exported")
    if all(s == 1 for s in stride) and all(d == 1 for d in dilation) and groups == 1:
        # Stride 1: the same as a plain convolution with the kernel flipped and its channels
        # swapped, which runtimes run much faster than a transposed convolution
        # (ONNX Runtime's CPU ConvTranspose took the EBM's gradient to half the speed of torch).
        flipped = weight.transpose(0, 1).flip(2, 3)
        pad = [weight.shape[2 + i] - 1 - padding[i] for i in range(2)]
        return F.conv2d(grad_out, flipped, None, 1, pad), None, None
    # Pick the output padding that gives back the input's size exactly (stride 2 drops rows).
    out_pad = [
        inp.shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                            + dilation[i] * (weight.shape[2 + i] - 1) + 1)
        for i in range(2)
    ]
    return F.conv_transpose2d(grad_out, weight, None, stride, padding, out_pad, groups, dilation), None, None


def _avg_pool_input_grad(grad_out, inp, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    """`avg_pool2d_backward` for non-overlapping windows: spread each gradient evenly over its window."""
    kh, kw = kernel_size
    if list(stride) not in ([], [kh, kw]) or list(padding) != [0, 0] or ceil_mode or divisor_override is not None:
        raise NotImplementedError("only non-overlapping, unpadded average pooling is exported")
    n, c, ho, wo = grad_out.shape
    # A transposed convolution per channel with a constant 1/(kh*kw) kernel; rows and
    # columns that the floor division left out of every window get no gradient.
    weight = torch.full((c, 1, kh, kw), 1.0 / (kh * kw), dtype=grad_out.dtype, device=grad_out.device)
    out_pad = (inp.shape[2] - ho * kh, inp.shape[3] - wo * kw)
    return F.conv_transpose2d(grad_out, weight, None, (kh, kw), 0, out_pad, c)


def _relu_input_grad(grad_out, out, threshold):
    """`threshold_backward` as a multiply by the mask (ONNX Runtime's Where with a broadcast scalar is slow)."""
    return grad_out * (out > threshold).to(grad_out.dtype)


def _decompositions() -> dict:
    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _convolution_input_grad
    table[aten.avg_pool2d_backward.default] = _avg_pool_input_grad
    table[aten.threshold_backward.default] = _relu_input_grad
    return table


def trace_batch(image_shape) -> int:
    """A batch size for tracing that equals no image dimension.

    Symbolic tracing gives equal sizes one symbol: traced at batch 3 on 3-channel
    images, the graph would only run where batch == channels.
    """
    return next(b for b in range(2, 1 << 16) if b not in tuple(image_shape))


class EnergyGradient(nn.Module):
    """`images -> (grad_x G(images), G(images))` as one traced forward graph (fp32, no autograd).

    The energy comes for free with the gradient; the ONNX Runtime backend
    reads it for the audit and for filt's ranking.
    """

    def __init__(self, ebm: nn.Module, image_shape: tuple[int, int, int]):
        super().__init__()
        ebm = ebm.float().eval().requires_grad_(False)
        example = torch.rand(trace_batch(image_shape), *image_shape) * 2 - 1

        def summed_energy(x):
            energy = ebm(x).reshape(-1)
            return energy.sum(), energy

        traced = make_fx(
            torch.func.grad(summed_energy, has_aux=True),
            decomposition_table=_decompositions(),
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,  # the parameters are real tensors: they become constants
        )(example)
        self.graph_module = traced

    def forward(self, images: torch.Tensor):
        grad, energy = self.graph_module(images)
        return grad, energy
