"""PPO/GRPO-style token log-probabilities and entropies of a causal LM, without its logits.

Policy-gradient fine-tuning needs log π(token) and the entropy at every completion token;
the usual code takes ``log_softmax(model(...).logits)`` and so holds [B, T, V] logits (and as
much again in the backward). ``causal_lm_token_logprobs`` takes the last hidden states and the
LM head instead: shifted by one, padding masked, memory O(B·T + V·D).

The model is a small GPT-2 from Hugging Face ``transformers``, randomly initialised from a
``GPT2Config`` with GPT-2's vocabulary of 50,257 (no download). Checked: the log-probabilities
and entropies against ``log_softmax(model(...).logits)`` and a float64 computation; the
gradients of a GRPO-style loss in the LM head and the hidden states against the materialised
path; peak memory of one forward+backward step, fused against materialised, each measured in
a fresh process on this machine.

    python examples/gpt2_policy_logprobs.py            # checks at B, T, D = 4, 64, 64;
                                                       # memory at B, T, D = 8, 256, 128
    python examples/gpt2_policy_logprobs.py --tiny     # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

import dvae_kernels as dk

V_GPT2 = 50257


def build(B: int, T: int, D: int, seed: int = 0):
    """A random GPT-2 (2 layers, hidden D, GPT-2's vocabulary) and a right-padded batch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V_GPT2, n_positions=T, n_embd=D, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, V_GPT2, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B, 2):                              # every other sequence padded
        mask[b, T - T // (b + 2):] = 0
    advantages = torch.randn(B)                           # one per sequence (GRPO)
    return model, ids, mask, advantages


def grpo_loss(logp, entropy, keep, advantages):
    """-(A · log π) per kept token, averaged, minus an entropy bonus."""
    n = keep.sum()
    return (-(advantages[:, None] * logp * keep).sum() - 0.01 * (entropy * keep).sum()) / n


def fused_step(model, ids, mask):
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    logp, entropy = dk.causal_lm_token_logprobs(hidden, model.lm_head.weight, ids, mask,
                                                return_entropy=True)
    return hidden, logp, entropy


def materialised_step(model, ids, mask):
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    lp = torch.log_softmax(model.lm_head(hidden)[:, :-1].float(), -1)   # [B, T-1, V]
    logp = lp.gather(-1, ids[:, 1:, None])[..., 0]
    entropy = -(lp.exp() * lp).sum(-1)
    return hidden, logp, entropy


def check(B: int, T: int, D: int) -> dict[str, float]:
    model, ids, mask, adv = build(B, T, D)
    keep = (mask[:, :-1] * mask[:, 1:]).float()

    hidden, logp, entropy = fused_step(model, ids, mask)
    hidden.retain_grad()
    grpo_loss(logp, entropy, keep, adv).backward()
    g_head, g_hidden = model.lm_head.weight.grad.clone(), hidden.grad.clone()

    with torch.no_grad():                                  # the usual code, as written
        logits = model(input_ids=ids, attention_mask=mask).logits
        lp_usual = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        lp64 = torch.log_softmax((hidden.detach().double() @
                                  model.lm_head.weight.detach().double().T)[:, :-1], -1)
        logp64 = lp64.gather(-1, ids[:, 1:, None])[..., 0] * keep
        ent64 = -(lp64.exp() * lp64).sum(-1) * keep

    model.zero_grad()
    hidden_m, logp_m, entropy_m = materialised_step(model, ids, mask)
    hidden_m.retain_grad()
    grpo_loss(logp_m * keep, entropy_m * keep, keep, adv).backward()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()

    return {
        "logp_vs_model_logits_err": (logp - lp_usual * keep).abs().max().item(),
        "logp_vs_float64_err": (logp.double() - logp64).abs().max().item(),
        "entropy_vs_float64_err": (entropy.double() - ent64).abs().max().item(),
        "grad_lm_head_rel_err": rel(g_head, model.lm_head.weight.grad),
        "grad_hidden_rel_err": rel(g_hidden, hidden_m.grad),
        "grad_lm_head_norm": g_head.norm().item(),
        "grad_hidden_norm": g_hidden.norm().item(),
        "masked_positions_zero": float(bool((logp[keep == 0] == 0).all())),
    }


# --- peak memory of one step, each path in a fresh process ------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_child(path: str, B: int, T: int, D: int) -> dict:
    """Peak resident memory of one forward+backward step above what the model and inputs hold
    (VmHWM, reset through /proc/self/clear_refs once they exist)."""
    step = fused_step if path == "fused" else materialised_step
    model, ids, mask, adv = build(B, T, D)
    keep = (mask[:, :-1] * mask[:, 1:]).float()
    _, lp, ent = step(model, ids[:1, :8], mask[:1, :8])   # warm-up: load code, not the step
    grpo_loss(lp * keep[:1, :7], ent, keep[:1, :7], adv[:1]).backward()
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    _, lp, ent = step(model, ids, mask)
    grpo_loss(lp * keep, ent, keep, adv).backward()
    return {"path": path, "extra_MiB": (_status_kib("VmHWM") - base) / 1024}


def measure_memory(B: int, T: int, D: int) -> dict[str, float]:
    out = {}
    for path in ("materialised", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", path,
               "--shape", str(B), str(T), str(D)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[path] = json.loads(proc.stdout.strip().splitlines()[-1])["extra_MiB"]
    return {"mem_materialised_MiB": out["materialised"], "mem_fused_MiB": out["fused"],
            "mem_ratio": out["fused"] / out["materialised"]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CI)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory comparison")
    ap.add_argument("--shape", nargs=3, type=int, metavar=("B", "T", "D"), default=None)
    ap.add_argument("--child-memory", choices=["fused", "materialised"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    B, T, D = args.shape or ((2, 12, 32) if args.tiny else (8, 256, 128))
    if args.child_memory:
        print(json.dumps(measure_child(args.child_memory, B, T, D)))
        return {}
    out = check(*((2, 12, 32) if args.tiny else (4, 64, 64)))
    if not args.no_memory:
        out.update(measure_memory(*((2, 128, 32) if args.tiny else (B, T, D))))
    print(f"GPT-2 (random, V={V_GPT2}) policy log-probs; memory at B, T, D = "
          f"{(2, 128, 32) if args.tiny else (B, T, D)}")
    for k, v in out.items():
        print(f"  {k:26s} {v:.4g}")
    return out


if __name__ == "__main__":
    res = main()
    errs = [v for k, v in res.items() if k.endswith("_err")]
    sys.exit(0 if not errs or max(errs) < 1e-3 else 1)
