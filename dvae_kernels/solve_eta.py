"""solve_eta: the trust-region temperature eta at which the batch-mean ESS equals a target.

docs/algorithm.md, step 6: ESS_i(eta) = 1/Σ_k w_ik(eta)² with the weights of
:mod:`daps_weights`. The mean ESS rises monotonically from (nearly) 1 as eta -> 0 (with beta =
0) to K as eta -> inf, so the target ``ess_target·K`` is met by bisection on log eta. Every
backend runs the same algorithm, so they agree to rounding:

    target = ess_target * K
    if N == 0:                   return eta_max     (nothing constrains eta)
    e = meanESS(eta_max)
    if e is NaN:                 return NaN         (a NaN reward or logq in the batch)
    if e < target:               return eta_max     (unreachable: the loosest trust region)
    lo, hi = log(eta_min), log(eta_max)
    repeat ITERS times:
        mid = (lo + hi) / 2
        if meanESS(exp(mid)) >= target: hi = mid else: lo = mid
    return exp(hi)

The result is the smallest eta (to ~1e-11 in log eta) whose mean ESS reaches the target.
Rows whose K samples are all equal have ESS = K for every eta: they only shift the mean. A
batch in which every eta meets the target (K = 1, identical samples, or a target at most the
mean ESS at eta_min) gives eta_min, where the weights are as sharp as the data allows.

Triton: one program runs the whole bisection (one launch, no host synchronisation; eta never
leaves the device). When N·K fits a tile, the rows are loaded once and stay in registers.
"""

from __future__ import annotations

import math

import torch

from . import _csrc, _dispatch, _validate
from ._triton import HAS_TRITON, tl, triton
from .daps_weights import MAX_K, as_rows, check_rewards_logq, register_backends, row_tile

ITERS = 48

# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------


def _mean_ess(rewards, logq, beta, eta):
    # Max baseline, as the kernels: it cancels in the weights.
    a = rewards - rewards.max(-1, keepdim=True).values
    w = torch.softmax((a - beta * logq) / (eta + beta), dim=-1)
    return (1.0 / (w * w).sum(-1)).mean()


def _torch_forward(rewards, logq, beta, ess_target: float, eta_min: float, eta_max: float):
    N, K = rewards.shape
    dtype = rewards.dtype
    hi_eta = torch.full((), eta_max, dtype=dtype, device=rewards.device)
    if N == 0:
        return hi_eta
    target = ess_target * K
    lo = torch.full((), math.log(eta_min), dtype=dtype, device=rewards.device)
    hi = torch.full((), math.log(eta_max), dtype=dtype, device=rewards.device)
    for _ in range(ITERS):
        mid = 0.5 * (lo + hi)
        ok = _mean_ess(rewards, logq, beta, mid.exp()) >= target
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    e = _mean_ess(rewards, logq, beta, hi_eta)
    eta = torch.where(e < target, hi_eta, hi.exp())
    return torch.where(e.isnan(), float("nan"), eta)


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

# Below this many values the whole batch stays in registers across the bisection.
_RESIDENT = 4096

if HAS_TRITON:
    from .daps_weights import daps_row_weights

    @triton.jit
    def _ess_sum(rewards_ptr, logq_ptr, beta, eta, N, K, r0,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = r0 + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        r = tl.load(rewards_ptr + offs, mask=mask, other=0.0)
        lq = tl.load(logq_ptr + offs, mask=mask, other=0.0)
        _, ess = daps_row_weights(r, lq, mask, beta, eta)
        return tl.sum(tl.where(rows < N, ess, 0.0), axis=0)

    @triton.jit
    def _mean_ess_tiles(rewards_ptr, logq_ptr, beta, eta, N, K,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        total = 0.0
        for r0 in range(0, N, BLOCK_N):
            total += _ess_sum(rewards_ptr, logq_ptr, beta, eta, N, K, r0, BLOCK_N, BLOCK_K)
        return total / N

    @triton.jit
    def _solve_eta_kernel(
        rewards_ptr, logq_ptr, beta_ptr, out_ptr, N, K,
        target, log_lo, log_hi, eta_max,
        ITERS: tl.constexpr, RESIDENT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        beta = tl.load(beta_ptr)
        lo = log_lo
        hi = log_hi
        if RESIDENT:
            rows = tl.arange(0, BLOCK_N)
            cols = tl.arange(0, BLOCK_K)
            mask = (rows[:, None] < N) & (cols[None, :] < K)
            offs = rows[:, None] * K + cols[None, :]
            r = tl.load(rewards_ptr + offs, mask=mask, other=0.0)
            lq = tl.load(logq_ptr + offs, mask=mask, other=0.0)
            _, ess = daps_row_weights(r, lq, mask, beta, eta_max)
            e_hi = tl.sum(tl.where(rows < N, ess, 0.0), axis=0) / N
            for _ in range(ITERS):
                mid = 0.5 * (lo + hi)
                _, ess = daps_row_weights(r, lq, mask, beta, tl.exp(mid))
                ok = tl.sum(tl.where(rows < N, ess, 0.0), axis=0) / N >= target
                hi = tl.where(ok, mid, hi)
                lo = tl.where(ok, lo, mid)
        else:
            e_hi = _mean_ess_tiles(rewards_ptr, logq_ptr, beta, eta_max, N, K, BLOCK_N, BLOCK_K)
            for _ in range(ITERS):
                mid = 0.5 * (lo + hi)
                e = _mean_ess_tiles(rewards_ptr, logq_ptr, beta, tl.exp(mid), N, K,
                                    BLOCK_N, BLOCK_K)
                ok = e >= target
                hi = tl.where(ok, mid, hi)
                lo = tl.where(ok, lo, mid)
        eta = tl.where(e_hi < target, eta_max, tl.exp(hi))
        eta = tl.where(e_hi != e_hi, float("nan"), eta)
        tl.store(out_ptr, eta)


def _triton_forward(rewards, logq, beta, ess_target: float, eta_min: float, eta_max: float):
    N, K = rewards.shape
    out = torch.full((1,), eta_max, dtype=torch.float32, device=rewards.device)
    if N == 0:
        return out.view(())
    block_n, block_k = row_tile(K)
    resident = N * block_k <= _RESIDENT
    if resident:
        block_n = triton.next_power_of_2(N)
    _solve_eta_kernel[(1,)](
        rewards, logq, beta, out, N, K,
        float(ess_target * K), math.log(eta_min), math.log(eta_max), float(eta_max),
        ITERS=ITERS, RESIDENT=resident, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out.view(())


def _native_forward(rewards, logq, beta, ess_target: float, eta_min: float, eta_max: float):
    """The cpu and cuda backends: the C++/CUDA kernels of csrc/."""
    return _csrc.ops().solve_eta_fwd(rewards, logq, beta, ess_target, eta_min, eta_max)


OP = _dispatch.Op("solve_eta")
register_backends(OP, _torch_forward, _triton_forward, _native_forward)


# ---------------------------------------------------------------------------------------------
# Registered op (no autograd: eta is a solution, not a differentiable output).
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::solve_eta", mutates_args=())
def _op(rewards: torch.Tensor, logq: torch.Tensor, beta: torch.Tensor, ess_target: float,
        eta_min: float, eta_max: float, backend: str) -> torch.Tensor:
    return OP.forward(backend)(rewards, logq, beta, ess_target, eta_min, eta_max)


@_op.register_fake
def _(rewards, logq, beta, ess_target, eta_min, eta_max, backend):
    return rewards.new_empty(())


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def solve_eta(rewards: torch.Tensor, logq: torch.Tensor, beta, ess_target: float, *,
              eta_min: float = 1e-6, eta_max: float = 1e12,
              backend: str | None = None) -> torch.Tensor:
    """Solve for the eta at which the batch-mean ESS of :func:`daps_weights` is
    ``ess_target·K`` (bisection in log eta on the device; no host synchronisation).

    Args:
        rewards: ``[N, K]`` rewards (detached).
        logq: ``[N, K]`` sample log-probabilities (detached).
        beta: entropy weight, float or 0-d tensor, ``>= 0``.
        ess_target: the target ESS as a fraction of K, in ``(0, 1]`` (paper: 0.33; 0.25 on
            ImageNet).
        eta_min, eta_max: the search interval, ``0 < eta_min < eta_max``, finite.

    Returns:
        ``eta``, a 0-d float32 tensor (float64 for float64 inputs) on the inputs' device.
        An unreachable target gives ``eta_max``; a batch that meets the target at every eta
        gives ``eta_min``; an empty batch gives ``eta_max``; NaN in the inputs gives NaN.

    Equivalent PyTorch (see the module docstring for the exact iteration)::

        mean_ess = lambda eta: daps_weights(rewards, logq, beta, eta)[1].mean()
        # smallest eta in [eta_min, eta_max] with mean_ess(eta) >= ess_target * K
    """
    check_rewards_logq(rewards, logq)
    if isinstance(ess_target, torch.Tensor) or isinstance(ess_target, bool) or \
            not isinstance(ess_target, (int, float)):
        raise TypeError(f"ess_target must be a float in (0, 1], got "
                        f"{type(ess_target).__name__}")
    if not (0.0 < ess_target <= 1.0):
        raise ValueError(f"ess_target must be a fraction of K in (0, 1], got {ess_target}")
    for name, v in (("eta_min", eta_min), ("eta_max", eta_max)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
    if not eta_min < eta_max:
        raise ValueError(f"eta_min must be < eta_max, got eta_min={eta_min}, eta_max={eta_max}")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    beta_t = _validate.scalar("beta", beta, rewards.device, minimum=0.0).detach().to(dtype)
    if _validate.under_transform():  # torch.func: the same bisection in plain ops
        return _torch_forward(rewards.detach().to(dtype), logq.detach().to(dtype), beta_t,
                              float(ess_target), float(eta_min), float(eta_max))
    name = OP.select(backend, rewards.device, rewards=rewards, logq=logq)
    return _op(as_rows(rewards, dtype), as_rows(logq, dtype), beta_t, float(ess_target),
               float(eta_min), float(eta_max), name)


__all__ = ["solve_eta", "ITERS", "MAX_K"]
