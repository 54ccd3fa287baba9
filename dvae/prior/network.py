"""The prior's network: the authors' label- and time-conditioned transformer (a DiT with
adaLN-Zero blocks) over the noisy categories ``z_t``, predicting ``p(z₁ | z_t, t, label)`` at
every position.

Everything follows the authors' network (jadex ``networks/diffusion_transformer.py`` and
``LabelTransformerDiscreteFlowModel``, branch daps-iclr2026):

* inputs: a token embedding (flax's default init, truncated normal with std 1/√d) plus a fixed
  1-D sin-cos position embedding (sines then cosines); the time through a 256-d sinusoidal
  embedding of ``t·10000`` (cosines then sines) and Dense-SiLU-Dense (kernels N(0, 0.02²),
  zero biases); the label through an embedding of ``num_classes + 1`` rows (N(0, 0.02²)), the
  last row the "null" label of classifier-free guidance; ``c = time + label``;
* blocks: ``SiLU(c) -> Dense(6d)`` (zero init) gives shift, scale and gate of the attention and
  of the MLP; LayerNorm without scale or bias (eps 1e-6), ``x·(1 + scale) + shift``,
  bidirectional multi-head attention (Xavier-uniform q, k, v and output kernels, zero biases),
  ``x + gate·attn``; the same with an MLP (ratio 4, tanh-GELU, Xavier-uniform kernels, biases
  N(0, 1e-6²));
* output: no final norm; a Dense to V (lecun-normal, zero bias): here a
  :class:`dvae_kernels.FusedCategoricalHead`, so that the training loss is the fused
  log-probability op on the hidden states, the ``[B, P, V]`` logits never built.

Label dropout (probability 0.1 in training) is the caller's: it replaces labels by
:attr:`FlowTransformer.null_label` with its own random stream, so that a resumed run draws the
same drops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dvae_kernels import FusedCategoricalHead, linear_token_logprobs

from ..models import init
from .tokens import TokenSpace

TIME_FREQUENCIES = 256  # the sinusoidal time embedding's width (DiT's default)
MAX_PERIOD = 10_000.0


def sincos_positions(length: int, dim: int) -> torch.Tensor:
    """``[length, dim]``: ``[sin(p·ω), cos(p·ω)]`` with ``ω_i = 10000^(-i/(dim/2))``."""
    if dim % 2:
        raise ValueError(f"d_model must be even (sin-cos positions), got {dim}")
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def time_frequencies(t: torch.Tensor, dim: int = TIME_FREQUENCIES) -> torch.Tensor:
    """``[B, dim]``: ``[cos(10000·t·f), sin(10000·t·f)]``, ``f_i = exp(-ln(10000)·i/(dim/2))``
    for ``t [B]`` in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = (t.float() * MAX_PERIOD)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (bidirectional attention, then an MLP)."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads "
                             f"({num_heads})")
        self.d, self.heads = d_model, num_heads
        self.modulation = nn.Linear(d_model, 6 * d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)
        with torch.no_grad():
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)
            init.xavier_per_projection_(self.qkv.weight, 3)
            nn.init.xavier_uniform_(self.out.weight)
            nn.init.zeros_(self.qkv.bias)
            nn.init.zeros_(self.out.bias)
            for fc in (self.fc1, self.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)

    def _norm(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.d,), eps=1e-6)
        return x * (1 + scale[:, None]) + shift[:, None]

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, P, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, -1)
        h = self._norm(x, shift1, scale1)
        q, k, v = self.qkv(h).view(B, P, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + gate1[:, None] * self.out(attn.transpose(1, 2).reshape(B, P, d))
        h = self._norm(x, shift2, scale2)
        return x + gate2[:, None] * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class FlowTransformer(nn.Module):
    """``p(z₁ | z_t, t, label)`` over a :class:`TokenSpace`.

    Args:
        space: the tokenizer's categories (positions, categories per position, FSQ's mask).
        num_classes: labels ``0 .. num_classes-1``; ``num_classes`` is the null label.
        d_model, num_heads, layers, mlp_ratio: the transformer (the authors': 128, 4, 2, 4).
        backend: ``dvae_kernels`` backend of the fused head (None: automatic).
    """

    def __init__(self, space: TokenSpace, num_classes: int, *, d_model: int = 128,
                 num_heads: int = 4, layers: int = 2, mlp_ratio: int = 4,
                 backend: str | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.space = space
        self.num_classes = num_classes
        P, V = space.num_positions, space.num_categories
        self.embed = nn.Embedding(V, d_model)
        init.embedding_(self.embed)
        self.register_buffer("positions", sincos_positions(P, d_model), persistent=False)
        self.time_in = nn.Linear(TIME_FREQUENCIES, d_model)
        self.time_out = nn.Linear(d_model, d_model)
        self.label_embed = nn.Embedding(num_classes + 1, d_model)
        with torch.no_grad():
            for layer in (self.time_in, self.time_out):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
            nn.init.normal_(self.label_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(DiTBlock(d_model, num_heads, mlp_ratio)
                                    for _ in range(layers))
        self.head = FusedCategoricalHead(d_model, V, backend=backend)
        init.lecun_normal_(self.head)
        mask = space.mask()
        self.register_buffer("mask", mask if mask is not None else torch.ones(0, dtype=torch.bool),
                             persistent=False)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def hidden(self, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[B, P, d]``: the last block's output for categories ``z_t [B, P]``, times
        ``t [B]`` and labels ``[B]`` (``null_label`` for none)."""
        x = self.embed(z_t) + self.positions.to(self.embed.weight.dtype)
        c = self.time_out(F.silu(self.time_in(time_frequencies(t))))
        c = c + self.label_embed(labels)
        for block in self.blocks:
            x = block(x, c)
        return x

    def logits(self, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[B, P, V]`` float32 logits of ``p(z₁ | z_t, t, label)``, -inf where a category is
        not valid at its position (FSQ)."""
        logits = self.head(self.hidden(z_t, t, labels)).float()
        if self.mask.numel():
            logits = logits.masked_fill(~self.mask, float("-inf"))
        return logits

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                z1: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32: ``log p(z₁ | z_t, t, label)`` summed over the positions (the
        training objective; the authors' loss is its negative mean), through the fused
        log-probability op on the head, each FSQ dimension's positions against the rows of
        its own levels (the masked softmax, exactly)."""
        h = self.hidden(z_t, t, labels)
        space = self.space
        if space.levels is None:
            return self.head(h, targets=z1, ignore_index=None).sum(-1)
        total = h.new_zeros(h.shape[0], dtype=torch.float32)
        for j, level in enumerate(space.levels):
            bias = self.head.bias[:level] if self.head.bias is not None else None
            logp = linear_token_logprobs(h[:, j::space.dims], self.head.weight[:level],
                                         z1[:, j::space.dims], bias, ignore_index=None,
                                         backend=self.head.backend)
            total = total + logp.sum(-1)
        return total
