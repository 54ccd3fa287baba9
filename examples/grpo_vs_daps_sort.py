"""GRPO against the DAPS update, training a small causal LM on a verifiable toy task, on a CPU.

The task: read a string of digits and emit it sorted (``3 1 4 1 5 | 1 1 3 4 5``); the reward of
a completion is the fraction of its positions that are right. Both methods train the same
model from the same initialisation with the same optimiser, sample the same number of
completions per step (P prompts × K completions, from the fused sampler of
``FusedCategoricalHead``) and get the same training wall-clock, their steps alternating so
that a machine whose speed drifts weighs on both alike; only the loss differs:

* GRPO (``dvae_kernels.policy.grpo_loss``): advantages ``(r - mean_K r) / std_K r``, the
  on-policy surrogate (one update per batch: ratio 1, no clipping), each sequence's mean over
  its completion tokens;
* DAPS (``dvae_kernels.policy.daps_policy_loss``): the trust-region weights ``softmax_K(A/η)``
  with η solved so that the group's mean effective sample size is ``ess_target·K``, and the
  weighted likelihood of the completions.

Both losses run on the model's hidden states and the head's weight: the ``[B, T, V]`` logits
are never built. Every ``--eval-every`` steps the greedy completions of a fixed set of prompts
are scored (exact-position accuracy). Writes ``curves.csv`` and ``curves.png`` (reward and
greedy accuracy against wall-clock and against steps) in ``--out``.

    python examples/grpo_vs_daps_sort.py                 # 6 digits, 150 s per method
    python examples/grpo_vs_daps_sort.py --tiny          # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dvae_kernels import FusedCategoricalHead, policy

DIGITS, SEP, BOS = 10, 10, 11
VOCAB = 12


class TinyLM(nn.Module):
    """A causal transformer: token and position embeddings, pre-norm blocks, a final norm
    and a fused categorical head (``head(h)`` are the logits; the losses never build them)."""

    def __init__(self, length: int, d: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = FusedCategoricalHead(d, VOCAB)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        x = self.embed(ids) + self.pos[:T]
        return self.norm(self.blocks(x, mask=mask, is_causal=True))


def make_prompts(n: int, digits: int, g: torch.Generator) -> torch.Tensor:
    """[n, digits + 2]: BOS, the digits, SEP."""
    body = torch.randint(0, DIGITS, (n, digits), generator=g)
    return torch.cat([torch.full((n, 1), BOS), body, torch.full((n, 1), SEP)], 1)


def rewards_of(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """The fraction of each completion's positions equal to the sorted digits."""
    target = prompts[:, 1:-1].sort(-1).values
    return (completions == target).float().mean(-1)


@torch.no_grad()
def generate(model: TinyLM, prompts: torch.Tensor, length: int,
             generator: torch.Generator | None) -> torch.Tensor:
    """``length`` tokens after each prompt: sampled at temperature 1 through the fused
    sampler, or greedy (``generator=None``)."""
    ids = prompts
    for _ in range(length):
        h = model.hidden(ids)[:, -1]
        if generator is None:
            nxt = model.head(h).argmax(-1)
        else:
            nxt, _ = model.head.sample(h, generator=generator)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[:, prompts.shape[1]:]


class Run:
    """One method's training, a step at a time (the two runs alternate steps, so that a
    machine that slows down or speeds up during the comparison weighs on both alike)."""

    def __init__(self, method: str, args, seed: int):
        torch.manual_seed(seed)  # the same initial model for both methods
        self.method, self.args, n = method, args, args.digits
        self.model = TinyLM(2 * n + 2, d=args.d)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.g = torch.Generator().manual_seed(seed + 1)  # the same prompts for both
        self.sample_g = torch.Generator().manual_seed(seed + 2)
        self.eval_prompts = make_prompts(args.eval_prompts, n, torch.Generator().manual_seed(99))
        self.completion = torch.zeros(args.prompts * args.k, 2 * n + 2, dtype=torch.long)
        self.completion[:, n + 2:] = 1  # the completion's tokens: the loss's mask
        self.steps, self.spent, self.rows = 0, 0.0, []

    @property
    def done(self) -> bool:
        return self.spent >= self.args.seconds or self.steps >= self.args.max_steps

    def step(self) -> None:
        args, model, n = self.args, self.model, self.args.digits
        t0 = time.perf_counter()
        prompts = make_prompts(args.prompts, n, self.g).repeat_interleave(args.k, 0)
        done = generate(model, prompts, n, self.sample_g)  # [P·K, n]
        rewards = rewards_of(prompts, done).view(args.prompts, args.k)
        ids = torch.cat([prompts, done], 1)
        hidden = model.hidden(ids)
        if self.method == "grpo":
            loss = policy.grpo_loss(hidden, model.head.weight, ids,
                                    policy.group_advantages(rewards),
                                    completion_mask=self.completion,
                                    lm_head_bias=model.head.bias).loss
        else:
            out = policy.daps_policy_loss(hidden, model.head.weight, ids, rewards,
                                          completion_mask=self.completion,
                                          ess_target=args.ess, lm_head_bias=model.head.bias)
            loss = out.loss / n  # per token, as GRPO's: the same learning rate serves both
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.spent += time.perf_counter() - t0  # training time: the evaluation is not counted
        self.steps += 1
        row = {"method": self.method, "step": self.steps, "seconds": round(self.spent, 3),
               "mean_reward": rewards.mean().item(), "greedy_accuracy": math.nan}
        if self.steps % args.eval_every == 0 or self.done:
            greedy = generate(model, self.eval_prompts, n, None)
            row["greedy_accuracy"] = rewards_of(self.eval_prompts, greedy).mean().item()
        self.rows.append(row)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method in ("grpo", "daps"):
        r = [x for x in rows if x["method"] == method]
        ev = [x for x in r if not math.isnan(x["greedy_accuracy"])]
        smooth = torch.tensor([x["mean_reward"] for x in r])
        k = max(1, len(r) // 30)
        smooth = F.avg_pool1d(smooth[None, None], k, 1, k // 2, count_include_pad=False)[0, 0]
        axes[0].plot([x["seconds"] for x in r], smooth[:len(r)].tolist(), label=method)
        axes[1].plot([x["step"] for x in r], smooth[:len(r)].tolist(), label=method)
        axes[2].plot([x["seconds"] for x in ev], [x["greedy_accuracy"] for x in ev],
                     marker="o", label=method)
    axes[0].set(xlabel="training seconds", ylabel="mean reward of the samples (smoothed)")
    axes[1].set(xlabel="steps", ylabel="mean reward of the samples (smoothed)")
    axes[2].set(xlabel="training seconds", ylabel="greedy accuracy, held-out prompts")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("sorting digits: GRPO vs the DAPS update, same samples per step and time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="seconds, small model (CI)")
    ap.add_argument("--digits", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=16, help="P prompts per step")
    ap.add_argument("--k", type=int, default=8, help="K completions per prompt")
    ap.add_argument("--seconds", type=float, default=150.0, help="training time per method")
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--ess", type=float, default=0.33, help="DAPS's target ESS, a fraction of K")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/grpo_vs_daps_sort")
    args = ap.parse_args(argv)
    if args.tiny:
        args.digits, args.prompts, args.k, args.d = 3, 4, 4, 32
        args.seconds, args.max_steps, args.eval_every, args.eval_prompts = 30.0, 6, 3, 32
    runs = [Run(method, args, args.seed) for method in ("grpo", "daps")]
    while not all(r.done for r in runs):
        for r in runs:
            if not r.done:
                r.step()
    rows = [row for r in runs for row in r.rows]
    for r in runs:
        last = r.rows[-1]
        print(f"{r.method}: {last['step']} steps in {last['seconds']:.0f} s, mean reward "
              f"{last['mean_reward']:.3f}, greedy accuracy {last['greedy_accuracy']:.3f}",
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "curves.png")
    print(f"wrote {out / 'curves.csv'} and {out / 'curves.png'}")
    return {f"{r.method}_{k}": r.rows[-1][k] for r in runs
            for k in ("step", "seconds", "mean_reward", "greedy_accuracy")}


if __name__ == "__main__":
    main(sys.argv[1:])
