"""weighted_token_nll: -Σ w·log softmax(logits)[token], the encoder's weighted-ML loss (§1.7).

    loss = -(weights * log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0])
    then .sum(), .mean() over tokens, or kept per token ("none")

Read top to bottom: torch backend, Triton kernel and launcher, registered op, public function.

Gradient in the backward pass, on every device. The forward computes only the loss (one read
of the logits); the backward runs the same kernel once more with the weights multiplied by the
incoming gradient (in float32), writing the final gradient ``w·g·(softmax(x) - onehot(t))``
straight away: one read and one [R, V] write. Computing the gradient in the forward and scaling
it in the backward would move 4 [R, V] passes instead of 3, round the scale to the logits'
dtype (in fp16 with ``reduction="mean"`` over 5e5 tokens the gradient underflows to zero), and
on the CPU pay page faults for a second buffer. The op still
accepts ``compute_grad=True`` (its backward then scales in float32). When the logits do not
require grad, no buffer is written.
"""

from __future__ import annotations

import torch

from . import _csrc, _dispatch, _validate
from ._triton import HAS_TRITON, ROW_WARPS, row_tile, tl, triton, vec16
from .token_logprobs import MAX_V, _acc_dtype, log_softmax_parts

if HAS_TRITON:
    from ._triton import LN2, LOG2E, exp2_fast, online_softmax_step

# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------


def _torch_forward(logits, tokens, weights, compute_grad: bool):
    """logits [R, V], tokens [R], weights [R] -> (loss [R], grad [R, V] or empty)."""
    x = logits.to(_acc_dtype(logits.dtype))
    V = x.shape[-1]
    w = weights.to(x.dtype)
    shifted, log_s, _ = log_softmax_parts(x)
    valid = (tokens >= 0) & (tokens < V)
    idx = torch.where(valid, tokens, 0).long()
    # (x - m) - log s, never x - lse (see log_softmax_parts)
    picked = shifted.gather(-1, idx[:, None])[:, 0] - log_s if V > 0 else log_s
    logp = torch.where(valid, picked, float("nan"))
    loss = -w * logp
    if not compute_grad:
        return loss, logits.new_empty((0,))
    grad = (shifted - log_s[:, None]).exp()
    grad.scatter_add_(-1, idx[:, None], -valid[:, None].to(x.dtype))
    grad.mul_(w[:, None])
    return loss, grad.to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _weighted_token_nll_kernel(
        logits_ptr, tokens_ptr, weights_ptr, loss_ptr, grad_ptr,
        n_rows, V, stride_row, stride_grad,
        COMPUTE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
        ONE_TILE: tl.constexpr, VEC: tl.constexpr,
    ):
        # e = 2^((x - m)·log2 e) (FADD, FMUL, one MUFU.EX2); loss = -w·((x_t - m) - log s),
        # never x - lse; gradient w·e/s - w·onehot, the scale w/s in fp32 until the store.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        if VEC > 1:  # 16-byte rows: vector loads and stores (as in token_logprobs)
            V = (V // VEC) * VEC
            stride_row = (stride_row // VEC) * VEC
            stride_grad = (stride_grad // VEC) * VEC
        row_off = rows.to(tl.int64) * stride_row
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        tok_ok = (tok >= 0) & (tok < V)
        tok32 = tl.where(tok_ok, tok, -1).to(tl.int32)
        w = tl.load(weights_ptr + rows, mask=row_ok, other=0.0)
        x_tok = tl.load(logits_ptr + row_off + tok, mask=row_ok & tok_ok,
                        other=float("nan")).to(tl.float32)
        out_off = rows.to(tl.int64) * stride_grad
        if ONE_TILE:
            # The whole row is in registers: statistics and gradient from one read.
            cols = tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols[None, :] < V)
            x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32)
            m = tl.max(x, axis=1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            e = exp2_fast((x - m_safe[:, None]) * LOG2E)
            s = tl.sum(e, axis=1)
            tl.store(loss_ptr + rows, -w * ((x_tok - m_safe) - tl.math.log2(s) * LN2),
                     mask=row_ok)
            if COMPUTE_GRAD:
                g = e * (w / s)[:, None] - tl.where(cols[None, :] == tok32[:, None],
                                                    w[:, None], 0.0)
                tl.store(grad_ptr + out_off[:, None] + cols[None, :],
                         g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            m = tl.full([BLOCK_R], float("-inf"), tl.float32)
            m_safe = tl.zeros([BLOCK_R], tl.float32)
            s = tl.zeros([BLOCK_R], tl.float32)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                mask = row_ok[:, None] & (cols[None, :] < V)
                x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=mask,
                            other=float("-inf")).to(tl.float32)
                m, m_safe, s, _ = online_softmax_step(x, m, m_safe, s, s, False)
            tl.store(loss_ptr + rows, -w * ((x_tok - m_safe) - tl.math.log2(s) * LN2),
                     mask=row_ok)
            if COMPUTE_GRAD:
                scale = w / s
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + tl.arange(0, BLOCK_V)
                    mask = row_ok[:, None] & (cols[None, :] < V)
                    x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=mask,
                                other=float("-inf")).to(tl.float32)
                    g = exp2_fast((x - m_safe[:, None]) * LOG2E) * scale[:, None] \
                        - tl.where(cols[None, :] == tok32[:, None], w[:, None], 0.0)
                    tl.store(grad_ptr + out_off[:, None] + cols[None, :],
                             g.to(grad_ptr.dtype.element_ty), mask=mask)


def _triton_forward(logits, tokens, weights, compute_grad: bool):
    R, V = logits.shape
    loss = torch.empty(R, dtype=torch.float32, device=logits.device)
    grad = (torch.empty((R, V), dtype=logits.dtype, device=logits.device) if compute_grad
            else logits.new_empty((0,)))
    if R == 0:
        return loss, grad
    block_r, block_v = row_tile(V)
    _weighted_token_nll_kernel[(triton.cdiv(R, block_r),)](
        logits, tokens, weights, loss, grad if compute_grad else loss,
        R, V, logits.stride(0), grad.stride(0) if compute_grad else 0,
        COMPUTE_GRAD=compute_grad, BLOCK_R=block_r, BLOCK_V=block_v,
        ONE_TILE=V <= block_v, VEC=vec16(logits, *((grad,) if compute_grad else ())),
        num_warps=ROW_WARPS,
    )
    return loss, grad


def _supports_triton(logits, tokens, weights) -> str | None:
    if logits.dtype == torch.float64:
        return "float64 logits are served by the torch backend only"
    if logits.shape[-1] > MAX_V:
        return f"V = {logits.shape[-1]} exceeds the Triton kernel's limit of {MAX_V}"
    return None


def _native_forward(logits, tokens, weights, compute_grad: bool):
    """The cpu and cuda backends: the C++/CUDA kernels of csrc/."""
    return _csrc.ops().weighted_token_nll_fwd(logits, tokens, weights, compute_grad)


def _supports_native(logits, tokens, weights) -> str | None:
    return _csrc.refuse_float64("logits", logits)


OP = _dispatch.Op("weighted_token_nll")
OP.register("torch", _torch_forward)
OP.register("triton", _triton_forward, supports=_supports_triton,
            limits=f"no float64, V <= {MAX_V}")
for _name in ("cpu", "cuda"):
    OP.register(_name, _native_forward, supports=_supports_native, limits="no float64")


# ---------------------------------------------------------------------------------------------
# Registered op: logits [R, V] (unit column stride), tokens [R], weights [R] float32.
# Returns the per-token loss and, when compute_grad, d(sum of loss)/d logits.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::weighted_token_nll", mutates_args=())
def _op(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
        compute_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return OP.forward(backend)(logits, tokens, weights, compute_grad)


@_op.register_fake
def _(logits, tokens, weights, compute_grad, backend):
    loss = logits.new_empty(logits.shape[:1], dtype=_acc_dtype(logits.dtype))
    grad = (torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad
            else logits.new_empty((0,)))
    return loss, grad


def _setup_context(ctx, inputs, output):
    logits, tokens, weights, compute_grad, backend = inputs
    ctx.compute_grad = compute_grad
    ctx.backend = backend
    if compute_grad:
        ctx.save_for_backward(output[1])
    else:
        ctx.save_for_backward(logits, tokens, weights)


def _autograd_backward(ctx, grad_loss, _grad_grad):
    if ctx.compute_grad:
        (grad,) = ctx.saved_tensors
        # Out of place: the saved buffer must survive a backward with retain_graph=True.
        # The scale stays fp32 until the cast (a bf16 scale would round grad_loss).
        return ((grad.to(grad_loss.dtype) * grad_loss[:, None]).to(grad.dtype),
                None, None, None, None)
    # The gradient of Σ g·loss is the kernel's gradient with weights w·g: one pass, one buffer.
    logits, tokens, weights = ctx.saved_tensors
    _, grad = _op(logits, tokens, weights * grad_loss.to(weights.dtype), True, ctx.backend)
    return grad, None, None, None, None


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function and module
# ---------------------------------------------------------------------------------------------

def weighted_token_nll(logits: torch.Tensor, tokens: torch.Tensor, weights,
                       *, reduction: str = "sum", ignore_index: int | None = -100,
                       backend: str | None = None) -> torch.Tensor:
    """Weighted negative log-likelihood of ``tokens``: ``-Σ weights · log p(tokens)``.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (float64: torch backend only).
        tokens: ``[...]`` int64 or int32 in ``[0, V)`` or equal to ``ignore_index``.
        weights: a tensor broadcastable to ``tokens.shape`` (e.g. ``[N, K, 1]`` over
            ``[N, K, L]``) or a float. They are targets: no gradient flows into them (they are
            detached), as in DAPS where they are the stop-gradient importance weights.
        reduction: ``"sum"`` (default), ``"mean"`` (over the tokens not ignored, not over the
            weights), ``"sequence_mean"`` (over each sequence's kept tokens, the last
            dimension, then over sequences) or ``"none"`` (per token, ``[...]``).
        ignore_index: positions whose token equals it (Hugging Face's -100) contribute
            neither loss nor gradient; None ignores nothing.

    Returns:
        float32 loss; differentiable in ``logits``.

    Equivalent PyTorch::

        lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None].long())[..., 0]
        loss = -(weights * lp)                       # "none" (0 where ignored)
        loss.sum(), loss.sum() / keep.sum()          # "sum", "mean"
    """
    _validate.check_logits_tokens(logits, tokens)
    _validate.check_reduction(reduction)
    _validate.check_ignore_index(ignore_index)
    V = logits.shape[-1]
    _validate.check_token_range(tokens, V, ignore_index)
    w = _validate.token_weights(weights, tokens, logits.device, "logits")
    safe, keep = _validate.keep_mask(tokens, ignore_index)
    acc = _acc_dtype(logits.dtype)
    if keep is not None:  # an ignored position weighs nothing, in the kernel too
        w = torch.where(keep, w.to(acc), 0.0)
    if _validate.under_transform():
        lp = torch.log_softmax(logits.to(acc), -1)
        loss = -(w.to(acc) * lp.gather(-1, safe[..., None].long())[..., 0])
    else:
        name = OP.select(backend, logits.device, logits=logits, tokens=tokens, weights=w)
        x = logits.reshape(-1, V)
        if x.stride(-1) != 1:
            x = x.contiguous()
        # The gradient in the backward pass, on every device (module docstring).
        loss, _ = _op(x, safe.reshape(-1).contiguous(), w.reshape(-1).to(acc).contiguous(),
                      False, name)
        loss = loss.view(tokens.shape)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
    return _validate.reduce_loss(loss, keep, reduction)


class WeightedTokenNLL(torch.nn.Module):
    """Module form of :func:`weighted_token_nll`."""

    def __init__(self, reduction: str = "sum", backend: str | None = None, *,
                 ignore_index: int | None = -100) -> None:
        super().__init__()
        _validate.check_reduction(reduction)
        _validate.check_ignore_index(ignore_index)
        self.reduction = reduction
        self.backend = backend
        self.ignore_index = ignore_index

    def forward(self, logits, tokens, weights):
        return weighted_token_nll(logits, tokens, weights, reduction=self.reduction,
                                  ignore_index=self.ignore_index, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"backend={self.backend!r}")
