"""A MaskGIT-style masked-token loss with per-token weights, fused.

A bidirectional transformer sees a token grid with a random fraction of it replaced by [MASK]
(the fraction drawn per image from the cosine schedule) and is trained to predict the masked
tokens. Each masked token is weighted 1 / (masked tokens of its image), so every image counts
the same whatever its mask ratio. Two fused paths compute this weighted cross-entropy:
``weighted_token_nll`` on the logits, and ``FusedCategoricalHead(hidden, targets=, weights=)``
from the hidden states without the logits. Both are checked against a float64
``F.cross_entropy``.

    python examples/maskgit_weighted_ce.py            # 16 images x 16x16 tokens, V = 8192
    python examples/maskgit_weighted_ce.py --tiny     # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

import dvae_kernels as dk
from dvae_kernels.nn import FusedCategoricalHead


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CI)")
    args = ap.parse_args(argv)
    B, L, D, V = (4, 16, 32, 300) if args.tiny else (16, 256, 256, 8192)
    torch.manual_seed(0)
    MASK = V                                              # one extra embedding row

    embed = torch.nn.Embedding(V + 1, D)
    layer = torch.nn.TransformerEncoderLayer(D, nhead=4, dim_feedforward=2 * D,
                                             batch_first=True, dropout=0.0)
    head = FusedCategoricalHead(D, V)

    tokens = torch.randint(0, V, (B, L))                 # a tokenizer's codes
    ratio = torch.cos(0.5 * math.pi * torch.rand(B, 1))  # cosine schedule, per image
    masked = torch.rand(B, L) < ratio
    masked[:, 0] |= ~masked.any(1)                       # at least one masked token per image
    weights = masked / masked.sum(1, keepdim=True)       # [B, L]: 1/(masked in image), 0 else

    hidden = layer(embed(torch.where(masked, MASK, tokens)))   # [B, L, D]
    loss = head(hidden, targets=tokens, weights=weights) / B   # fused, no logits
    loss.backward()
    logits = F.linear(hidden.detach(), head.weight.detach(), head.bias.detach())
    loss_logits = dk.weighted_token_nll(logits, tokens, weights) / B

    # Reference: F.cross_entropy per token in float64, averaged over masked tokens per image.
    h64 = hidden.detach().double()
    w64 = head.weight.detach().double().requires_grad_()
    b64 = head.bias.detach().double()
    ce = F.cross_entropy(F.linear(h64, w64, b64).flatten(0, 1), tokens.flatten(),
                         reduction="none").view(B, L)
    ref = torch.stack([ce[i][masked[i]].mean() for i in range(B)]).mean()
    (ref_gw,) = torch.autograd.grad(ref, [w64])

    out = {
        "fused_head_loss_err": abs(loss.item() - ref.item()),
        "weighted_token_nll_err": abs(loss_logits.item() - ref.item()),
        "grad_weight_err": (head.weight.grad.double() - ref_gw).abs().max().item(),
        "loss": loss.item(),
        "mask_fraction": masked.float().mean().item(),
        "embed_grad_norm": embed.weight.grad.norm().item(),
    }
    print(f"MaskGIT weighted cross-entropy B={B} L={L} D={D} V={V}")
    for k, v in out.items():
        print(f"  {k:22s} {v:.3g}")
    return out


if __name__ == "__main__":
    res = main()
    sys.exit(0 if max(v for k, v in res.items() if k.endswith("_err")) < 1e-3 else 1)
