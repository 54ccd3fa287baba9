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
from .linear_token_logprobs import linear_stats


def _check_mask(name: str, mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    _validate.check_tensor(name, mask)
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {_validate.describe(mask)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be bool or integer (0/1), got {_validate.describe(mask)}")
    _validate.check_same_device(input_ids=input_ids, **{name: mask})
    if _validate.values_checkable(mask) and mask.numel():
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1, got values "
                             f"{mask.unique()[:5].tolist()}")
    return mask.bool()


def causal_lm_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                             input_ids: torch.Tensor,
                             attention_mask: Optional[torch.Tensor] = None, *,
                             completion_mask: Optional[torch.Tensor] = None,
                             return_entropy: bool = False, temperature: float = 1.0,
                             softcap: float | None = None, ignore_index: int | None = -100,
                             lm_head_bias: Optional[torch.Tensor] = None,
                             backend: str | None = None):
    """Per-token log-probabilities of ``input_ids[:, 1:]`` given the hidden states at the
    positions before them (shifted by one), padding and prompt masked out.

    Args:
        hidden: ``[B, T, D]`` the last hidden states, after the final norm: for a Hugging
            Face causal LM, those of its base model (``model.model(...)`` or
            ``model.transformer(...)``, ``.last_hidden_state``), not ``model(...)``, which
            would build the ``[B, T, V]`` logits this function exists to avoid. float32,
            bfloat16 or float16 (float64: torch backend only).
        lm_head_weight: ``[V, D]``, the LM head (``model.lm_head.weight``), dtype of hidden.
        input_ids: ``[B, T]`` int64 or int32 in ``[0, V)`` at the positions kept. Hugging
            Face ``labels`` work too: a target equal to ``ignore_index`` (-100) is masked.
        attention_mask: ``[B, T]`` of 0/1 (bool or integer) or None (every position real).
            A prediction is kept when both the position read and the token predicted are
            real, so left- and right-padded batches give the same numbers; ids at padding may
            be anything (they are never read).
        completion_mask: ``[B, T]`` of 0/1 or None: the tokens whose log-probability is
            wanted, e.g. the completion after a prompt (TRL's ``completion_mask``, a loss
            mask); a prediction is also masked when the token it predicts is not in it.
        return_entropy: also return each kept position's entropy.
        temperature: the sampling temperature τ: log-probabilities of ``softmax(logits/τ)``
            (the distribution GRPO/PPO sampled from), applied inside the kernel.
        softcap: ``softcap·tanh(logits/softcap)`` before the temperature's softmax (Gemma).
        ignore_index: a target value masked like padding (None: none).
        lm_head_bias: ``[V]`` or None (GPT-2 and most LMs have none).
        backend: ``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"`` or None (automatic).

    Returns:
        ``logp [B, T-1]`` float32 (and ``entropy [B, T-1]``), 0 at masked positions.
        Differentiable in ``hidden``, ``lm_head_weight`` and ``lm_head_bias``; masked
        positions get no gradient. Sum ``logp`` over a sequence for ``log π(sequence)``.

    Equivalent PyTorch::

        logits = (hidden @ lm_head_weight.T).float()[:, :-1] / temperature   # [B, T-1, V]
        lp = torch.log_softmax(logits, -1)
        logp = lp.gather(-1, input_ids[:, 1:, None].long())[..., 0]
        entropy = -(lp.exp() * lp).nan_to_num().sum(-1)
        keep = (attention_mask[:, :-1] * attention_mask[:, 1:] * completion_mask[:, 1:])
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
    _validate.check_ignore_index(ignore_index)
    targets = input_ids[:, 1:]
    keep = None
    if attention_mask is not None:
        m = _check_mask("attention_mask", attention_mask, input_ids)
        keep = m[:, :-1] & m[:, 1:]
    if completion_mask is not None:
        c = _check_mask("completion_mask", completion_mask, input_ids)[:, 1:]
        keep = c if keep is None else keep & c
    if ignore_index is not None:
        real = targets != ignore_index
        keep = real if keep is None else keep & real
    if keep is not None:
        # Masked ids are never read: a placeholder 0 keeps them out of the range check.
        targets = torch.where(keep, targets, torch.zeros_like(targets))
    V = lm_head_weight.shape[0]
    _validate.check_token_range(targets, V, name="input_ids")
    with _validate.no_value_checks():  # the range was checked above, under its own name
        st = linear_stats(hidden[:, :-1], lm_head_weight, targets, lm_head_bias,
                          backend=backend, op="causal_lm_token_logprobs",
                          temperature=temperature, softcap=softcap, ignore_index=None)
    logp, ent = st.logp, st.entropy
    if keep is not None:
        logp, ent = torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)
    return (logp, ent) if return_entropy else logp
