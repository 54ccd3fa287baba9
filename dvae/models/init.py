"""The authors' initialisation (docs/algorithm.md), as flax defines it, for torch layers.

* Dense layers outside the transformer (patch projection, MLP decoder) and all convolutions:
  ``lecun_normal`` (flax's default kernel init: a normal truncated at ±2σ, rescaled so that the
  variance is exactly 1/fan_in) with zero bias. fan_in counts the kernel's input features times
  its receptive field; for a transposed convolution that is ``in_channels·kh·kw`` (flax's
  kernel layout is (kh, kw, in, out)), not what torch's own fan computation reads off its
  ``[in, out, kh, kw]`` weight.
* Transformer layers: Xavier-uniform kernels (the reference's ``kernel_init: xavier``), with
  q, k and v each initialised as its own (d, d) projection, as flax's multi-head attention
  does, even where dvae fuses them into one [3d, d] or [2d, d] weight. The reference's
  transformer biases are N(0, 1e-6²); dvae's are zero (a difference far below float32
  resolution of the first step's update).
* The decoder's token embedding: flax's default embedding init, a truncated normal with
  standard deviation 1/√d. The encoder's token embedding is N(0, 1), as the reference sets it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Standard deviation of a unit normal truncated to [-2, 2] (flax's variance_scaling constant).
_TRUNC_STD = 0.87962566103423978


@torch.no_grad()
def truncated_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``t`` from a normal truncated at ±2 of its scale, whose standard deviation is
    exactly ``std`` (flax's ``variance_scaling(..., "truncated_normal")``)."""
    # Inverse-CDF sampling of N(0, 1) restricted to [-2, 2] (as torch's trunc_normal_, written
    # out so that it also runs on fake tensors: bench.gpu_model builds models shape-only).
    scale = std / _TRUNC_STD
    cdf = 0.5 * (1 + math.erf(-2 / math.sqrt(2)))  # Φ(-2)
    t.uniform_(2 * cdf - 1, 1 - 2 * cdf).erfinv_().mul_(scale * math.sqrt(2.0))
    return t.clamp_(-2 * scale, 2 * scale)


def fan_in(module: nn.Module) -> int:
    """Input features times receptive field, for Linear, Conv and ConvTranspose layers."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return w.shape[1]
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return module.in_channels // module.groups * math.prod(w.shape[2:])
    return w.shape[1] * math.prod(w.shape[2:])


@torch.no_grad()
def lecun_normal_(module: nn.Module) -> None:
    """flax's default Dense/Conv init: truncated-normal kernel with variance 1/fan_in, zero
    bias."""
    truncated_normal_(module.weight, 1.0 / math.sqrt(fan_in(module)))
    if module.bias is not None:
        nn.init.zeros_(module.bias)


@torch.no_grad()
def xavier_per_projection_(weight: torch.Tensor, parts: int) -> None:
    """Xavier-uniform on each of the ``parts`` stacked [d_out, d_in] blocks of a fused
    projection weight ``[parts·d_out, d_in]`` (q, k, v initialised as separate layers)."""
    for block in weight.chunk(parts, dim=0):
        nn.init.xavier_uniform_(block)


@torch.no_grad()
def embedding_(embed: nn.Embedding) -> None:
    """flax's default embedding init: truncated normal, standard deviation 1/√d."""
    truncated_normal_(embed.weight, 1.0 / math.sqrt(embed.weight.shape[1]))
