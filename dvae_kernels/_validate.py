"""Input checks shared by the ops: one precise message per constraint (docs/conventions.md).

Value checks that read tensor data (token range, finite beta/eta) would force a host
synchronisation on CUDA; they run on CPU tensors always, on CUDA tensors only in eager mode
outside CUDA-graph capture and ``torch.compile``, and can be turned off with
``DVAE_KERNELS_CHECK_VALUES=0`` (kernels then produce NaN for an out-of-range token instead of
reading out of bounds).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOKEN_DTYPES = (torch.int64, torch.int32)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t: torch.Tensor, *, allow_float64: bool = True) -> None:
    check_tensor(name, t)
    ok = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if t.dtype not in ok:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16 (float64 for references), "
            f"got {describe(t)}"
        )


def check_logits_tokens(logits: torch.Tensor, tokens: torch.Tensor, *,
                        logits_name: str = "logits") -> None:
    check_float(logits_name, logits)
    check_tensor("tokens", tokens)
    if logits.dim() < 1:
        raise ValueError(f"{logits_name} must have a vocabulary dimension [..., V], got a 0-d "
                         "tensor")
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(f"tokens must be int64 or int32, got {describe(tokens)}")
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"tokens must have the shape of {logits_name} without its last dimension, "
            f"{tuple(logits.shape[:-1])}, got {describe(tokens)} for {logits_name} "
            f"{describe(logits)}"
        )
    check_same_device(**{logits_name: logits, "tokens": tokens})


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


_SKIP_VALUE_CHECKS = 0


@contextlib.contextmanager
def no_value_checks():
    """Within this block the ops do not read tensor values to validate them (no host sync on
    CUDA): for callers whose inputs are valid by construction, e.g. tokens they sampled."""
    global _SKIP_VALUE_CHECKS
    _SKIP_VALUE_CHECKS += 1
    try:
        yield
    finally:
        _SKIP_VALUE_CHECKS -= 1


def under_transform() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, ...) is active: the ops then
    compute their PyTorch reference with plain differentiable ops (the registered ops' autograd
    rules are not functorch rules), and read no values (vmap forbids data-dependent checks)."""
    if torch.compiler.is_compiling():
        return False  # dynamo traces the ops' registered custom ops
    try:
        interpreter = torch._C._functorch.peek_interpreter_stack()
    except AttributeError:  # pragma: no cover - functorch is part of every supported torch
        return False
    if interpreter is None:
        return False
    kind = torch._C._functorch.TransformType
    return interpreter.key() in (kind.Grad, kind.Vmap, kind.Jvp)


def refuse_sampling_under_transform(op: str) -> None:
    """The samplers under ``torch.func``: one error saying what to do instead."""
    if under_transform():
        raise RuntimeError(
            f"{op} under a torch.func transform (vmap, grad): sampling is not differentiable "
            "and draws from a random stream; sample outside the transform and pass the tokens "
            "in (the log-prob ops then give their log-probabilities and gradients)")


def values_checkable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values now is allowed (no sync in compiled/captured code)."""
    if _SKIP_VALUE_CHECKS or os.environ.get("DVAE_KERNELS_CHECK_VALUES", "1") == "0":
        return False
    if under_transform():
        return False
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return t.device.type in ("cpu", "cuda")


def check_token_range(tokens: torch.Tensor, V: int, ignore_index: int | None = None,
                      name: str = "tokens") -> None:
    if tokens.numel() == 0 or not values_checkable(tokens):
        return
    bad = (tokens < 0) | (tokens >= V)
    if ignore_index is not None:
        bad &= tokens != ignore_index
    if bool(bad.any()):
        first = tokens[bad].flatten()[0].item()
        also = f" or equal ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"{name} must lie in [0, V) = [0, {V}){also}, got {int(bad.sum())} out of range "
            f"(first: {first}) in {name} of {describe(tokens)}"
        )


def scalar(name: str, value, device: torch.device, *, minimum: float | None = None,
           strict: bool = False) -> torch.Tensor:
    """A float or 0-d tensor as a 0-d float32 tensor on ``device`` (no host copy for floats)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got {describe(value)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {describe(value)}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} must be on {device} (or the CPU), got {describe(value)}")
        # Tensor values are read only where value checks are on (never on CUDA tensors: a
        # sync); under no_value_checks() a NaN eta computed on the device propagates as NaN
        # (the step is then skipped), as it does on CUDA.
        if value.device.type == "cpu" and values_checkable(value):
            _check_scalar_value(name, float(value.detach()), minimum, strict)
        out = value.to(device=device, dtype=torch.float32 if value.dtype != torch.float64
                       else torch.float64)
        return out
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    _check_scalar_value(name, float(value), minimum, strict)
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _check_scalar_value(name, v, minimum, strict):
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if minimum is not None and (v < minimum or (strict and v == minimum)):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {v}")


REDUCTIONS = ("sum", "mean", "none", "sequence_mean")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_ignore_index(ignore_index) -> None:
    if ignore_index is not None and (isinstance(ignore_index, bool)
                                     or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got "
                        f"{type(ignore_index).__name__}")


def float_option(name: str, value, *, minimum: float = 0.0, strict: bool = False,
                 maximum: float | None = None, allow_none: bool = False) -> float | None:
    """A Python float option (temperature, softcap, label_smoothing, z_loss): a tensor would
    need a host read, so it is refused; ``None`` where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum) or (
            maximum is not None and v > maximum):
        bounds = f"{'>' if strict else '>='} {minimum}" + (
            f" and <= {maximum}" if maximum is not None else "")
        raise ValueError(f"{name} must be finite and {bounds}, got {value!r}")
    return v


def keep_mask(tokens: torch.Tensor, ignore_index) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens with ignored positions set to 0, keep mask or None)``: positions whose token
    is ``ignore_index`` (Hugging Face's -100) are computed on token 0 and masked out after."""
    if ignore_index is None:
        return tokens, None
    keep = tokens != ignore_index
    return torch.where(keep, tokens, torch.zeros_like(tokens)), keep


def reduce_loss(loss: torch.Tensor, keep: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Per-token ``loss`` [...] (0 at ignored positions) reduced as ``reduction`` says:
    ``none`` (as is), ``sum``, ``mean`` over the kept tokens (NaN when none is kept, as
    ``F.cross_entropy``), ``sequence_mean`` (each sequence, the last dimension, averaged over
    its kept tokens, then the mean over sequences; a sequence with none kept counts 0, as
    TRL's GRPO loss)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (keep.sum() if keep is not None else loss.numel())
    if loss.dim() == 0:
        raise ValueError("reduction='sequence_mean' needs tokens with a sequence dimension "
                         "[..., T], got a 0-d tensor")
    count = (keep.sum(-1) if keep is not None
             else torch.full(loss.shape[:-1], loss.shape[-1], device=loss.device))
    return (loss.sum(-1) / count.clamp(min=1)).mean()


def token_weights(weights, tokens: torch.Tensor, device: torch.device,
                  device_name: str) -> torch.Tensor:
    """Per-token loss weights (a float or a tensor broadcastable to ``tokens``), detached: they
    are targets, not parameters. Returns them broadcast to ``tokens.shape`` (a view)."""
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = torch.full((), float(weights), device=device)
    check_tensor("weights", weights)
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {describe(weights)}")
    if weights.device != device:
        raise ValueError(f"all tensors must be on one device, got {device_name} on {device}, "
                         f"weights on {weights.device}")
    try:
        return torch.broadcast_to(weights.detach(), tokens.shape)
    except RuntimeError:
        raise ValueError(
            f"weights must broadcast to the shape of tokens {tuple(tokens.shape)}, got "
            f"{describe(weights)}") from None
