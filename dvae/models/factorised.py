"""The factorised encoder of docs/algorithm.md: the reference's "self-attention recognition
model", one output per latent token, no autoregression.

    patches(x) -> Dense(d) + sinusoidal positions -> n bidirectional blocks -> LayerNorm
    -> Dense(d) = hidden [N, L, d]  -> Dense(V) logits (categorical methods)

P = L patches (one per token). DAPS-NA, Gumbel-NA and GR-MCK-NA put a categorical head on the
hidden states; VQ-VAE and FSQ quantise them (``vocab_size=None``: no head).

For DAPS-NA it offers the interface :class:`dvae.models.DAPSAutoencoder` and the DAPS step use
with the autoregressive encoder: :meth:`encode` (the hidden states play the memory),
:meth:`sample` (K exact draws per position from the factorised q, through the same per-row
sampler, so the fused ``linear_sample_tokens`` op serves both encoders) and
:meth:`teacher_forced` (the hidden states broadcast over the K samples: q does not depend on
the other tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from . import init
from .encoder import (
    EncoderBlock,
    SelfAttention,
    at_least_fp32,
    gumbel_max_sampler,
    sinusoidal_positions,
)
from .patches import Patcher


class FactorisedEncoder(nn.Module):
    """q_θ(z|x) = Π_l q(z_l|x), or the continuous encoder of VQ-VAE / FSQ.

    Args:
        image_shape: ``(C, H, W)``.
        latent_len: L tokens (= patches).
        vocab_size: V for a categorical head; None for none (VQ-VAE, FSQ).
        d_model, num_heads, layers, mlp_ratio: the transformer (docs/algorithm.md sizes).
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_len: int,
                 vocab_size: int | None, d_model: int = 64, num_heads: int = 4,
                 layers: int = 2, mlp_ratio: int = 6):
        super().__init__()
        C, H, W = image_shape
        self.latent_len = latent_len
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.patcher = Patcher(H, W, C, latent_len)
        self.patch_proj = nn.Linear(self.patcher.patch_dim, d_model)
        self.blocks = nn.ModuleList(
            [EncoderBlock(d_model, num_heads, mlp_ratio) for _ in range(layers)])
        self.ln = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, vocab_size) if vocab_size else None
        self.register_buffer("pos", sinusoidal_positions(self.patcher.num_patches, d_model),
                             persistent=False)
        self.fp32_head = True  # the head in float32 under autocast (Config.fp32_outputs)
        self._init_weights()

    def _init_weights(self) -> None:
        """As the reference: the transformer's Dense layers (and its final Dense(d))
        Xavier-uniform with q, k, v per (d, d) projection, zero biases; the patch projection
        and the output head flax's default lecun-normal."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            if isinstance(m, SelfAttention):
                init.xavier_per_projection_(m.qkv.weight, 3)
        init.lecun_normal_(self.patch_proj)
        if self.head is not None:
            init.lecun_normal_(self.head)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] -> hidden states [N, L, d] (one per latent token)."""
        h = self.patch_proj(self.patcher.patchify(x)) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.proj(self.ln(h))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, L, V]`` float32 logits of q(z_l|x) from :meth:`encode`'s output."""
        if not self.fp32_head:
            return at_least_fp32(self.head(hidden))
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(at_least_fp32(hidden))

    def teacher_forced(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, K, L, d]``: the hidden states of each image for each of its K sequences (a
        broadcast view; ``self.head`` of it are the logits of every z_l)."""
        N, K, L = tokens.shape
        return memory[:, None].expand(N, K, L, memory.shape[-1])

    @torch.no_grad()
    def sample(self, memory: torch.Tensor, num_samples: int, *,
               generator: torch.Generator | None = None, temperature: float = 1.0,
               sampler=None) -> tuple[torch.Tensor, torch.Tensor]:
        """K independent draws per image: ``tokens [N, K, L]`` int64 and their log q per
        token ``[N, K, L]`` float32. ``sampler`` as in
        :meth:`dvae.models.ARTransformerEncoder.sample`, called once on all N·K·L rows."""
        N, L, d = memory.shape
        K = num_samples
        if sampler is None:
            sampler = gumbel_max_sampler(self.head, self.fp32_head, temperature)
        rows = memory[:, None].expand(N, K, L, d).reshape(N * K * L, d)
        tok, logp = sampler(rows, generator)
        logp = logp if logp.dtype == torch.float64 else logp.float()
        return tok.view(N, K, L), logp.view(N, K, L)
