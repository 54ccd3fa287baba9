"""daps_weights: the non-parametric target's importance weights and effective sample size.

docs/algorithm.md, steps 3-6, per row i over its K samples:

    A_ik   = r_ik - logsumexp_k r_ik                       (advantages)
    s_ik   = (A_ik - beta * logq_ik) / (eta + beta)
    w_ik   = softmax_k(s_ik)
    ess_i  = 1 / Σ_k w_ik²                                 (in [1, K])

Read top to bottom: torch backend, Triton kernel and launcher, registered op with its
autograd rule (in eta), public function.

Any per-row baseline cancels in the softmax, so the kernels subtract the row maximum of the
rewards (one pass, no exp) instead of the logsumexp; the result is the same up to rounding.
The gradient in eta (for the learned-eta loss on the mean ESS) is computed from the saved
weights with torch ops shared by all backends: it is O(N·K) and runs once per step.
"""

from __future__ import annotations

import torch

from . import _csrc, _dispatch, _validate
from ._triton import HAS_TRITON, next_power_of_2, tl, triton

# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------


def scores(rewards, logq, beta, eta):
    """s = (A - beta·logq)/(eta + beta) with the logsumexp baseline (docs/algorithm.md, step 5)."""
    advantages = rewards - torch.logsumexp(rewards, dim=-1, keepdim=True)
    return (advantages - beta * logq) / (eta + beta)


def _torch_forward(rewards, logq, beta, eta):
    w = torch.softmax(scores(rewards, logq, beta, eta), dim=-1)
    return w, 1.0 / (w * w).sum(-1)


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def daps_row_weights(r, lq, mask, beta, eta):
        """Weights [BLOCK_N, BLOCK_K] and ESS [BLOCK_N] of a tile of rows (shared with
        solve_eta's kernel). Masked entries get weight 0; fully masked rows get ESS NaN."""
        r_max = tl.max(tl.where(mask, r, float("-inf")), axis=1)
        s = (r - r_max[:, None] - beta * lq) / (eta + beta)
        s = tl.where(mask, s, float("-inf"))
        s_max = tl.max(s, axis=1)
        e = tl.exp(s - s_max[:, None])
        w = e / tl.sum(e, axis=1)[:, None]
        return w, 1.0 / tl.sum(w * w, axis=1)

    @triton.jit
    def _daps_weights_kernel(
        rewards_ptr, logq_ptr, beta_ptr, eta_ptr, w_ptr, ess_ptr, N, K,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        r = tl.load(rewards_ptr + offs, mask=mask, other=0.0)
        lq = tl.load(logq_ptr + offs, mask=mask, other=0.0)
        beta = tl.load(beta_ptr)
        eta = tl.load(eta_ptr)
        w, ess = daps_row_weights(r, lq, mask, beta, eta)
        tl.store(w_ptr + offs, w, mask=mask)
        tl.store(ess_ptr + rows, ess, mask=rows < N)


# K above this is served by the torch backend (a row of samples lives in one tile).
MAX_K = 8192


def row_tile(K: int) -> tuple[int, int]:
    """(rows, samples) per Triton tile: about 2048 values per program."""
    block_k = next_power_of_2(max(K, 1))
    return max(1, 2048 // block_k), block_k


def _triton_forward(rewards, logq, beta, eta):
    N, K = rewards.shape
    w = torch.empty((N, K), dtype=torch.float32, device=rewards.device)
    ess = torch.empty(N, dtype=torch.float32, device=rewards.device)
    if N == 0 or K == 0:
        return w, ess
    block_n, block_k = row_tile(K)
    _daps_weights_kernel[(triton.cdiv(N, block_n),)](
        rewards, logq, beta, eta, w, ess, N, K, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return w, ess


def supports_triton(rewards, logq) -> str | None:
    if rewards.dtype == torch.float64:
        return "float64 rewards are served by the torch backend only"
    if rewards.shape[-1] > MAX_K:
        return f"K = {rewards.shape[-1]} exceeds the Triton kernel's limit of {MAX_K}"
    return None


def _native_forward(rewards, logq, beta, eta):
    """The cpu and cuda backends: the C++/CUDA kernels of csrc/."""
    return _csrc.ops().daps_weights_fwd(rewards, logq, beta, eta)


def supports_native(rewards, logq) -> str | None:
    return _csrc.refuse_float64("rewards", rewards)


def register_backends(op: _dispatch.Op, torch_forward, triton_forward, native_forward) -> None:
    """The backends of an op over [N, K] rows of samples (daps_weights, solve_eta), which
    accept the same inputs. Their CUDA kernels run one block for the whole batch and, by a
    reading of their compiled code, several times slower than the Triton kernels at the
    paper's N x K, so they run only when asked for by name."""
    op.register("torch", torch_forward)
    op.register("triton", triton_forward, supports=supports_triton,
                limits=f"no float64, K <= {MAX_K}")
    op.register("cpu", native_forward, supports=supports_native, limits="no float64")
    op.register("cuda", native_forward, supports=supports_native, automatic=False,
                limits="no float64, explicit backend='cuda' only")


OP = _dispatch.Op("daps_weights")
register_backends(OP, _torch_forward, _triton_forward, _native_forward)


# ---------------------------------------------------------------------------------------------
# Registered op: rewards, logq [N, K] contiguous float32 (float64 for references); beta, eta
# 0-d tensors of the same dtype on the same device.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::daps_weights", mutates_args=())
def _op(rewards: torch.Tensor, logq: torch.Tensor, beta: torch.Tensor, eta: torch.Tensor,
        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return OP.forward(backend)(rewards, logq, beta, eta)


@_op.register_fake
def _(rewards, logq, beta, eta, backend):
    return torch.empty_like(rewards), rewards.new_empty(rewards.shape[:1])


def _setup_context(ctx, inputs, output):
    rewards, logq, beta, eta, _ = inputs
    w, ess = output
    ctx.save_for_backward(rewards, logq, beta, eta, w, ess)


def _autograd_backward(ctx, grad_w, grad_ess):
    # d s_k/d eta = -s_k/(eta+beta); dw_k/d eta = w_k (d_k - Σ_j w_j d_j);
    # d ess/d eta = -2 ess² Σ_k w_k dw_k/d eta.
    rewards, logq, beta, eta, w, ess = ctx.saved_tensors
    d = -scores(rewards, logq, beta, eta) / (eta + beta)
    d = torch.where(w == 0, 0.0, d)  # -inf scores carry no weight and no gradient
    dw = w * (d - (w * d).sum(-1, keepdim=True))
    grad_eta = torch.zeros((), dtype=eta.dtype, device=eta.device)
    if grad_w is not None:
        grad_eta = grad_eta + (grad_w * dw).sum()
    if grad_ess is not None:
        dess = -2 * ess * ess * (w * dw).sum(-1)
        grad_eta = grad_eta + (grad_ess * dess).sum()
    return None, None, None, grad_eta, None


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def check_rewards_logq(rewards, logq) -> None:
    _validate.check_float("rewards", rewards)
    _validate.check_float("logq", logq)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, K], got {_validate.describe(rewards)}")
    if rewards.shape[1] == 0:
        raise ValueError(f"rewards must hold K >= 1 samples per row, got "
                         f"{_validate.describe(rewards)}")
    if logq.shape != rewards.shape:
        raise ValueError(f"logq must have the shape of rewards {tuple(rewards.shape)}, got "
                         f"{_validate.describe(logq)}")
    _validate.check_same_device(rewards=rewards, logq=logq)


def as_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).contiguous()


def daps_weights(rewards: torch.Tensor, logq: torch.Tensor, beta, eta, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised importance weights of the DAPS target and their effective sample size.

    Args:
        rewards: ``[N, K]`` rewards ``log p(x_i | z_ik)`` (detached; no gradient flows).
        logq: ``[N, K]`` ``log q(z_ik | x_i)`` of the samples (detached: ``sg`` in §1).
        beta: entropy weight, float or 0-d tensor, ``>= 0``.
        eta: trust-region temperature, float or 0-d tensor, ``> 0``.

    Returns:
        ``(weights [N, K], ess [N])`` float32 (float64 for float64 inputs). Rows of
        ``weights`` sum to 1; ``ess`` lies in ``[1, K]``. Both are differentiable in ``eta``
        when it is a tensor that requires grad (the paper's learned-eta loss
        ``(ess.mean() - rho*K)**2``); not in rewards, logq or beta.

    Equivalent PyTorch::

        A = rewards - rewards.logsumexp(-1, keepdim=True)
        w = torch.softmax((A - beta * logq) / (eta + beta), -1)
        ess = 1 / (w ** 2).sum(-1)
    """
    check_rewards_logq(rewards, logq)
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    device = rewards.device
    beta_t = _validate.scalar("beta", beta, device, minimum=0.0).to(dtype)
    eta_t = _validate.scalar("eta", eta, device, minimum=0.0, strict=True).to(dtype)
    if _validate.under_transform():  # torch.func: the reference, differentiable in eta
        return _torch_forward(rewards.detach().to(dtype), logq.detach().to(dtype),
                              beta_t.detach(), eta_t)
    name = OP.select(backend, device, rewards=rewards, logq=logq)
    return _op(as_rows(rewards, dtype), as_rows(logq, dtype), beta_t.detach(), eta_t, name)
