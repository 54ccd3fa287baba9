"""Stochastic vector quantisation / a dVAE tokenizer's codebook head, fused.

The encoder's output h picks code v with probability softmax(-‖h - c_v‖² / τ). With
``codebook_logits`` the same distribution is a linear layer (the ‖h‖² term cancels in the
softmax), so sampling codes, their log-probabilities, the entropy and a weighted likelihood run
through the fused linear ops without the [N, V] distance matrix; the gradient reaches both the
encoder and the codebook. Checked against the materialised distances in float64.

    python examples/codebook_vq.py            # 64 images x 256 tokens, D = 64, V = 16384
    python examples/codebook_vq.py --tiny     # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import sys

import torch

import dvae_kernels as dk


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CI)")
    ap.add_argument("--tau", type=float, default=0.5)
    args = ap.parse_args(argv)
    B, L, D, V = (4, 16, 16, 512) if args.tiny else (64, 256, 64, 16384)
    tau = args.tau
    torch.manual_seed(0)

    encoder = torch.nn.Linear(3 * 4 * 4, D)              # patches -> latent vectors
    codebook = torch.nn.Parameter(torch.randn(V, D))
    patches = torch.randn(B, L, 3 * 4 * 4)

    h = encoder(patches)                                 # [B, L, D]
    weight, bias = dk.codebook_logits(codebook, tau)     # [V, D], [V]: differentiable
    with torch.no_grad():
        codes, logq = dk.linear_sample_tokens(h, weight, bias,
                                              generator=torch.Generator().manual_seed(1))
    logp, entropy = dk.linear_token_logprobs(h, weight, codes, bias, return_entropy=True)
    # A score-function (REINFORCE / DAPS-style) update: per-sample weights on the code choices,
    # plus an entropy bonus that keeps the codebook in use.
    rewards = torch.randn(B, 1)
    loss = dk.linear_weighted_token_nll(h, weight, codes, rewards, bias) / B - 0.1 * entropy.mean()
    loss.backward()

    # Reference: the distances materialised in float64, a few images at a time so that the
    # [chunk, L, V] matrices (and their autograd graph) fit in memory at the full size.
    h64 = encoder(patches).detach().double()
    c64 = codebook.detach().double().requires_grad_()
    ref_gc = torch.zeros_like(c64)
    ref_logp, ref_entropy, ref_loss = [], [], 0.0
    chunk = max(1, (1 << 24) // (L * V))  # about 128 MiB of float64 distances per chunk
    for i in range(0, B, chunk):
        hc = h64[i:i + chunk]
        d2 = ((hc ** 2).sum(-1, keepdim=True) - 2 * hc @ c64.T
              + (c64 ** 2).sum(-1))                  # ‖h - c‖², [chunk, L, V]
        lp = torch.log_softmax(-d2 / tau, -1)
        lp_tok = lp.gather(-1, codes[i:i + chunk, ..., None])[..., 0]
        ent = -(lp.exp() * lp).sum(-1)
        part = -(rewards[i:i + chunk].double() * lp_tok).sum() / B - 0.1 * ent.sum() / (B * L)
        ref_gc += torch.autograd.grad(part, [c64])[0]
        ref_logp.append(lp_tok.detach())
        ref_entropy.append(ent.detach())
        ref_loss += part.item()
    ref_logp, ref_entropy = torch.cat(ref_logp), torch.cat(ref_entropy)

    out = {
        "logp_err": (logp.double() - ref_logp).abs().max().item(),
        "sample_logq_err": (logq.double() - ref_logp).abs().max().item(),
        "entropy_err": (entropy.double() - ref_entropy).abs().max().item(),
        "loss_err": abs(loss.item() - ref_loss),
        "grad_codebook_err": (codebook.grad.double() - ref_gc).abs().max().item()
        / max(1.0, ref_gc.abs().max().item()),
        "encoder_grad_norm": encoder.weight.grad.norm().item(),
        "codes_used": codes.unique().numel(),
    }
    print(f"codebook head B={B} L={L} D={D} V={V} tau={tau}")
    for k, v in out.items():
        print(f"  {k:18s} {v:.3g}")
    return out


if __name__ == "__main__":
    res = main()
    sys.exit(0 if max(v for k, v in res.items() if k.endswith("_err")) < 1e-3 else 1)
