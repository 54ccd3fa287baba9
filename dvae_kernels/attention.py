"""attention: ``F.scaled_dot_product_attention`` with a CPU kernel for small heads.

    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)     # scale dh**-0.5

Read top to bottom: torch backend, the cpu backend (the C++ kernels of csrc/cpu/attention.cpp)
with its registered op and autograd rule, the public function.

Why: a latent transformer's heads are small (head size 16 to 32, 8 to 64 positions), and at
that size PyTorch's CPU flash-attention kernel spends most of its time in per-(batch, head)
setup. The C++ kernel runs one task per (batch, head): scores against 8 keys at a time from a
transposed key block, an online softmax, and the output stored as [B, T, h, dh] so that
merging the heads back needs no copy. The backward recomputes the probabilities from the
saved log-sum-exp. Same numbers as SDPA up to float32 rounding. Causal is top-left aligned, as
SDPA's ``is_causal``: query t sees keys 0..t.

On CUDA (and for float64, under CPU autocast, or without the extension) the torch backend,
SDPA itself, serves: PyTorch's flash and memory-efficient kernels are the right tools there.
The torch backend runs outside the custom op, so SDPA keeps its own autograd and kernel choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _csrc, _dispatch, _validate

# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------


def _torch_forward(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# ---------------------------------------------------------------------------------------------
# cpu backend: csrc/cpu/attention.cpp, registered with its autograd rule
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, h, T, dh], k/v [B, h, S, dh] float32 CPU (unit stride along dh) -> (out
    [B, h, T, dh] stored as [B, T, h, dh], lse [B, h, T])."""
    return _csrc.ops().attention_fwd(q, k, v, causal, scale)


@_op.register_fake
def _(q, k, v, causal, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T))


@torch.library.custom_op("dvae_kernels::attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), each stored as [B, T, h, dh] (the layout of the forward's output)."""
    return _csrc.ops().attention_bwd(grad_out, q, k, v, out, lse, causal, scale)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale):
    def like(t):
        B, H, T, D = t.shape
        return t.new_empty((B, T, H, D)).transpose(1, 2)
    return like(q), like(k), like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, *output)


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _native_forward(q, k, v, causal: bool):
    return _op(q, k, v, causal, q.shape[-1] ** -0.5)[0]


def supports_native(q, k, v, causal: bool = False) -> str | None:
    if _validate.under_transform():
        return "under a torch.func transform SDPA (plain PyTorch) serves"
    if torch.is_autocast_enabled("cpu"):
        return "under CPU autocast SDPA casts its inputs per op; the C++ kernel is float32"
    if not all(t.dtype == torch.float32 for t in (q, k, v)):
        return "the C++ kernel takes float32 only"
    if not all(t.stride(-1) == 1 for t in (q, k, v)):
        return "q, k and v must have unit stride along the head size"
    return None


OP = _dispatch.Op("attention")
OP.register("torch", _torch_forward)
OP.register("cpu", _native_forward, supports=supports_native,
            limits="float32, unit stride along dh, not under autocast")

# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, *,
              backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention, ``softmax(q·kᵀ/√dh)·v`` (causal: query t sees keys
    0..t).

    Args:
        q: ``[B, h, T, dh]``.
        k, v: ``[B, h, S, dh]``, S >= 1.
        causal: top-left aligned causal mask, as SDPA's ``is_causal``.
        backend: ``"torch"`` (SDPA), ``"cpu"`` (the C++ kernel) or ``None``/``"auto"``.

    Returns:
        ``[B, h, T, dh]`` in ``q``'s dtype, differentiable in ``q``, ``k`` and ``v``.

    Equivalent PyTorch::

        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, h, T, dh], got {_validate.describe(t)}")
    if (k.shape != v.shape or k.shape[2] < 1 or q.shape[:2] != k.shape[:2]
            or q.shape[3] != k.shape[3]):
        raise ValueError(f"k and v must be [B, h, S, dh] with S >= 1 and q's B, h and dh, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _validate.check_same_device(q=q, k=k, v=v)
    name = OP.select(backend, q.device, q=q, k=k, v=v, causal=causal)
    return OP.forward(name)(q, k, v, causal)
