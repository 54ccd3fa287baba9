"""FusedCategoricalHead as a drop-in for the nn.Linear output layer of a categorical policy.

A policy's last layer ``nn.Linear(D, V)`` is swapped for ``FusedCategoricalHead(D, V)`` (the
state dict loads unchanged); log-probabilities, entropies, samples and a REINFORCE-style
weighted likelihood then come straight from the hidden states, never as [N, V] logits. Checked
against ``torch.distributions.Categorical`` over the materialised logits in float64.

    python examples/categorical_head.py            # N = 4096 states, D = 256, V = 32000
    python examples/categorical_head.py --tiny     # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import sys

import torch

from dvae_kernels.nn import FusedCategoricalHead


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CI)")
    args = ap.parse_args(argv)
    N, D, V = (64, 32, 1000) if args.tiny else (4096, 256, 32000)
    torch.manual_seed(0)

    # An existing policy: a trunk and an nn.Linear head, e.g. loaded from a checkpoint.
    trunk = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh())
    linear = torch.nn.Linear(D, V)
    head = FusedCategoricalHead(D, V)
    head.load_state_dict(linear.state_dict())            # the drop-in: same parameters

    states = torch.randn(N, D)
    hidden = trunk(states)                               # [N, D]
    logits_equal = torch.equal(head(hidden), linear(hidden))  # head(h) is the nn.Linear
    actions, logp_old = head.sample(hidden, generator=torch.Generator().manual_seed(1))
    advantages = torch.randn(N)
    # The fused paths go through the module's forward (DDP and FSDP hooks run).
    logp, entropy = head(hidden, targets=actions, return_entropy=True)
    loss = head(hidden, targets=actions, weights=advantages, reduction="mean") \
        - 0.01 * entropy.mean()
    loss.backward()

    # Reference: the materialised logits in float64, through torch.distributions.
    h64 = trunk(states).detach().double().requires_grad_()
    w64 = linear.weight.detach().double().requires_grad_()
    b64 = linear.bias.detach().double().requires_grad_()
    dist = torch.distributions.Categorical(logits=torch.nn.functional.linear(h64, w64, b64))
    ref_logp, ref_entropy = dist.log_prob(actions), dist.entropy()
    ref_loss = -(advantages.double() * ref_logp).mean() - 0.01 * ref_entropy.mean()
    ref_gw, ref_gb = torch.autograd.grad(ref_loss, [w64, b64])

    out = {
        "logp_err": (logp.double() - ref_logp).abs().max().item(),
        "entropy_err": (entropy.double() - ref_entropy).abs().max().item(),
        "sample_logp_err": (logp_old.double() - ref_logp).abs().max().item(),
        "loss_err": abs(loss.item() - ref_loss.item()),
        "grad_weight_err": (head.weight.grad.double() - ref_gw).abs().max().item(),
        "grad_bias_err": (head.bias.grad.double() - ref_gb).abs().max().item(),
        "trunk_grad_norm": trunk[0].weight.grad.norm().item(),
        "logits_equal": float(logits_equal),
    }
    print(f"FusedCategoricalHead N={N} D={D} V={V}")
    for k, v in out.items():
        print(f"  {k:16s} {v:.3g}")
    return out


if __name__ == "__main__":
    res = main()
    sys.exit(0 if max(v for k, v in res.items() if k.endswith("_err")) < 1e-3 else 1)
