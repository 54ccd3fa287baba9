"""Fused policy losses for LLM reinforcement learning, from hidden states and the LM head.

Each loss takes a causal LM's last hidden states ``[B, T, D]`` and its head ``[V, D]`` (never
the ``[B, T, V]`` logits) and computes the completions' per-token log-probabilities with the
fused :func:`~dvae_kernels.causal_lm_token_logprobs` (memory O(B·T + V·D)); everything after
that is elementwise on ``[B, T-1]``, and the backward is one pass of the fused op with the
per-token gradient the loss gives each log-probability.

* :func:`grpo_loss` - GRPO's clipped surrogate with per-sequence advantages (TRL's
  ``GRPOTrainer`` loss), optional KL to a reference policy and an entropy bonus.
* :func:`ppo_loss` - the same clipped surrogate with per-token advantages (PPO with GAE).
* :func:`daps_policy_loss` - the DAPS update applied to K completions per prompt: the rewards
  and sequence log-probabilities give the trust-region weights of the non-parametric target
  (docs/algorithm.md, steps 3-6: the temperature η solved for a target ESS or learned), and the
  loss is the weighted likelihood of the completions (step 7).

Shapes: ``B`` sequences of ``T`` tokens (prompt and completion, padded), ``T-1`` predicted
positions. A prediction counts when the position read and the token predicted are real
(``attention_mask``) and the token is part of the completion (``completion_mask``).

Loss types (how per-token losses become one number, as TRL names them):

* ``"grpo"``: each sequence's mean over its completion tokens, then the mean over sequences;
* ``"bnpo"`` (``"token_mean"``): the mean over every completion token of the batch;
* ``"dr_grpo"``: the sum divided by ``B · (T - 1)``, a constant of the batch's shape
  (Dr. GRPO; TRL divides by ``B`` times the maximum completion length, which is this when
  the sequences are the completions' region);
* ``"sum"``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _validate
from .causal_lm_token_logprobs import causal_lm_token_logprobs
from .daps_weights import daps_weights
from .solve_eta import solve_eta

LOSS_TYPES = ("grpo", "bnpo", "token_mean", "dr_grpo", "sum")


class PolicyLoss(NamedTuple):
    """``loss`` (0-d, differentiable) and detached per-token diagnostics ``[B, T-1]`` (0 where
    masked): the log-probabilities, the KL to the reference (0 without one), whether the
    ratio was clipped, and the entropy (0 unless an entropy bonus was asked for)."""

    loss: torch.Tensor
    logp: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor


class DAPSPolicyLoss(NamedTuple):
    """``loss`` (the weighted likelihood, differentiable in the policy), ``eta_loss``
    (``(mean ESS - ρK)²``, differentiable in a learned η; 0 otherwise), and detached
    ``weights [P, K]``, ``ess [P]``, ``eta`` (0-d) and ``logq [P, K]``."""

    loss: torch.Tensor
    eta_loss: torch.Tensor
    weights: torch.Tensor
    ess: torch.Tensor
    eta: torch.Tensor
    logq: torch.Tensor


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    per_token = torch.where(mask, per_token, 0.0)
    if loss_type == "grpo":
        return _validate.reduce_loss(per_token, mask, "sequence_mean")
    if loss_type in ("bnpo", "token_mean"):
        return per_token.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return per_token.sum() / max(per_token.numel(), 1)
    return per_token.sum()


def _mask(input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """[B, T-1] bool: the predictions that count (the same rule causal_lm_token_logprobs
    applies)."""
    keep = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    if attention_mask is not None:
        m = attention_mask.bool()
        keep = keep & m[:, :-1] & m[:, 1:]
    if completion_mask is not None:
        keep = keep & completion_mask.bool()[:, 1:]
    return keep


def _check_per_token(name: str, t, shape) -> Optional[torch.Tensor]:
    if t is None:
        return None
    _validate.check_tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be [B, T-1] = {list(shape)} (one value per predicted "
                         f"token), got {_validate.describe(t)}")
    return t.detach().float()


def ppo_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, input_ids: torch.Tensor,
             advantages: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
             completion_mask: Optional[torch.Tensor] = None,
             old_logp: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
             kl_coef: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
             entropy_coef: float = 0.0, temperature: float = 1.0,
             loss_type: str = "token_mean", lm_head_bias: Optional[torch.Tensor] = None,
             backend: str | None = None) -> PolicyLoss:
    """The PPO clipped surrogate over the completion tokens, from hidden states.

    Per predicted token, with ``r = exp(logp - old_logp)`` and advantage ``A``::

        loss_t = -min(r·A, clip(r, 1 - epsilon, 1 + epsilon_high)·A)
                 + kl_coef · (exp(ref - logp) - (ref - logp) - 1)      # k3 KL estimator
                 - entropy_coef · entropy_t

    reduced over the masked tokens by ``loss_type`` (module docstring).

    Args:
        hidden: ``[B, T, D]`` the policy's last hidden states (differentiable).
        lm_head_weight: ``[V, D]``; ``lm_head_bias`` ``[V]`` or None.
        input_ids: ``[B, T]`` prompt and completion tokens.
        advantages: ``[B, T-1]`` per token, or ``[B]`` per sequence (broadcast).
        attention_mask, completion_mask: ``[B, T]`` 0/1 (see
            :func:`~dvae_kernels.causal_lm_token_logprobs`).
        old_logp: ``[B, T-1]`` log-probabilities under the policy that sampled (None: this
            policy, detached: on-policy, ratio 1).
        ref_logp: ``[B, T-1]`` under the reference policy, for the KL term (None: no KL).
        kl_coef: the KL term's weight (TRL's ``beta``).
        epsilon, epsilon_high: the clip range ``[1 - epsilon, 1 + epsilon_high]``
            (``epsilon_high`` defaults to ``epsilon``; DAPO raises it).
        entropy_coef: weight of the entropy bonus.
        temperature: the sampling temperature the completions were drawn at (the
            log-probabilities are those of ``softmax(logits / temperature)``).
        loss_type: ``"token_mean"`` (default), ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``, ``"sum"``.

    Returns:
        :class:`PolicyLoss`.
    """
    return _clipped("ppo_loss", hidden, lm_head_weight, input_ids, advantages, attention_mask,
                    completion_mask, old_logp, ref_logp, kl_coef, epsilon, epsilon_high,
                    entropy_coef, temperature, loss_type, lm_head_bias, backend)


def grpo_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, input_ids: torch.Tensor,
              advantages: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
              completion_mask: Optional[torch.Tensor] = None,
              old_logp: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
              kl_coef: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
              entropy_coef: float = 0.0, temperature: float = 1.0, loss_type: str = "grpo",
              lm_head_bias: Optional[torch.Tensor] = None,
              backend: str | None = None) -> PolicyLoss:
    """GRPO's loss: :func:`ppo_loss` with per-sequence advantages ``[B]`` (each completion's
    reward minus its group's mean, optionally over its group's std: see
    :func:`group_advantages`) and TRL's per-sequence average (``loss_type="grpo"``).

    Equivalent PyTorch (TRL's ``GRPOTrainer._compute_loss``, with ``logits`` materialised)::

        logp = log_softmax(logits[:, :-1] / temperature, -1).gather(-1, ids[:, 1:, None])[..., 0]
        ratio = (logp - old_logp).exp()
        per_token = -torch.min(ratio * A[:, None],
                               ratio.clamp(1 - eps, 1 + eps_high) * A[:, None])
        per_token = per_token + kl_coef * ((ref - logp).exp() - (ref - logp) - 1)
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    """
    _validate.check_tensor("advantages", advantages)
    if advantages.dim() != 1:
        raise ValueError(f"grpo_loss: advantages must be [B], one per completion, got "
                         f"{_validate.describe(advantages)} (per-token advantages: ppo_loss)")
    return _clipped("grpo_loss", hidden, lm_head_weight, input_ids, advantages, attention_mask,
                    completion_mask, old_logp, ref_logp, kl_coef, epsilon, epsilon_high,
                    entropy_coef, temperature, loss_type, lm_head_bias, backend)


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4
                     ) -> torch.Tensor:
    """GRPO's advantages from ``rewards [P, K]`` (K completions per prompt): each reward minus
    its group's mean, divided by the group's standard deviation + ``eps`` when ``scale``
    (Dr. GRPO turns the scaling off). Returns ``[P·K]``, prompt-major."""
    _validate.check_float("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, K], got {_validate.describe(rewards)}")
    a = rewards - rewards.mean(-1, keepdim=True)
    if scale:
        a = a / (rewards.std(-1, keepdim=True) + eps)
    return a.reshape(-1)


def _clipped(op, hidden, weight, input_ids, advantages, attention_mask, completion_mask,
             old_logp, ref_logp, kl_coef, epsilon, epsilon_high, entropy_coef, temperature,
             loss_type, bias, backend) -> PolicyLoss:
    try:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        epsilon = _validate.float_option("epsilon", epsilon)
        epsilon_high = _validate.float_option("epsilon_high", epsilon_high, allow_none=True)
        kl_coef = _validate.float_option("kl_coef", kl_coef)
        entropy_coef = _validate.float_option("entropy_coef", entropy_coef)
        _validate.check_tensor("input_ids", input_ids)
        _validate.check_float("advantages", advantages)
        shape = (input_ids.shape[0], max(input_ids.shape[1] - 1, 0))
        if advantages.dim() == 1:
            if advantages.shape[0] != shape[0]:
                raise ValueError(f"advantages must be [B] = [{shape[0]}] or [B, T-1], got "
                                 f"{_validate.describe(advantages)}")
            adv = advantages.detach().float()[:, None]
        else:
            adv = _check_per_token("advantages", advantages, shape)
        old = _check_per_token("old_logp", old_logp, shape)
        ref = _check_per_token("ref_logp", ref_logp, shape)
        if kl_coef > 0.0 and ref is None:
            raise ValueError("kl_coef > 0 needs ref_logp, the reference policy's "
                             "per-token log-probabilities")
    except (TypeError, ValueError) as err:
        raise type(err)(f"{op}: {err}") from None
    out = causal_lm_token_logprobs(hidden, weight, input_ids, attention_mask,
                                   completion_mask=completion_mask,
                                   return_entropy=entropy_coef > 0.0, temperature=temperature,
                                   ignore_index=None, lm_head_bias=bias, backend=backend)
    logp, ent = out if entropy_coef > 0.0 else (out, None)
    mask = _mask(input_ids, attention_mask, completion_mask)
    ratio = torch.exp(logp - (old if old is not None else logp.detach()))
    high = epsilon if epsilon_high is None else epsilon_high
    clipped_ratio = ratio.clamp(1.0 - epsilon, 1.0 + high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)
    kl = torch.zeros_like(logp)
    if ref is not None:
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1.0
        if kl_coef > 0.0:
            per_token = per_token + kl_coef * kl
    if ent is not None:
        per_token = per_token - entropy_coef * ent
    loss = _reduce(per_token, mask, loss_type)
    with torch.no_grad():
        clipped = (ratio * adv > clipped_ratio * adv) & mask
        zero = torch.zeros_like(logp)
        return PolicyLoss(loss, torch.where(mask, logp, zero).detach(),
                          torch.where(mask, kl, zero).detach(), clipped,
                          ent.detach() if ent is not None else zero, mask)


def daps_policy_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                     input_ids: torch.Tensor, rewards: torch.Tensor, *,
                     attention_mask: Optional[torch.Tensor] = None,
                     completion_mask: Optional[torch.Tensor] = None, beta: float = 0.0,
                     eta=None, ess_target: float = 0.33, temperature: float = 1.0,
                     lm_head_bias: Optional[torch.Tensor] = None,
                     backend: str | None = None) -> DAPSPolicyLoss:
    """The DAPS update for K completions per prompt, as a policy loss.

    The ``B = P·K`` sequences are P prompts' K completions each, prompt-major. With each
    completion's log-probability ``logq = Σ_t logp_t`` over its completion tokens::

        A = rewards - rewards.logsumexp(-1, keepdim=True)            # [P, K]
        w = softmax((A - beta·sg(logq)) / (eta + beta), -1)           # the target's weights
        ess = 1 / (w ** 2).sum(-1)                                    # [P], in [1, K]
        loss = -(sg(w) * logq).sum() / P                              # weighted likelihood
        eta_loss = (ess.mean() - ess_target·K) ** 2                   # learned eta only

    ``eta``: None solves it exactly for each batch, so that the mean ESS is
    ``ess_target·K`` (:func:`~dvae_kernels.solve_eta`, on the device); a float or a 0-d tensor
    uses it (a tensor that requires grad is a learned η: minimise ``eta_loss`` in it, e.g.
    ``log_eta`` by AdamW as the paper does). ``beta`` weights the entropy term of the target
    (0: none). Unlike GRPO there is no ratio, no clipping and no advantage scaling: the
    weights are a softmax over the group, and the trust region is the ESS.

    Args:
        hidden: ``[P·K, T, D]``; lm_head_weight ``[V, D]``; input_ids ``[P·K, T]``.
        rewards: ``[P, K]``, any real scale (a log-likelihood, a score, a pass rate).
        attention_mask, completion_mask: ``[P·K, T]`` 0/1.
        beta, eta, ess_target: as above; ``ess_target`` in (0, 1].
        temperature: the sampling temperature (log-probabilities of ``softmax(logits/τ)``).

    Returns:
        :class:`DAPSPolicyLoss`.
    """
    op = "daps_policy_loss"
    try:
        _validate.check_float("rewards", rewards)
        if rewards.dim() != 2:
            raise ValueError(f"rewards must be [P, K], got {_validate.describe(rewards)}")
        _validate.check_tensor("input_ids", input_ids)
        P, K = rewards.shape
        if input_ids.dim() != 2 or input_ids.shape[0] != P * K:
            raise ValueError(f"input_ids must be [P·K, T] = [{P * K}, T] (K completions per "
                             f"prompt, prompt-major), got {_validate.describe(input_ids)}")
        beta = _validate.float_option("beta", beta)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{op}: {err}") from None
    logp = causal_lm_token_logprobs(hidden, lm_head_weight, input_ids, attention_mask,
                                    completion_mask=completion_mask, temperature=temperature,
                                    ignore_index=None, lm_head_bias=lm_head_bias,
                                    backend=backend)
    logq = logp.sum(-1).view(P, K)  # differentiable: the loss weighs these
    r = rewards.detach().float()
    if eta is None:
        eta_t = solve_eta(r, logq.detach(), beta, ess_target, backend=backend)
    else:
        eta_t = eta
    weights, ess = daps_weights(r, logq.detach(), beta, eta_t, backend=backend)
    loss = -(weights.detach() * logq).sum() / max(P, 1)
    learned = isinstance(eta_t, torch.Tensor) and eta_t.requires_grad
    eta_loss = ((ess.mean() - ess_target * K) ** 2 if learned
                else torch.zeros((), device=rewards.device))
    eta_out = (eta_t.detach() if isinstance(eta_t, torch.Tensor)
               else torch.tensor(float(eta_t), device=rewards.device))
    return DAPSPolicyLoss(loss, eta_loss, weights.detach(), ess.detach(), eta_out,
                          logq.detach())
