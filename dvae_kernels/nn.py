"""``torch.nn`` modules over the fused linear ops: a categorical output head and the losses.

* :class:`FusedCategoricalHead` - a drop-in for ``nn.Linear(d, V)`` used as the output layer of
  a categorical distribution (a policy, a tokenizer's encoder, a language model's head).
  ``head(h)`` is exactly the ``nn.Linear``; ``head(h, targets=t)`` gives per-position
  log-probabilities and ``head(h, targets=t, weights=w)`` the weighted likelihood loss through
  the same ``forward``, so DistributedDataParallel's and FSDP's hooks run, never building the
  ``[..., V]`` logits (memory O(N + V·D) instead of O(N·V), forward and backward).
* :class:`LinearCrossEntropyLoss` - ``F.cross_entropy(F.linear(hidden, weight, bias), target)``
  with torch's ``reduction=``, ``ignore_index=`` and ``label_smoothing=`` semantics (and a
  z-loss, a temperature, a softcap), without the logits.
* :class:`WeightedTokenNLL`, :class:`LinearWeightedTokenNLL` - the weighted likelihood losses
  (re-exported from their op files).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _validate
from .linear_sample_tokens import linear_sample_tokens
from .linear_token_logprobs import linear_stats
from .linear_weighted_token_nll import LinearWeightedTokenNLL, weighted_loss
from .weighted_token_nll import WeightedTokenNLL

__all__ = ["FusedCategoricalHead", "LinearCrossEntropyLoss", "LinearWeightedTokenNLL",
           "WeightedTokenNLL"]


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _inside_ddp_forward() -> bool:
    """Whether a DistributedDataParallel forward is running (its hooks then see the call)."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - part of every torch build with distributed
        return False
    return getattr(DistributedDataParallel, "_active_ddp_module", None) is not None


class FusedCategoricalHead(torch.nn.Module):
    """A categorical output layer ``p(· | h) = softmax(h @ weight.T + bias)`` that is an
    ``nn.Linear(D, V)`` when called plainly and computes its fused losses through the same
    ``forward``.

    Args:
        in_features: D, the hidden size (``nn.Linear``'s ``in_features``).
        out_features: V, the number of categories (vocabulary or codebook size).
        bias: whether the layer has a ``[V]`` bias.
        device, dtype: of the parameters, as for ``nn.Linear``.
        backend: the ops' ``backend=`` (None: automatic).

    Parameters ``weight [V, D]`` and ``bias [V]`` are those of ``nn.Linear(D, V)``, initialised
    the same way, so ``head.load_state_dict(linear.state_dict())`` and back work unchanged
    (:meth:`from_linear` / :meth:`to_linear` copy a layer).

    ``forward(hidden, targets=None, weights=None, *, reduction="sum", return_entropy=False,
    return_lse=False, temperature=1.0, softcap=None, ignore_index=-100, label_smoothing=0.0,
    z_loss=0.0)`` (``hidden`` is ``[..., D]``, ``targets`` ``[...]``; outputs float32):

    * ``head(hidden)`` -> the logits ``F.linear(hidden, weight, bias)``, exactly ``nn.Linear``;
    * ``head(hidden, targets=t)`` -> ``logp[...]``, the log-probability of each target
      (``return_entropy=True``: also the entropy; ``return_lse=True``: also the log-sum-exp);
    * ``head(hidden, targets=t, weights=w)`` -> ``-Σ w·logp`` reduced by ``reduction``
      (``"sum"``, ``"mean"`` over kept targets, ``"sequence_mean"``, ``"none"``), with
      optional ``label_smoothing`` and ``z_loss`` (``weights=1.0`` is the cross-entropy);
    * ``temperature`` divides the logits and ``softcap`` caps them (``c·tanh(x/c)``) inside
      the kernels; targets equal to ``ignore_index`` count for nothing.

    Training through these calls runs the module's ``forward``, so DistributedDataParallel
    and FSDP see it. The methods :meth:`log_prob`, :meth:`entropy`, :meth:`weighted_nll` and
    :meth:`sample` call the module too; with gradients in a multi-process run, outside a
    DistributedDataParallel forward, they raise instead of training without synchronising
    gradients (call the wrapped model: ``ddp_model(h, targets=..., weights=...)``).

    Equivalent PyTorch (``linear = nn.Linear(D, V)`` with the same parameters)::

        logits = linear(hidden)                                   # head(hidden)
        lp = torch.log_softmax(logits.float() / temperature, -1)
        logp = lp.gather(-1, targets[..., None].long())[..., 0]   # head(hidden, targets=t)
        loss = -(weights * logp).sum()                            # ..., weights=w
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
        """An ``nn.Linear`` holding a copy of this head's parameters."""
        linear = torch.nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                 device=self.weight.device, dtype=self.weight.dtype)
        linear.load_state_dict(self.state_dict())
        return linear

    def _check_hidden(self, hidden) -> None:
        _validate.check_tensor("hidden", hidden)
        if hidden.dim() < 1 or hidden.shape[-1] != self.in_features:
            raise ValueError(f"hidden must be [..., D] with D = in_features = "
                             f"{self.in_features}, got {_validate.describe(hidden)}")

    def forward(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None,
                weights=None, *, reduction: str = "sum", return_entropy: bool = False,
                return_lse: bool = False, temperature: float = 1.0,
                softcap: float | None = None, ignore_index: int | None = -100,
                label_smoothing: float = 0.0, z_loss: float = 0.0):
        """The logits (no ``targets``), the targets' log-probabilities, or the weighted
        likelihood loss (``weights``): see the class docstring."""
        if targets is None:
            given = [k for k, v in (("weights", weights), ("return_entropy", return_entropy),
                                    ("return_lse", return_lse), ("temperature",
                                                                  temperature != 1.0),
                                    ("softcap", softcap), ("label_smoothing", label_smoothing),
                                    ("z_loss", z_loss)) if v not in (None, False, 0.0)]
            if given or reduction != "sum":
                raise ValueError(f"FusedCategoricalHead: {', '.join(given) or 'reduction'} "
                                 "need targets=; without targets the head is nn.Linear and "
                                 "returns the logits")
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        self._check_hidden(hidden)
        if weights is None:
            if reduction != "sum" or label_smoothing or z_loss:
                raise ValueError("FusedCategoricalHead: reduction, label_smoothing and z_loss "
                                 "apply to the weighted loss: pass weights= (1.0 for the "
                                 "cross-entropy)")
            st = linear_stats(hidden, self.weight, targets, self.bias, backend=self.backend,
                              op="FusedCategoricalHead", temperature=temperature,
                              softcap=softcap, ignore_index=ignore_index)
            out = (st.logp,) + ((st.entropy,) if return_entropy else ()) + (
                (st.lse,) if return_lse else ())
            return out[0] if len(out) == 1 else out
        op = "FusedCategoricalHead"
        try:
            _validate.check_reduction(reduction)
            smoothing = _validate.float_option("label_smoothing", label_smoothing, maximum=1.0)
            z = _validate.float_option("z_loss", z_loss)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{op}: {err}") from None
        if return_entropy:
            raise ValueError(f"{op}: return_entropy goes with the log-probabilities (no "
                             "weights=); the loss returns its lse with return_lse=True")
        w = _validate.token_weights(weights, targets, hidden.device, "hidden")
        st = linear_stats(hidden, self.weight, targets, self.bias, backend=self.backend,
                          op=op, temperature=temperature, softcap=softcap,
                          ignore_index=ignore_index, with_mean=smoothing > 0.0)
        return weighted_loss(st, w, reduction, smoothing, z, return_lse)

    def _no_unsynchronised_training(self, method: str) -> None:
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        if not _inside_ddp_forward():
            raise RuntimeError(
                f"FusedCategoricalHead.{method}() with gradients in a "
                f"{dist.get_world_size()}-process run, outside a DistributedDataParallel "
                "forward: DDP would not synchronise the gradients. Call the wrapped module "
                "instead (ddp_model(hidden, targets=..., weights=...) runs the same fused "
                "loss through DDP's forward), or call this inside the wrapped model's forward")

    def log_prob(self, hidden: torch.Tensor, tokens: torch.Tensor, *,
                 return_entropy: bool = False, **options):
        """``self(hidden, targets=tokens, return_entropy=..., **options)``."""
        self._no_unsynchronised_training("log_prob")
        return self(hidden, targets=tokens, return_entropy=return_entropy, **options)

    def entropy(self, hidden: torch.Tensor, **options) -> torch.Tensor:
        """The entropy of each position's distribution, ``[...]`` float32, differentiable."""
        self._no_unsynchronised_training("entropy")
        self._check_hidden(hidden)
        # The fused op computes the entropy beside a token's log-probability; token 0 is a
        # valid placeholder whose logp is discarded (its gradient never enters: the op skips
        # an output whose gradient is None). Valid by construction: no value scan needed.
        tokens = torch.zeros(hidden.shape[:-1], dtype=torch.int64, device=hidden.device)
        with _validate.no_value_checks():
            _, ent = self(hidden, targets=tokens, return_entropy=True, ignore_index=None,
                          **options)
        return ent

    def weighted_nll(self, hidden: torch.Tensor, tokens: torch.Tensor, weights,
                     reduction: str = "sum", **options) -> torch.Tensor:
        """``self(hidden, targets=tokens, weights=weights, reduction=reduction,
        **options)``: ``-Σ weights · log p(tokens | hidden)``; ``weights`` receive no
        gradient."""
        self._no_unsynchronised_training("weighted_nll")
        return self(hidden, targets=tokens, weights=weights, reduction=reduction, **options)

    def sample(self, hidden: torch.Tensor, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per position from ``softmax(logits / temperature)`` with its
        log-probability under that distribution: ``(tokens[...] int64, logp[...])``. Not
        differentiable."""
        self._check_hidden(hidden)
        with torch.no_grad():
            return linear_sample_tokens(hidden, self.weight, self.bias, generator=generator,
                                        temperature=temperature, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class LinearCrossEntropyLoss(torch.nn.Module):
    """``nn.CrossEntropyLoss`` applied to ``F.linear(hidden, weight, bias)``, without the logits.

    Args:
        reduction: ``"mean"`` (default: over the targets that are not ``ignore_index``, NaN
            when there are none, as torch), ``"sum"``, ``"sequence_mean"`` or ``"none"`` (per
            position, 0 where ignored).
        ignore_index: a target value that contributes neither loss nor gradient.
        label_smoothing: as ``nn.CrossEntropyLoss``'s.
        z_loss: adds ``z_loss · lse²`` per kept target.
        temperature, softcap: applied to the logits inside the kernel.
        backend: the ops' ``backend=``.

    ``forward(hidden[..., D], weight[V, D], target[...], bias=None)``; float32 loss.

    Equivalent PyTorch::

        F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2),
                        target.flatten(), reduction=reduction, ignore_index=ignore_index,
                        label_smoothing=label_smoothing)
        # with "none" reshaped to target.shape
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = -100,
                 backend: str | None = None, *, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, temperature: float = 1.0,
                 softcap: float | None = None) -> None:
        super().__init__()
        _validate.check_reduction(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend
        self.options = dict(label_smoothing=_validate.float_option(
            "label_smoothing", label_smoothing, maximum=1.0),
            z_loss=_validate.float_option("z_loss", z_loss),
            temperature=_validate.float_option("temperature", temperature, strict=True),
            softcap=_validate.float_option("softcap", softcap, strict=True, allow_none=True))

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        _validate.check_tensor("target", target)
        from .linear_weighted_token_nll import linear_weighted_token_nll

        return linear_weighted_token_nll(hidden, weight, target, 1.0, bias,
                                         reduction=self.reduction,
                                         ignore_index=self.ignore_index, backend=self.backend,
                                         **self.options)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"backend={self.backend!r}, " + ", ".join(
                    f"{k}={v!r}" for k, v in self.options.items()))
