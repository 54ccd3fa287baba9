"""linear_weighted_token_nll: -Σ w·log softmax(hidden @ weight.T + bias)[token], no logits.

    loss = -(weights * log_softmax(F.linear(hidden, weight, bias).float(), -1)
             .gather(-1, tokens[..., None])[..., 0])
    then .sum(), .mean() over tokens, or kept per token ("none")

The encoder's weighted maximum-likelihood loss (docs/algorithm.md, step 7) straight from the
last hidden states. It is the fused :func:`linear_token_logprobs` op followed by a weighted
reduction of one float per token: the weights only scale the per-token gradient ``g_logp = -w``
that the fused backward already takes, so a separate kernel would save nothing but that
[N]-element product. Its backends are therefore those of linear_token_logprobs (the same OP) and
it inherits that op's memory bound, O(N + V·D) instead of O(N·V).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _validate
from .linear_token_logprobs import (  # noqa: F401 (OP, linear_token_logprobs re-exported)
    OP,
    linear_stats,
    linear_token_logprobs,
)


def linear_weighted_token_nll(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                              weights, bias: Optional[torch.Tensor] = None, *,
                              reduction: str = "sum", temperature: float = 1.0,
                              softcap: float | None = None, ignore_index: int | None = -100,
                              label_smoothing: float = 0.0, z_loss: float = 0.0,
                              return_lse: bool = False, backend: str | None = None):
    """Weighted negative log-likelihood ``-Σ weights · log p(tokens)`` with
    ``p = softmax(hidden @ weight.T + bias)``, never materialising the ``[..., V]`` logits.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (float64: torch backend only).
        weight: ``[V, D]``, the dtype of ``hidden`` (autocast casts both, as ``F.linear``).
        tokens: ``[...]`` int64 or int32 in ``[0, V)`` or equal to ``ignore_index``.
        weights: a tensor broadcastable to ``tokens.shape`` (e.g. ``[N, K, 1]`` over
            ``[N, K, L]``) or a float. They are targets: no gradient flows into them (they are
            detached), as in DAPS where they are the stop-gradient importance weights.
        bias: ``[V]`` or None.
        reduction: ``"sum"`` (default), ``"mean"`` (over the tokens not ignored, not over the
            weights), ``"sequence_mean"`` (over each sequence's kept tokens, the last
            dimension, then over sequences: GRPO's per-sequence average) or ``"none"`` (per
            token, shape ``[...]``, 0 where ignored).
        temperature, softcap, ignore_index: as :func:`linear_token_logprobs`.
        label_smoothing: ε in [0, 1]: the target is ``(1 - ε)·onehot + ε/V`` (as
            ``F.cross_entropy``), i.e. ``(1 - ε)·(-logp) + ε·(lse - mean logit)`` per token.
        z_loss: adds ``z_loss · lse²`` per kept token (unweighted), which keeps the
            log-partition near 0 (PaLM's z-loss).
        return_lse: also return the per-token log-sum-exp ``[...]``.
        backend: ``"torch"``, ``"triton"``, ``"cpu"`` or ``None``/``"auto"``.

    Returns:
        float32 loss (float64 for float64 inputs), and the lse when ``return_lse``;
        differentiable in ``hidden``, ``weight`` and ``bias``, not in ``weights``.

    Equivalent PyTorch::

        logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
        if softcap: logits = softcap * torch.tanh(logits / softcap)
        lp = torch.log_softmax(logits, -1)
        ce = -(1 - eps) * lp.gather(-1, tokens[..., None].long())[..., 0] - eps * lp.mean(-1)
        loss = weights.detach() * ce + z_loss * logits.logsumexp(-1) ** 2
        # 0 where tokens == ignore_index, then reduced ("sum": loss.sum(), ...)
    """
    op = "linear_weighted_token_nll"
    try:
        _validate.check_reduction(reduction)
        _validate.check_tensor("hidden", hidden)
        _validate.check_tensor("tokens", tokens)
        smoothing = _validate.float_option("label_smoothing", label_smoothing, maximum=1.0)
        z = _validate.float_option("z_loss", z_loss)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{op}: {err}") from None
    w = _validate.token_weights(weights, tokens, hidden.device, "hidden")
    st = linear_stats(hidden, weight, tokens, bias, backend=backend, op=op,
                      temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                      with_mean=smoothing > 0.0)
    return weighted_loss(st, w, reduction, smoothing, z, return_lse)


def weighted_loss(st, weights: torch.Tensor, reduction: str, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, return_lse: bool = False):
    """The weighted, smoothed, z-regularised loss of :class:`LinearStats` ``st``, reduced."""
    ce = -st.logp
    if label_smoothing > 0.0:
        ce = (1.0 - label_smoothing) * ce + label_smoothing * (st.lse - st.mean)
    loss = weights.to(ce.dtype) * ce
    if z_loss > 0.0:
        loss = loss + z_loss * st.lse.square()
    if st.keep is not None:  # ignored positions: 0 whatever their weight
        loss = torch.where(st.keep, loss, 0.0)
    out = _validate.reduce_loss(loss, st.keep, reduction)
    return (out, st.lse) if return_lse else out


class LinearWeightedTokenNLL(torch.nn.Module):
    """Module form of :func:`linear_weighted_token_nll` (holds no parameters: pass the output
    layer's ``weight`` and ``bias``); its keyword options are the module's settings."""

    def __init__(self, reduction: str = "sum", backend: str | None = None, *,
                 temperature: float = 1.0, softcap: float | None = None,
                 ignore_index: int | None = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0) -> None:
        super().__init__()
        _validate.check_reduction(reduction)
        self.reduction = reduction
        self.backend = backend
        self.options = dict(temperature=temperature, softcap=softcap,
                            ignore_index=ignore_index, label_smoothing=label_smoothing,
                            z_loss=z_loss)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                weights, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear_weighted_token_nll(hidden, weight, tokens, weights, bias,
                                         reduction=self.reduction, backend=self.backend,
                                         **self.options)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}, " + ", ".join(
            f"{k}={v!r}" for k, v in self.options.items())
