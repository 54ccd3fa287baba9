"""causal_lm_token_logprobs: log-probabilities (and entropies) of a causal LM's own tokens,
from its last hidden states and LM head, without the ``[B, T, V]`` logits.

    logp[b, t]    = log softmax(hidden[b, t] @ lm_head_weight.T)[input_ids[b, t + 1]]
    entropy[b, t] = entropy of softmax(hidden[b, t] @ lm_head_weight.T)
    for t < T - 1; 0 where position t or t + 1 is padding

What policy-gradient fine-tuning (PPO, GRPO) computes for the sampled completions: TRL's
``selective_log_softmax(logits[:, :-1], input_ids[:, 1:])``, here on the fused
:func:`~dvae_kernels.linear_token_logprobs` op, memory O(B·T + V·D) instead of O(B·T·V).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _validate
from .linear_token_logprobs import linear_token_logprobs


def causal_lm_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                             input_ids: torch.Tensor,
                             attention_mask: Optional[torch.Tensor] = None, *,
                             return_entropy: bool = False,
                             lm_head_bias: Optional[torch.Tensor] = None,
                             backend: str | None = None):
    """Per-token log-probabilities of ``input_ids[:, 1:]`` given the hidden states at the
    positions before them (shifted by one), padding masked out.

    Args:
        hidden: ``[B, T, D]`` the last hidden states (after the final norm: for a Hugging
            Face model, ``model(..., output_hidden_states=True).hidden_states[-1]``).
            float32, bfloat16 or float16 (float64: torch backend only).
        lm_head_weight: ``[V, D]``, the LM head (``model.lm_head.weight``), dtype of hidden.
        input_ids: ``[B, T]`` int64 or int32 in ``[0, V)`` (at the positions kept).
        attention_mask: ``[B, T]`` of 0/1 (bool or integer) or None (every position real).
            A prediction is kept when both the position read and the token predicted are
            real, so left- and right-padded batches give the same numbers; ids at padding may
            be anything (they are never read).
        return_entropy: also return each kept position's entropy.
        lm_head_bias: ``[V]`` or None (GPT-2 and most LMs have none).
        backend: ``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"`` or None (automatic).

    Returns:
        ``logp [B, T-1]`` float32 (and ``entropy [B, T-1]``), 0 at masked positions.
        Differentiable in ``hidden``, ``lm_head_weight`` and ``lm_head_bias``; masked
        positions get no gradient. Sum ``logp`` over a sequence for ``log π(sequence)``.

    Equivalent PyTorch::

        logits = (hidden @ lm_head_weight.T).float()[:, :-1]           # [B, T-1, V]
        lp = torch.log_softmax(logits, -1)
        logp = lp.gather(-1, input_ids[:, 1:, None].long())[..., 0]
        entropy = -(lp.exp() * lp).nan_to_num().sum(-1)
        keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
        logp, entropy = logp * keep, entropy * keep

    Memory: the fused op keeps a few floats per position plus, in the backward, gradients of
    the hidden states and the head; the materialised path keeps [B, T-1, V] logits, their
    log-softmax and an [B, T-1, V] gradient.
    """
    _validate.check_float("hidden", hidden)
    _validate.check_tensor("lm_head_weight", lm_head_weight)
    _validate.check_tensor("input_ids", input_ids)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got {_validate.describe(hidden)}")
    if input_ids.dtype not in _validate.TOKEN_DTYPES:
        raise TypeError(f"input_ids must be int64 or int32, got {_validate.describe(input_ids)}")
    if tuple(input_ids.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"input_ids must be [B, T] = {list(hidden.shape[:2])} (hidden's "
                         f"leading shape), got {_validate.describe(input_ids)}")
    _validate.check_float("lm_head_weight", lm_head_weight)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [V, D] with D = hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got {_validate.describe(lm_head_weight)}")
    _validate.check_same_device(hidden=hidden, lm_head_weight=lm_head_weight,
                                input_ids=input_ids)
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        _validate.check_tensor("attention_mask", attention_mask)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {_validate.describe(attention_mask)}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be bool or integer (0/1), got "
                            f"{_validate.describe(attention_mask)}")
        _validate.check_same_device(input_ids=input_ids, attention_mask=attention_mask)
        if _validate.values_checkable(attention_mask) and attention_mask.numel():
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must hold only 0 and 1, got values "
                                 f"{attention_mask.unique()[:5].tolist()}")
        m = attention_mask.bool()
        keep = m[:, :-1] & m[:, 1:]
        # Padding ids are never read: a placeholder 0 keeps them out of the range check.
        targets = torch.where(keep, targets, torch.zeros_like(targets))
    else:
        keep = None
    V = lm_head_weight.shape[0]
    if targets.numel() and _validate.values_checkable(targets):
        bad = (targets < 0) | (targets >= V)
        if bool(bad.any()):
            raise ValueError(
                f"input_ids must lie in [0, V) = [0, {V}) where attention_mask is 1, got "
                f"{int(bad.sum())} out of range (first: {targets[bad][0].item()}) in "
                f"input_ids of {_validate.describe(input_ids)}")
    with _validate.no_value_checks():  # the range was checked above, under its own name
        out = linear_token_logprobs(hidden[:, :-1], lm_head_weight, targets, lm_head_bias,
                                    return_entropy=return_entropy, backend=backend)
    if keep is None:
        return out
    if return_entropy:
        logp, ent = out
        return torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)
    return torch.where(keep, out, 0.0)
