"""``torch.nn`` modules over the fused linear ops: a categorical output head and the losses.

* :class:`FusedCategoricalHead` - a drop-in for ``nn.Linear(d, V)`` used as the output layer of
  a categorical distribution (a policy, a tokenizer's encoder, a language model's head). Same
  parameters and state dict as ``nn.Linear``; its methods give per-position log-probabilities,
  entropies, samples and weighted likelihoods straight from the hidden states, never building
  the ``[..., V]`` logits (memory O(N + V·D) instead of O(N·V), forward and backward).
* :class:`LinearCrossEntropyLoss` - ``F.cross_entropy(F.linear(hidden, weight, bias), target)``
  with torch's ``reduction=`` and ``ignore_index=`` semantics, without the logits.
* :class:`WeightedTokenNLL`, :class:`LinearWeightedTokenNLL` - the weighted likelihood losses
  (re-exported from their op files).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _validate
from .linear_sample_tokens import linear_sample_tokens
from .linear_token_logprobs import linear_token_logprobs
from .linear_weighted_token_nll import LinearWeightedTokenNLL, linear_weighted_token_nll
from .weighted_token_nll import WeightedTokenNLL

__all__ = ["FusedCategoricalHead", "LinearCrossEntropyLoss", "LinearWeightedTokenNLL",
           "WeightedTokenNLL"]


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class FusedCategoricalHead(torch.nn.Module):
    """A categorical output layer ``p(· | h) = softmax(h @ weight.T + bias)`` whose methods
    never materialise the ``[..., V]`` logits.

    Args:
        in_features: D, the hidden size (``nn.Linear``'s ``in_features``).
        out_features: V, the number of categories (vocabulary or codebook size).
        bias: whether the layer has a ``[V]`` bias.
        device, dtype: of the parameters, as for ``nn.Linear``.
        backend: the ops' ``backend=`` (None: automatic).

    Parameters ``weight [V, D]`` and ``bias [V]`` are those of ``nn.Linear(D, V)``, initialised
    the same way, so ``head.load_state_dict(linear.state_dict())`` and back work unchanged
    (:meth:`from_linear` / :meth:`to_linear` copy a layer).

    Methods (``hidden`` is ``[..., D]``, ``tokens`` ``[...]``; outputs float32):

    * ``log_prob(hidden, tokens)`` / ``forward`` -> ``logp[...]``
      (with ``return_entropy=True``: ``(logp, entropy)``);
    * ``entropy(hidden)`` -> ``entropy[...]``;
    * ``sample(hidden, generator=None, temperature=1.0)`` -> ``(tokens[...], logp[...])``,
      not differentiable;
    * ``weighted_nll(hidden, tokens, weights, reduction="sum")`` -> ``-Σ w·logp``.

    Equivalent PyTorch (``linear = nn.Linear(D, V)`` with the same parameters)::

        lp = torch.log_softmax(linear(hidden).float(), -1)
        log_prob = lp.gather(-1, tokens[..., None].long())[..., 0]
        entropy = -(lp.exp() * lp).nan_to_num().sum(-1)
        sample = torch.distributions.Categorical(logits=linear(hidden) / temperature).sample()
        weighted_nll = -(weights * log_prob).sum()
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None, *, backend: str | None = None) -> None:
        super().__init__()
        self.in_features = _check_size("in_features", in_features)
        self.out_features = _check_size("out_features", out_features)
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, **kw))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation (uniform, bound 1/√D for both parameters)."""
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            torch.nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, backend: str | None = None
                    ) -> FusedCategoricalHead:
        """A head holding a copy of ``linear``'s parameters."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        head = cls(linear.in_features, linear.out_features, linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype, backend=backend)
        head.load_state_dict(linear.state_dict())
        return head

    def to_linear(self) -> torch.nn.Linear:
        """An ``nn.Linear`` holding a copy of this head's parameters (to build the logits)."""
        linear = torch.nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                 device=self.weight.device, dtype=self.weight.dtype)
        linear.load_state_dict(self.state_dict())
        return linear

    def _check_hidden(self, hidden) -> None:
        _validate.check_tensor("hidden", hidden)
        if hidden.dim() < 1 or hidden.shape[-1] != self.in_features:
            raise ValueError(f"hidden must be [..., D] with D = in_features = "
                             f"{self.in_features}, got {_validate.describe(hidden)}")

    def log_prob(self, hidden: torch.Tensor, tokens: torch.Tensor, *,
                 return_entropy: bool = False):
        """``log p(tokens | hidden)`` per position, ``[...]`` float32 (and the entropy)."""
        self._check_hidden(hidden)
        return linear_token_logprobs(hidden, self.weight, tokens, self.bias,
                                     return_entropy=return_entropy, backend=self.backend)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor, *,
                return_entropy: bool = False):
        """Same as :meth:`log_prob`."""
        return self.log_prob(hidden, tokens, return_entropy=return_entropy)

    def entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The entropy of each position's distribution, ``[...]`` float32, differentiable."""
        self._check_hidden(hidden)
        # The fused op computes the entropy beside a token's log-probability; token 0 is a
        # valid placeholder whose logp is discarded (its gradient never enters: the op skips
        # an output whose gradient is None). Valid by construction: no value scan needed.
        tokens = torch.zeros(hidden.shape[:-1], dtype=torch.int64, device=hidden.device)
        with _validate.no_value_checks():
            _, ent = linear_token_logprobs(hidden, self.weight, tokens, self.bias,
                                           return_entropy=True, backend=self.backend)
        return ent

    def sample(self, hidden: torch.Tensor, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per position from ``softmax(logits / temperature)`` with its
        log-probability under that distribution: ``(tokens[...] int64, logp[...])``."""
        self._check_hidden(hidden)
        with torch.no_grad():
            return linear_sample_tokens(hidden, self.weight, self.bias, generator=generator,
                                        temperature=temperature, backend=self.backend)

    def weighted_nll(self, hidden: torch.Tensor, tokens: torch.Tensor, weights,
                     reduction: str = "sum") -> torch.Tensor:
        """``-Σ weights · log p(tokens | hidden)`` (``reduction`` "sum", "mean" over tokens,
        or "none"); ``weights`` broadcast to ``tokens`` and receive no gradient."""
        self._check_hidden(hidden)
        return linear_weighted_token_nll(hidden, self.weight, tokens, weights, self.bias,
                                         reduction=reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class LinearCrossEntropyLoss(torch.nn.Module):
    """``nn.CrossEntropyLoss`` applied to ``F.linear(hidden, weight, bias)``, without the logits.

    Args:
        reduction: ``"mean"`` (default: over the targets that are not ``ignore_index``, NaN
            when there are none, as torch), ``"sum"`` or ``"none"`` (per position, 0 where
            ignored).
        ignore_index: a target value that contributes neither loss nor gradient.
        backend: the ops' ``backend=``.

    ``forward(hidden[..., D], weight[V, D], target[...], bias=None)``; float32 loss.

    Equivalent PyTorch::

        F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2),
                        target.flatten(), reduction=reduction, ignore_index=ignore_index)
        # with "none" reshaped to target.shape
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = -100,
                 backend: str | None = None) -> None:
        super().__init__()
        _validate.check_reduction(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        _validate.check_tensor("target", target)
        keep = target != self.ignore_index
        tokens = torch.where(keep, target, torch.zeros_like(target))
        nll = linear_weighted_token_nll(hidden, weight, tokens, keep.to(torch.float32), bias,
                                        reduction="none", backend=self.backend)
        if self.reduction == "none":
            return nll
        if self.reduction == "sum":
            return nll.sum()
        return nll.sum() / keep.sum()

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"backend={self.backend!r}")
