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
    linear_logprobs_entropy,
    linear_token_logprobs,
)


def linear_weighted_token_nll(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                              weights, bias: Optional[torch.Tensor] = None, *,
                              reduction: str = "sum", backend: str | None = None
                              ) -> torch.Tensor:
    """Weighted negative log-likelihood ``-Σ weights · log p(tokens)`` with
    ``p = softmax(hidden @ weight.T + bias)``, never materialising the ``[..., V]`` logits.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (float64: torch backend only).
        weight: ``[V, D]``, the dtype of ``hidden`` (autocast casts both, as ``F.linear``).
        tokens: ``[...]`` int64 or int32 in ``[0, V)``.
        weights: a tensor broadcastable to ``tokens.shape`` (e.g. ``[N, K, 1]`` over
            ``[N, K, L]``) or a float. They are targets: no gradient flows into them (they are
            detached), as in DAPS where they are the stop-gradient importance weights.
        bias: ``[V]`` or None.
        reduction: ``"sum"`` (default), ``"mean"`` (over all tokens, not over the weights) or
            ``"none"`` (per token, shape ``[...]``).
        backend: ``"torch"``, ``"triton"`` or ``None``/``"auto"``.

    Returns:
        float32 loss (float64 for float64 inputs); differentiable in ``hidden``, ``weight`` and
        ``bias``, not in ``weights``.

    Equivalent PyTorch::

        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None].long())[..., 0]
        loss = -(weights.detach() * lp)              # "none"
        loss.sum() / loss.mean()                     # "sum" / "mean"
    """
    _validate.check_reduction(reduction)
    _validate.check_tensor("hidden", hidden)
    _validate.check_tensor("tokens", tokens)
    w = _validate.token_weights(weights, tokens, hidden.device, "hidden")
    logp, _ = linear_logprobs_entropy(hidden, weight, tokens, bias, backend,
                                      "linear_weighted_token_nll")
    loss = -(w.to(logp.dtype) * logp)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


class LinearWeightedTokenNLL(torch.nn.Module):
    """Module form of :func:`linear_weighted_token_nll` (holds no parameters: pass the output
    layer's ``weight`` and ``bias``)."""

    def __init__(self, reduction: str = "sum", backend: str | None = None) -> None:
        super().__init__()
        _validate.check_reduction(reduction)
        self.reduction = reduction
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                weights, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear_weighted_token_nll(hidden, weight, tokens, weights, bias,
                                         reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
