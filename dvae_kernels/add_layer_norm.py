"""add_layer_norm: a residual add, the LayerNorm after it and the cast of its output, one pass.

    s = x + r                                          # the residual stream (promoted dtype)
    y = F.layer_norm(s, (D,), weight, bias, eps).to(out_dtype)

and its embedding form, where ``x`` is the row ``index`` of a table (a token embedding):

    s, y = add_layer_norm(F.embedding(index, table), r, ...)

Read top to bottom: torch backend, Triton kernel and launcher, the registered op, the public
functions.

Why: in a KV-cache decode loop every position runs a handful of kernels on a few hundred rows,
and each launch costs more than its work. Eager PyTorch under autocast spends three kernels
here (add, layer_norm, cast), four with the embedding lookup; this is one. A program is one row:
it loads x (or the table row) and r, writes s, normalises in float32 and writes y in the
compute dtype of the next matmul. Bytes per call: R·D·(|x| + |r| + |s| + |y|) + 2·D·|w|.

No backward: the Triton kernel serves inference (the sampler runs under ``no_grad``), so it
refuses inputs that require a gradient while grad mode is on, and the automatic choice then
takes the torch backend. The torch backend runs as plain PyTorch outside the custom op, so
autograd and ``torch.compile`` see straight through it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _dispatch, _validate
from ._triton import HAS_TRITON, next_power_of_2, tl, triton

# ---------------------------------------------------------------------------------------------
# torch backend: the lines the kernel replaces.
# ---------------------------------------------------------------------------------------------


def _torch_forward(x, r, weight, bias, eps: float, out_dtype, index=None):
    if index is not None:
        x = F.embedding(index, x)
    s = x + r
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return s, (y if out_dtype is None else y.to(out_dtype))


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _add_layer_norm_kernel(x_ptr, idx_ptr, r_ptr, w_ptr, b_ptr, s_ptr, y_ptr, D,
                               stride_x, stride_r, stride_s, stride_y, eps,
                               HAS_INDEX: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        if HAS_INDEX:  # x is a table and this row's x is row idx[row] of it
            x_row = tl.load(idx_ptr + row).to(tl.int64)
        else:
            x_row = row.to(tl.int64)
        x = tl.load(x_ptr + x_row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        s = x + r
        tl.store(s_ptr + row * stride_s + cols, s.to(s_ptr.dtype.element_ty), mask=ok)
        mean = tl.sum(s, axis=0) / D
        diff = tl.where(ok, s - mean, 0.0)
        var = tl.sum(diff * diff, axis=0) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = diff * rstd * w + b
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def _triton_forward(x, r, weight, bias, eps: float, out_dtype, index=None):
    """x [R, D] (or a table [T, D] read at rows ``index`` [R]); r [R, D] or [D] (broadcast over
    rows), unit column strides; weight, bias [D]."""
    R, D = (index.shape[0], x.shape[1]) if index is not None else x.shape
    s = torch.empty((R, D), dtype=torch.promote_types(x.dtype, r.dtype), device=x.device)
    y = torch.empty((R, D), dtype=out_dtype, device=x.device)
    if R == 0:
        return s, y
    stride_r = 0 if r.dim() == 1 else r.stride(0)
    _add_layer_norm_kernel[(R,)](
        x, index if index is not None else x, r, weight, bias, s, y, D, x.stride(0), stride_r,
        s.stride(0), y.stride(0), eps, HAS_INDEX=index is not None,
        BLOCK_D=next_power_of_2(D), num_warps=1 if D <= 256 else 4)
    return s, y


def supports_inference_kernel(*tensors) -> str | None:
    """The refusal of the sampler's Triton kernels (no backward) for a differentiable call."""
    if _validate.under_transform():
        return "under a torch.func transform the torch backend (plain PyTorch) serves"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ("the Triton kernel has no backward (it serves no-grad decoding); inputs that "
                "require grad go to the torch backend")
    return None


def _supports_triton(x, r, weight, bias, index=None) -> str | None:
    if x.dtype == torch.float64 or r.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    if index is not None and x.stride(-1) != 1:
        return "the embedding table must have unit stride along D"
    return supports_inference_kernel(x, r, weight, bias)


OP = _dispatch.Op("add_layer_norm")
OP.register("torch", _torch_forward)
OP.register("triton", _triton_forward, supports=_supports_triton,
            limits="no float64, no backward (no-grad calls)")

# ---------------------------------------------------------------------------------------------
# Registered op (the Triton kernel; the torch backend runs outside it, see the docstring).
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::add_layer_norm", mutates_args=())
def _op(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
        out_dtype: torch.dtype, index: Optional[torch.Tensor], backend: str
        ) -> tuple[torch.Tensor, torch.Tensor]:
    return OP.forward(backend)(x, r, weight, bias, eps, out_dtype, index)


@_op.register_fake
def _(x, r, weight, bias, eps, out_dtype, index, backend):
    R, D = (index.shape[0], x.shape[1]) if index is not None else x.shape
    return (x.new_empty((R, D), dtype=torch.promote_types(x.dtype, r.dtype)),
            x.new_empty((R, D), dtype=out_dtype))


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _check_norm(D: int, weight, bias, eps) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        _validate.check_tensor(name, t)
        if tuple(t.shape) != (D,):
            raise ValueError(f"{name} must be [D] = [{D}] (a LayerNorm over the last dim), "
                             f"got {_validate.describe(t)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")


def _kernel_dtype(out_dtype, *dtypes) -> torch.dtype:
    dtype = out_dtype or torch.promote_types(*dtypes)
    return torch.float32 if dtype == torch.float64 else dtype


def add_layer_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, *, out_dtype: torch.dtype | None = None,
                   backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)`` with ``s = x + r`` and ``y = layer_norm(s)`` in ``out_dtype``, one kernel.

    Args:
        x: ``[..., D]`` the residual stream.
        r: ``[..., D]`` (the shape of ``x``) or ``[D]`` (added to every row).
        weight, bias: ``[D]``, the LayerNorm's affine parameters; ``eps`` its epsilon.
        out_dtype: the dtype of ``y`` (the compute dtype of the next matmul); None: the
            LayerNorm's own (float32 for float32 inputs under autocast).
        backend: ``"torch"``, ``"triton"`` or ``None``/``"auto"``.

    Returns:
        ``s`` (``x``'s shape, the promoted dtype of ``x`` and ``r``) and ``y`` (``x``'s shape).
        Differentiable through the torch backend only (see the module docstring).

    Equivalent PyTorch::

        s = x + r
        y = torch.nn.functional.layer_norm(s, (D,), weight, bias, eps).to(out_dtype)
    """
    _validate.check_float("x", x)
    _validate.check_float("r", r)
    D = x.shape[-1]
    if r.shape != x.shape and tuple(r.shape) != (D,):
        raise ValueError(f"r must have x's shape {tuple(x.shape)} or ({D},), got "
                         f"{tuple(r.shape)}")
    _check_norm(D, weight, bias, eps)
    _validate.check_same_device(x=x, r=r, weight=weight, bias=bias)
    name = OP.select(backend, x.device, x=x, r=r, weight=weight, bias=bias)
    if name == "torch":
        return _torch_forward(x, r, weight, bias, float(eps), out_dtype)
    x2 = x.reshape(-1, D)
    r2 = r if r.dim() == 1 else r.reshape(-1, D)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    s, y = _op(x2, r2, weight.detach(), bias.detach(), float(eps),
               _kernel_dtype(out_dtype, x.dtype, r.dtype), None, name)
    return s.view(x.shape), y.view(x.shape)


def embed_add_layer_norm(index: torch.Tensor, table: torch.Tensor, r: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
                         out_dtype: torch.dtype | None = None, backend: str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_layer_norm` of ``table[index]`` (an embedding lookup) and ``r``, the lookup
    inside the same kernel.

    Args:
        index: ``[R]`` integer rows of ``table``.
        table: ``[T, D]``.
        r: ``[D]`` (added to every row) or ``[R, D]``.
        weight, bias, eps, out_dtype, backend: as :func:`add_layer_norm`.

    Returns:
        ``s`` and ``y``, ``[R, D]``.

    Equivalent PyTorch::

        s, y = add_layer_norm(torch.nn.functional.embedding(index, table), r, weight, bias,
                              eps, out_dtype=out_dtype)
    """
    _validate.check_tensor("index", index)
    _validate.check_float("table", table)
    _validate.check_float("r", r)
    if index.dim() != 1 or table.dim() != 2:
        raise ValueError(f"index must be [R] and table [T, D], got {tuple(index.shape)} and "
                         f"{tuple(table.shape)}")
    if index.dtype not in _validate.TOKEN_DTYPES:
        raise TypeError(f"index must be int64 or int32, got {_validate.describe(index)}")
    D = table.shape[1]
    if tuple(r.shape) not in ((D,), (index.shape[0], D)):
        raise ValueError(f"r must be [{D}] or [{index.shape[0]}, {D}], got {tuple(r.shape)}")
    _check_norm(D, weight, bias, eps)
    _validate.check_same_device(index=index, table=table, r=r, weight=weight, bias=bias)
    name = OP.select(backend, table.device, x=table, r=r, weight=weight, bias=bias,
                     index=index)
    if name == "torch":
        return _torch_forward(table, r, weight, bias, float(eps), out_dtype, index)
    r = r if r.stride(-1) == 1 else r.contiguous()
    return _op(table.detach(), r, weight.detach(), bias.detach(), float(eps),
               _kernel_dtype(out_dtype, table.dtype, r.dtype), index, name)
