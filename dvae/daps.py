"""The DAPS objective of docs/algorithm.md, on the dvae_kernels ops.

For a batch of N images with K sampled latent sequences each:

    rewards   r_ik = log p_φ(x_i|z_ik)                         (detached)
    logq      ℓ_ik = Σ_l log softmax(logits_ikl)[z_ikl]         (teacher-forced)
    weights   w_ik = softmax_k((r_ik − b_i − β·sg(ℓ_ik)) / (η + β))   any per-row b_i cancels
    ESS_i = 1 / Σ_k w_ik²
    L_enc = −(1/N) Σ_ik sg(w_ik) ℓ_ik                           weighted maximum likelihood
    L_dec = −(1/(N·K)) Σ_ik log p_φ(x_i|z_ik)                   (or over K′ of the K: below)
    L_eta = (mean_i ESS_i − ρK)²                                 (learned η: gradient in log η)

:func:`daps_losses` composes the pieces, each in its own profiling range: it is what the
training step runs and what the tests check against a float64 transcription of §1.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

import dvae_kernels


def beta_at(step: int, total_steps: int, beta_start: float, beta_end: float) -> float:
    """Exponential annealing from ``beta_start`` at step 0 to ``beta_end`` at ``total_steps``
    (constant afterwards): ``beta_start · (beta_end / beta_start) ** min(step / total, 1)``."""
    if total_steps <= 0:
        return beta_end
    frac = min(max(step, 0) / total_steps, 1.0)
    return beta_start * (beta_end / beta_start) ** frac


def decoder_loss(logpx: torch.Tensor) -> torch.Tensor:
    """``L_dec = −mean_ik log p(x_i|z_ik)`` over ``logpx [N, K]`` (unweighted)."""
    return -logpx.mean()


def eta_for_step(log_eta: torch.Tensor, rewards: torch.Tensor, logq: torch.Tensor, beta: float,
                 ess_target: float, mode: str, *, backend: str | None = None) -> torch.Tensor:
    """η for this step: ``exp(log_eta)`` (learned; differentiable) or ``solve_eta`` (solved)."""
    if mode == "learned":
        return log_eta.exp()
    if mode == "solved":
        return dvae_kernels.solve_eta(rewards, logq, beta, ess_target, backend=backend)
    raise ValueError(f"eta mode must be 'learned' or 'solved', got {mode!r}")


def eta_loss(ess: torch.Tensor, ess_target: float, num_samples: int) -> torch.Tensor:
    """``(mean_i ESS_i − ρK)²`` for ``ess [N]``; differentiable in η through ``ess``."""
    return (ess.mean() - ess_target * num_samples) ** 2


def beta_elbo(logpx: torch.Tensor, entropy: torch.Tensor, vocab_size: int, beta: float
              ) -> torch.Tensor:
    """``E[log p(x|z)] − β·KL(q‖uniform)`` per image, averaged over its samples.

    Args:
        logpx: ``[N, K]``.
        entropy: ``[N, K, L]`` per-position entropies of q along each sampled prefix, so that
            ``KL = Σ_l (log V − H_l)``.

    Returns:
        ``[N]`` float32.
    """
    kl = (math.log(vocab_size) - entropy.float()).sum(-1)
    return (logpx.float() - beta * kl).mean(-1)


@dataclass
class DAPSTerms:
    """Everything one DAPS step computes (losses are 0-d tensors)."""

    loss: torch.Tensor  # encoder + decoder + eta losses
    encoder_loss: torch.Tensor
    decoder_loss: torch.Tensor
    eta_loss: torch.Tensor
    weights: torch.Tensor  # [N, K]
    ess: torch.Tensor  # [N]
    eta: torch.Tensor  # 0-d
    logq: torch.Tensor  # [N, K], detached
    entropy: torch.Tensor  # [N, K, L], detached
    rewards: torch.Tensor  # [N, K], detached


def trust_region(rewards: torch.Tensor, logq: torch.Tensor, log_eta: torch.Tensor, beta: float,
                 *, ess_target: float, eta_mode: str = "learned", backend: str | None = None,
                 gather=None, solve_eta_init: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """η, the weights ``[N, K]`` of this process's rows and the ESS ``[N_global]`` (steps 5-7
    of docs/algorithm.md) from detached rewards and log q. Arguments as :func:`daps_losses`;
    ``solve_eta_init`` first sets a learned ``log_eta`` in place to the exact solve."""
    all_rewards, all_logq, rows = (gather(rewards, logq) if gather is not None
                                   else (rewards, logq, slice(None)))
    if solve_eta_init and eta_mode == "learned":
        with torch.no_grad():
            log_eta.copy_(dvae_kernels.solve_eta(all_rewards, all_logq, beta, ess_target,
                                                 backend=backend).log())
    eta = eta_for_step(log_eta, all_rewards, all_logq, beta, ess_target, eta_mode,
                       backend=backend)
    weights, ess = dvae_kernels.daps_weights(all_rewards, all_logq, beta, eta, backend=backend)
    return eta, weights[rows], ess


def draw_from_weights(weights: torch.Tensor, num: int, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """``[N, num]`` sample indices drawn with replacement from each row of ``weights [N, K]``
    (``Config.encoder_samples``): ``(1/num) Σ_j ∇ℓ_{i, k_j}`` is then an unbiased estimate of
    the encoder's ``Σ_k w_ik ∇ℓ_ik``."""
    return torch.multinomial(weights.float(), num, replacement=True, generator=generator)


def resampled_encoder_loss(logp_tok: torch.Tensor, num_images: int) -> torch.Tensor:
    """``L_enc`` estimated on sequences drawn from the weights: ``logp_tok [N, K″, L]`` the
    differentiable per-token log q of the drawn sequences, ``−(1/(N·K″)) Σ_ij Σ_l logp``. Its
    expectation over the draws is the paper's ``−(1/N) Σ_ik w_ik ℓ_ik``."""
    return -logp_tok.sum() / (num_images * logp_tok.shape[1])


def daps_losses(logpx: torch.Tensor, hidden: torch.Tensor, head: torch.nn.Linear,
                tokens: torch.Tensor, log_eta: torch.Tensor, beta: float, *,
                ess_target: float, eta_mode: str = "learned", use_logits: bool = False,
                backend: str | None = None, fp32: bool = False, precision=None,
                gather=None, phases=None, backward: bool = False,
                decoder_logpx: torch.Tensor | None = None, solve_eta_init: bool = False
                ) -> DAPSTerms:
    """One DAPS objective evaluation (docs/algorithm.md, steps 2-8): the composition the training
    step runs (:class:`dvae.objectives.DAPSObjective`) and the tests check.

    Args:
        logpx: ``[N, K]`` log p_φ(x_i|z_ik) (differentiable in φ).
        hidden: ``[N, K, L, d]`` teacher-forced hidden states (differentiable in θ).
        head: the encoder's output layer; ``logits = head(hidden)``.
        tokens: ``[N, K, L]`` the sampled sequences.
        log_eta: 0-d; a parameter when ``eta_mode="learned"``.
        beta: this step's entropy weight.
        ess_target: ρ, the target mean ESS as a fraction of K.
        use_logits: materialise the logits (``head(hidden)``, then ``token_logprobs``); else
            one fused ``linear_token_logprobs`` pass. Either is kept differentiable and the
            encoder loss weighs its log-probabilities (no second pass over the vocabulary).
        fp32: the head in float32 on float32 hidden states (``Config.fp32_outputs``), inside
            ``precision`` (a context that turns autocast off; default none).
        gather: ``f(rewards, logq) -> (all_rewards, all_logq, rows)``: the global batch's
            rows under torchrun, so η, the weights and the mean ESS are the global batch's,
            and the slice of this process's rows (default: the local batch).
        phases: a :class:`dvae.profiling.Phases` ("teacher_forced", "weights", "losses").
        backward: backpropagate ``L_enc + L_dec + L_eta`` inside the "losses" phase.
        decoder_logpx: ``[N, K′]`` the differentiable log-likelihoods of a random subset of K′
            of each image's samples (``Config.decoder_samples``): ``L_dec`` is their mean, an
            unbiased estimate of the mean over all K (the rewards still come from all K of
            ``logpx``). Default: ``logpx``.
        solve_eta_init: learned η only: first set ``log_eta`` (in place) to the log of the exact
            ``solve_eta`` of this batch (``Config.eta_init="solve"``, on the first step).

    Equivalent PyTorch (float64 transcription in tests/test_dvae_daps.py)::

        lp = log_softmax(head(hidden), -1).gather(-1, tokens[..., None])[..., 0]
        logq = lp.sum(-1); r = logpx.detach()
        w = softmax((r - r.logsumexp(-1, True) - beta * logq.detach()) / (eta + beta), -1)
        ess = 1 / (w ** 2).sum(-1)
        L_enc = -(w.detach() * logq).sum() / N;  L_dec = -logpx.mean()
        L_eta = (ess.mean() - rho * K) ** 2
    """
    ph = phases if phases is not None else (lambda name: contextlib.nullcontext())
    precision = precision if precision is not None else contextlib.nullcontext
    N, K, L = tokens.shape
    with ph("teacher_forced"):
        hidden = hidden.float() if fp32 else hidden
        with precision():
            # One pass over the vocabulary, kept differentiable: the encoder loss weighs these
            # log-probabilities (its gradient is one backward pass of the same op).
            if use_logits:
                logp_tok, entropy = dvae_kernels.token_logprobs(
                    head(hidden), tokens, return_entropy=True, ignore_index=None,
                    backend=backend)
            else:
                logp_tok, entropy = dvae_kernels.linear_token_logprobs(
                    hidden, head.weight, tokens, head.bias, return_entropy=True,
                    ignore_index=None, backend=backend)
            entropy = entropy.detach()
        logq = logp_tok.detach().sum(-1)
    with ph("weights"):
        rewards = logpx.detach()
        rewards = rewards if rewards.dtype == torch.float64 else rewards.float()
        eta, weights, ess = trust_region(rewards, logq, log_eta, beta, ess_target=ess_target,
                                         eta_mode=eta_mode, backend=backend, gather=gather,
                                         solve_eta_init=solve_eta_init)
    with ph("losses"):
        with precision():
            # = weighted_token_nll(head(hidden), tokens, w[..., None]) / N (or its linear
            # form), without a second pass over the vocabulary
            l_enc = -(weights.detach()[..., None] * logp_tok).sum() / N
        l_dec = decoder_loss(logpx if decoder_logpx is None else decoder_logpx)
        l_eta = eta_loss(ess, ess_target, K) if eta_mode == "learned" else l_dec.new_zeros(())
        loss = l_enc + l_dec + l_eta
        if backward:
            loss.backward()
    return DAPSTerms(loss=loss, encoder_loss=l_enc, decoder_loss=l_dec, eta_loss=l_eta,
                     weights=weights.detach(), ess=ess.detach(), eta=eta.detach(), logq=logq,
                     entropy=entropy, rewards=rewards)
