"""The kernel microbenchmark harness: ``python -m bench [--quick] [--ops ...] [--out DIR]``.

One harness for every op (STYLE.md 8). Read top to bottom:

1. the machine and its versions;
2. timing (CUDA events on a GPU, ``perf_counter`` on a CPU) and the statistics kept
   (median, p20, p80);
3. the roofline measured in the same run (device-copy bandwidth, matmul rate);
4. the op specs: one small :class:`OpSpec` per op, with its shape sets, its inputs, its plain
   PyTorch reference (what ``torch.compile`` is given) and the bytes or FLOPs one call moves
   or does, written as a formula; an op is benchmarked only when ``dvae_kernels`` has it;
5. the providers of an op: each ``dvae_kernels`` backend that runs on the device, the reference
   under ``torch.compile``, and Liger-Kernel / Cut Cross-Entropy where installed;
6. the runner: the same rotating input sets for every provider, providers validated against
   the ``torch`` backend first, warm-up, then providers interleaved round by round;
7. output: JSON, CSV, a printed table, a PNG of throughput against V;
8. the regression check against a stored baseline (``--compare``);
9. the command line.

Adding an op: write its ``OpSpec`` in section 4 and append it to ``SPECS``. A spec that is not
one dvae_kernels function (``categorical_head``: the FusedCategoricalHead's log_prob with its
entropy) names its callable in ``op=`` and the op whose backends it has in ``supports_of=``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dvae_kernels
from dvae_kernels import _dispatch
from dvae_kernels.info import machine

# ---------------------------------------------------------------------------------------------
# 1. The machine
# ---------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: names, versions, date, and how busy the machine was."""
    base = machine()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    name = gpu or base["cpu"]
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "name": name,
        "slug": slug(name),
        "device": device.type,
        "gpu": gpu,
        "cpu": base["cpu"],
        "cpu_count": base["cores"],
        "torch_threads": torch.get_num_threads(),
        "loadavg": load,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": base["triton"],
        "python": platform.python_version(),
        "dvae": dvae_kernels.__version__,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def slug(name: str) -> str:
    """A folder name for a machine: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def cache_bytes(device: torch.device) -> int:
    """The last-level cache that rotating inputs must overflow (L2 on a GPU, L3 on a CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20))
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        return 32 << 20


# ---------------------------------------------------------------------------------------------
# 2. Timing and statistics
# ---------------------------------------------------------------------------------------------


class Timer:
    """Times one call: CUDA events on a GPU (no host sync between calls), ``perf_counter`` on
    a CPU (CPU ops are synchronous). ``start``/``stop`` bracket the call; ``seconds`` resolves
    the samples of a round once the round is over."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, started):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return (started, ev)
        return time.perf_counter() - started

    def seconds(self, samples: list) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in samples]
        return list(samples)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p20 and p80 in milliseconds."""
    xs = sorted(seconds)
    if len(xs) == 1:
        q = [xs[0]] * 9
    else:
        q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"median_ms": statistics.median(xs) * 1e3, "p20_ms": q[1] * 1e3,
            "p80_ms": q[7] * 1e3, "samples": len(xs)}


def time_fn(fn: Callable[[], Any], timer: Timer, reps: int, warmup: int) -> list[float]:
    """Plain repeated timing of one function (used for the roofline probes)."""
    for _ in range(warmup):
        fn()
    timer.sync()
    samples = []
    for _ in range(reps):
        t = timer.start()
        fn()
        samples.append(timer.stop(t))
    return timer.seconds(samples)


# ---------------------------------------------------------------------------------------------
# 3. The roofline, measured in the same run
# ---------------------------------------------------------------------------------------------


def measure_roofline(device: torch.device, quick: bool, tiny: bool = False) -> dict[str, Any]:
    """Device-copy bandwidth (GB/s, read + write counted) and matmul rate (TFLOP/s): bf16 on a
    GPU (the dtype the ops run in there), float32 on a CPU. Each result is later given as a
    fraction of one of these, so the ratio, not the absolute figure, is what carries over.
    ``tiny`` (pipeline checks only) uses probes small enough to sit in cache."""
    timer = Timer(device)
    if device.type == "cuda":
        copy_elems, mm_n, mm_dtype = 256 << 20, 8192, torch.bfloat16  # 512 MiB bf16 per buffer
    else:
        # 128 / 256 MiB float32 per buffer: well past any CPU's last-level cache.
        copy_elems = (32 << 20) if quick else (64 << 20)
        mm_n, mm_dtype = (512 if quick else 1024), torch.float32
    if tiny:
        copy_elems, mm_n = 1 << 20, 128
    copy_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.randn(copy_elems, device=device, dtype=torch.float32).to(copy_dtype)
    dst = torch.empty_like(src)
    t_copy = statistics.median(time_fn(lambda: dst.copy_(src), timer, reps=10 if quick else 30,
                                       warmup=3))
    copy_bytes = 2 * src.numel() * src.element_size()
    a = torch.randn(mm_n, mm_n, device=device, dtype=torch.float32).to(mm_dtype)
    b = torch.randn(mm_n, mm_n, device=device, dtype=torch.float32).to(mm_dtype)
    t_mm = statistics.median(time_fn(lambda: a @ b, timer, reps=5 if quick else 20, warmup=2))
    return {
        "copy_GBps": copy_bytes / t_copy / 1e9,
        "copy_bytes": copy_bytes,
        "copy_dtype": str(copy_dtype).replace("torch.", ""),
        "matmul_TFLOPs": 2 * mm_n**3 / t_mm / 1e12,
        "matmul_n": mm_n,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
    }


# ---------------------------------------------------------------------------------------------
# 4. Op specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One shape: named dimensions, a label saying where it comes from, and a dtype (None:
    the device's training dtype, bf16 on a GPU, float32 on a CPU)."""

    label: str
    dims: dict[str, int]
    dtype: torch.dtype | None = None

    def key(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.dims.items())


@dataclass
class Provider:
    """One implementation of an op. ``fn(inputs) -> output``; ``mutates`` when it writes into
    its inputs (Liger writes the gradient into the logits), so it gets private copies."""

    name: str
    fn: Callable[[dict], Any] | None
    unavailable: str | None = None
    mutates: bool = False
    modes: tuple[str, ...] | None = None  # None: every mode of the op


@dataclass
class OpSpec:
    """Everything the harness needs to benchmark one op.

    ``call(f, inputs)`` calls the op (or its reference, same signature less ``backend``) on
    one input set; ``reference`` is plain PyTorch, the function ``torch.compile`` is given;
    ``cost(dims, elem_bytes, token_bytes, mode) -> (bytes, flops)`` the traffic or work of one
    call, also written out in ``cost_formula``; ``bound`` says which roofline applies.
    ``check(inputs, output) -> reason | None`` replaces the comparison with the torch backend
    for ops whose output is random (sampling) or not unique (a solved η).
    """

    name: str
    modes: tuple[str, ...]
    bound: str  # "memory" or "compute"
    cost_formula: dict[str, str]
    sets: dict[str, list[Case]]
    make: Callable[[dict, torch.dtype, torch.device, torch.Generator], dict]
    call: Callable[[Callable, dict], Any]
    reference: Callable
    cost: Callable[[dict, int, int, str], tuple[float, float]]
    grad_wrt: tuple[str, ...] = ()
    external: Callable[[torch.device], list[Provider]] = lambda device: []
    check: Callable[[dict, Any], str | None] | None = None
    # For a spec that is not one dvae_kernels function (a module's method, a composition):
    # the callable taking ``backend=``, and the registered op whose backends it runs on.
    op: Callable | None = None
    supports_of: str | None = None

    def available(self) -> bool:
        return self.op is not None or hasattr(dvae_kernels, self.name)

    def resolve(self) -> Callable:
        return self.op if self.op is not None else getattr(dvae_kernels, self.name)


def _logits(shape, dtype, device, gen) -> torch.Tensor:
    # Spread like a trained model's logits (a few nats), generated in float32 then cast so
    # every dtype sees the same values.
    return (2.0 * torch.randn(shape, device=device, generator=gen)).to(dtype)


def _tokens(shape, V, device, gen) -> torch.Tensor:
    return torch.randint(0, V, shape, device=device, generator=gen)


# The paper's shapes (DESIGN.md §1): rows = N·K·L sampled tokens of one training step.
_PAPER_ROWS = [
    ("MNIST N·K·L=256·8·8", 256 * 8 * 8, 256),
    ("CIFAR-10 N·K·L=256·8·64", 256 * 8 * 64, 512),
    ("ImageNet-256 N·K·L=64·8·1024", 64 * 8 * 1024, 1024),
]
# LLM-like vocabularies: 8192 tokens (e.g. 4 sequences of 2048), V from 32k to 128k.
_LLM_V = (32768, 50257, 65536, 131072)


def _rows_sets() -> dict[str, list[Case]]:
    return {
        "paper": [Case(lbl, {"R": r, "V": v}) for lbl, r, v in _PAPER_ROWS],
        "llm": [Case(f"LLM V={v}", {"R": 8192, "V": v}) for v in _LLM_V],
        "cpu": [Case("MNIST N·K·L=256·8·8", {"R": 16384, "V": 256}),
                Case("ImageNet-256, one image's K·L=8·1024", {"R": 8192, "V": 1024}),
                Case("LLM-like V=32768", {"R": 512, "V": 32768})],
        "quick": [Case("MNIST-like", {"R": 2048, "V": 256}),
                  Case("ImageNet-like V=1024", {"R": 1024, "V": 1024}),
                  Case("LLM-like V=32768", {"R": 64, "V": 32768})],
        "tiny": [Case("tiny", {"R": 64, "V": 256}), Case("tiny V=1000", {"R": 16, "V": 1000})],
    }


def _liger_ce():
    """Liger-Kernel's cross-entropy (Triton, CUDA tensors only), or the reason it is absent."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception as exc:  # ImportError, or a Triton/torch version clash inside it
        return None, f"liger-kernel is not importable ({type(exc).__name__}: {exc})"
    return liger_cross_entropy, None


def _cce():
    """Cut Cross-Entropy's linear_cross_entropy, or the reason it is absent."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        return None, f"cut-cross-entropy is not importable ({type(exc).__name__}: {exc})"
    return linear_cross_entropy, None


def _liger_provider(device: torch.device, fn_of_ce: Callable) -> Provider:
    ce, reason = _liger_ce()
    if reason is None and device.type != "cuda":
        reason = "Liger-Kernel is Triton code; on the CPU it only runs interpreted (not timed)"
    if reason is not None:
        return Provider("liger", None, unavailable=reason)
    return Provider("liger", fn_of_ce(ce), mutates=True)


def _cce_provider(device: torch.device, fn_of_lce: Callable) -> Provider:
    lce, reason = _cce()
    if reason is not None:
        return Provider("cce", None, unavailable=reason)
    # Its Triton implementation on a GPU; its own torch.compile implementation on a CPU.
    impl = "cce" if device.type == "cuda" else "torch_compile"
    return Provider(f"cce[{impl}]", fn_of_lce(functools.partial(lce, impl=impl)))


# --- token_logprobs --------------------------------------------------------------------------


def _tlp_make(dims, dtype, device, gen):
    R, V = dims["R"], dims["V"]
    return {"logits": _logits((R, V), dtype, device, gen), "tokens": _tokens((R,), V, device, gen),
            "grad_out": torch.randn(R, device=device, generator=gen)}


def _tlp_reference(logits, tokens):
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]


def _tlp_cost(dims, b, tb, mode):
    R, V = dims["R"], dims["V"]
    fwd = R * V * b + R * (tb + 12)  # logits, tokens; logp, lse, entropy written
    bwd = 2 * R * V * b + R * (tb + 8)  # logits read, grad written; tokens, grad_out, lse read
    return (fwd if mode == "fwd" else fwd + bwd), 0.0


TOKEN_LOGPROBS = OpSpec(
    name="token_logprobs",
    modes=("fwd", "fwd+bwd"),
    bound="memory",
    cost_formula={"fwd": "R·V·b + R·(tb + 12)",
                  "fwd+bwd": "3·R·V·b + R·(2·tb + 20)"},
    sets=_rows_sets(),
    make=_tlp_make,
    call=lambda f, i: f(i["logits"], i["tokens"]),
    reference=_tlp_reference,
    cost=_tlp_cost,
    grad_wrt=("logits",),
    external=lambda device: [_liger_provider(
        device, lambda ce: lambda i: -ce(i["logits"], i["tokens"], reduction="none"))],
)

# --- weighted_token_nll ----------------------------------------------------------------------


def _wnll_sets() -> dict[str, list[Case]]:
    # logits [B, L, V] with one weight per sequence ([B, 1], the encoder loss's sg(w_ik)).
    def c(label, B, L, V):
        return Case(label, {"B": B, "L": L, "V": V})

    return {
        "paper": [c("MNIST N·K=256·8, L=8", 2048, 8, 256),
                  c("CIFAR-10 N·K=256·8, L=64", 2048, 64, 512),
                  c("ImageNet-256 N·K=64·8, L=1024", 512, 1024, 1024)],
        "llm": [c(f"LLM V={v}", 4, 2048, v) for v in _LLM_V],
        "cpu": [c("MNIST N·K=256·8, L=8", 2048, 8, 256),
                c("ImageNet-256, one image's K=8, L=1024", 8, 1024, 1024),
                c("LLM-like V=32768", 2, 256, 32768)],
        "quick": [c("MNIST-like", 256, 8, 256), c("ImageNet-like V=1024", 16, 64, 1024),
                  c("LLM-like V=32768", 1, 64, 32768)],
        "tiny": [c("tiny", 8, 8, 256), c("tiny V=1000", 4, 4, 1000)],
    }


def _wnll_make(dims, dtype, device, gen):
    B, L, V = dims["B"], dims["L"], dims["V"]
    w = torch.softmax(torch.randn(B, 1, device=device, generator=gen), 0)
    return {"logits": _logits((B, L, V), dtype, device, gen),
            "tokens": _tokens((B, L), V, device, gen), "weights": w,
            "grad_out": torch.ones((), device=device)}


def _wnll_reference(logits, tokens, weights):
    lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    return -(weights * lp).sum()


def _wnll_cost(dims, b, tb, mode):
    B, L, V = dims["B"], dims["L"], dims["V"]
    R = B * L
    fwd = R * V * b + R * (tb + 4) + B * 4  # logits, tokens, lse written, weights
    bwd = 2 * R * V * b + R * (tb + 4) + B * 4
    return (fwd if mode == "fwd" else fwd + bwd), 0.0


def _wnll_liger(ce):
    def run(i):
        B, L, V = i["logits"].shape
        nll = ce(i["logits"].view(B * L, V), i["tokens"].view(B * L), reduction="none")
        return (i["weights"] * nll.view(B, L)).sum()
    return run


WEIGHTED_TOKEN_NLL = OpSpec(
    name="weighted_token_nll",
    modes=("fwd", "fwd+bwd"),
    bound="memory",
    cost_formula={"fwd": "R·V·b + R·(tb + 4) + B·4, R = B·L",
                  "fwd+bwd": "3·R·V·b + 2·R·(tb + 4) + 2·B·4, R = B·L"},
    sets=_wnll_sets(),
    make=_wnll_make,
    call=lambda f, i: f(i["logits"], i["tokens"], i["weights"]),
    reference=_wnll_reference,
    cost=_wnll_cost,
    grad_wrt=("logits",),
    external=lambda device: [_liger_provider(device, _wnll_liger)],
)

# --- daps_weights and solve_eta: [N, K] per step, latency-bound --------------------------------

_BETA, _ETA = 1.0, 100.0


def _nk_sets() -> dict[str, list[Case]]:
    def c(label, N, K):
        return Case(label, {"N": N, "K": K})

    paper = [c("MNIST/CIFAR N=256, K=8", 256, 8), c("ImageNet-256 N=64, K=8", 64, 8)]
    return {"paper": paper, "llm": [c("large N=4096, K=64", 4096, 64)],
            "cpu": paper + [c("large N=4096, K=64", 4096, 64)],
            "quick": paper, "tiny": [c("tiny N=4, K=3", 4, 3)]}


def _nk_make(dims, dtype, device, gen):
    N, K = dims["N"], dims["K"]
    # Rewards are summed pixel log-likelihoods (hundreds of nats, spread tens); logq summed
    # token log-probabilities; both float32 whatever the logits' dtype.
    rewards = -500.0 + 30.0 * torch.randn(N, K, device=device, generator=gen)
    logq = -50.0 + 5.0 * torch.randn(N, K, device=device, generator=gen)
    return {"rewards": rewards, "logq": logq}


def _daps_weights_reference(rewards, logq, beta, eta):
    advantages = rewards - torch.logsumexp(rewards, dim=1, keepdim=True)
    weights = torch.softmax((advantages - beta * logq) / (eta + beta), dim=1)
    return weights, 1.0 / (weights * weights).sum(1)


def _nk_cost_weights(dims, b, tb, mode):
    N, K = dims["N"], dims["K"]
    return 3 * N * K * 4 + N * 4, 0.0


DAPS_WEIGHTS = OpSpec(
    name="daps_weights",
    modes=("fwd",),
    bound="memory",
    cost_formula={"fwd": "3·N·K·4 + N·4 (rewards, logq read; weights, ess written)"},
    sets=_nk_sets(),
    make=_nk_make,
    call=lambda f, i: f(i["rewards"], i["logq"], _BETA, _ETA),
    reference=_daps_weights_reference,
    cost=_nk_cost_weights,
)

_ESS_TARGET = 0.33  # the paper's ρ
# Grid refinement in log η over [log 1e-6, log 1e12]: 3 rounds of 32 points narrow 41.4 nats
# to 41.4 / 31^3 ~ 1.4e-3, far below what the ESS check resolves. A grid (not a bisection) so
# that torch.compile traces 3 vectorised rounds, not dozens of unrolled steps (a bisection of
# 24 steps took most of a minute to compile on a 2-core machine).
_GRID_POINTS, _GRID_ROUNDS = 32, 3


def _solve_eta_reference(rewards, logq, beta, ess_target):
    """η at which the batch-mean ESS reaches ``ess_target``·K (it increases with η)."""
    K = rewards.shape[1]
    s = rewards - torch.logsumexp(rewards, dim=1, keepdim=True) - beta * logq
    lo = torch.full((), math.log(1e-6), device=rewards.device)
    hi = torch.full((), math.log(1e12), device=rewards.device)
    steps = torch.linspace(0, 1, _GRID_POINTS, device=rewards.device)
    for _ in range(_GRID_ROUNDS):
        grid = lo + (hi - lo) * steps
        w = torch.softmax(s[None] / (grid.exp()[:, None, None] + beta), dim=2)
        reached = (1.0 / (w * w).sum(2)).mean(1) >= ess_target * K
        first = torch.where(reached.any(), reached.int().argmax(), _GRID_POINTS - 1)
        lo, hi = grid[(first - 1).clamp(min=0)], grid[first]
    return (0.5 * (lo + hi)).exp()


def _solve_eta_check(inputs, eta) -> str | None:
    """η is right when the mean ESS it gives is the target (several η may give it)."""
    eta = float(torch.as_tensor(eta).float())
    if not math.isfinite(eta) or eta <= 0:
        return f"eta = {eta} is not a positive finite number"
    _, ess = _daps_weights_reference(inputs["rewards"], inputs["logq"], _BETA, eta)
    K = inputs["rewards"].shape[1]
    mean_ess = ess.mean().item()
    if K > 1 and abs(mean_ess - _ESS_TARGET * K) > 0.01 * K:
        return f"mean ESS {mean_ess:.4g} at eta = {eta:.4g}, target {_ESS_TARGET * K:.4g}"
    return None


SOLVE_ETA = OpSpec(
    name="solve_eta",
    modes=("fwd",),
    bound="memory",
    cost_formula={"fwd": "2·N·K·4 + 4 (one pass; the solver's iterations re-read it on chip)"},
    sets=_nk_sets(),
    make=_nk_make,
    call=lambda f, i: f(i["rewards"], i["logq"], _BETA, _ESS_TARGET),
    reference=_solve_eta_reference,
    cost=lambda dims, b, tb, mode: (2 * dims["N"] * dims["K"] * 4 + 4, 0.0),
    check=_solve_eta_check,
)

# --- sample_tokens ---------------------------------------------------------------------------


def _sample_reference(logits):
    """Gumbel-max sampling at temperature 1 and the sampled tokens' log-probabilities."""
    lp = torch.log_softmax(logits.float(), -1)
    u = torch.rand_like(lp).clamp_(min=1e-20)
    tokens = (lp - torch.log(-torch.log(u))).argmax(-1)
    return tokens, lp.gather(-1, tokens[..., None])[..., 0]


def _sample_check(inputs, out) -> str | None:
    """Samples are random: check the tokens are in range and logp is their log-probability."""
    tokens, logp = out
    logits = inputs["logits"]
    V = logits.shape[-1]
    if tokens.shape != logits.shape[:-1] or logp.shape != logits.shape[:-1]:
        return f"output shapes {tuple(tokens.shape)}, {tuple(logp.shape)}"
    if bool(((tokens < 0) | (tokens >= V)).any()):
        return "a sampled token is outside [0, V)"
    want = _tlp_reference(logits, tokens.long())
    err = (logp.float() - want).abs().max().item() if logp.numel() else 0.0
    tol = 1e-3 if logits.dtype == torch.float32 else 5e-2
    return None if err <= tol * max(1.0, want.abs().max().item()) else f"logp error {err:.3g}"


SAMPLE_TOKENS = OpSpec(
    name="sample_tokens",
    modes=("fwd",),
    bound="memory",
    cost_formula={"fwd": "R·V·b + R·(tb + 4)"},
    sets=_rows_sets(),
    make=lambda dims, dtype, device, gen: {
        "logits": _logits((dims["R"], dims["V"]), dtype, device, gen)},
    call=lambda f, i: f(i["logits"]),
    reference=_sample_reference,
    cost=lambda dims, b, tb, mode: (dims["R"] * dims["V"] * b + dims["R"] * (tb + 4), 0.0),
    check=_sample_check,
)

# --- linear ops: hidden [R, D] @ weight[V, D]^T without materialising the logits ---------------


def _linear_sets() -> dict[str, list[Case]]:
    def c(label, R, D, V):
        return Case(label, {"R": R, "D": D, "V": V})

    return {
        "paper": [c("ImageNet-256 N·K·L=64·8·1024, d=128", 64 * 8 * 1024, 128, 1024)],
        "llm": [c(f"LLM D=4096 V={v}", 8192, 4096, v) for v in _LLM_V],
        "cpu": [c("ImageNet-256, one image's K·L, d=128", 8192, 128, 1024),
                c("LLM-like D=512 V=32768", 256, 512, 32768)],
        "quick": [c("ImageNet-like d=128", 1024, 128, 1024),
                  c("LLM-like D=256 V=8192", 256, 256, 8192)],
        "tiny": [c("tiny", 32, 16, 256)],
    }


def _linear_make(dims, dtype, device, gen):
    R, D, V = dims["R"], dims["D"], dims["V"]
    hidden = torch.randn(R, D, device=device, generator=gen).to(dtype)
    weight = (torch.randn(V, D, device=device, generator=gen) / math.sqrt(D)).to(dtype)
    return {"hidden": hidden, "weight": weight, "tokens": _tokens((R,), V, device, gen),
            "weights": torch.rand(R, device=device, generator=gen),
            "grad_out": torch.randn(R, device=device, generator=gen)}


def _linear_cost(dims, b, tb, mode):
    R, D, V = dims["R"], dims["D"], dims["V"]
    flops = 2 * R * D * V  # the logits; forward. Backward: grad hidden and grad weight.
    return 0.0, (flops if mode == "fwd" else 3 * flops)


def _linear_tlp_reference(hidden, weight, tokens):
    return _tlp_reference(hidden @ weight.T, tokens)


LINEAR_TOKEN_LOGPROBS = OpSpec(
    name="linear_token_logprobs",
    modes=("fwd", "fwd+bwd"),
    bound="compute",
    cost_formula={"fwd": "2·R·D·V FLOPs", "fwd+bwd": "6·R·D·V FLOPs"},
    sets=_linear_sets(),
    make=_linear_make,
    call=lambda f, i: f(i["hidden"], i["weight"], i["tokens"]),
    reference=_linear_tlp_reference,
    cost=_linear_cost,
    grad_wrt=("hidden", "weight"),
    external=lambda device: [
        _cce_provider(device, lambda lce: lambda i: -lce(
            i["hidden"], i["weight"], i["tokens"], reduction="none"))],
)


def _linear_wnll_reference(hidden, weight, tokens, weights):
    return -(weights * _linear_tlp_reference(hidden, weight, tokens)).sum()


LINEAR_WEIGHTED_TOKEN_NLL = OpSpec(
    name="linear_weighted_token_nll",
    modes=("fwd", "fwd+bwd"),
    bound="compute",
    cost_formula={"fwd": "2·R·D·V FLOPs", "fwd+bwd": "6·R·D·V FLOPs"},
    sets=_linear_sets(),
    make=lambda dims, dtype, device, gen: {
        **_linear_make(dims, dtype, device, gen), "grad_out": torch.ones((), device=device)},
    call=lambda f, i: f(i["hidden"], i["weight"], i["tokens"], i["weights"]),
    reference=_linear_wnll_reference,
    cost=_linear_cost,
    grad_wrt=("hidden", "weight"),
    external=lambda device: [
        _cce_provider(device, lambda lce: lambda i: (i["weights"] * lce(
            i["hidden"], i["weight"], i["tokens"], reduction="none")).sum())],
)



def _linear_sample_reference(hidden, weight):
    return _sample_reference(hidden @ weight.T)


def _linear_sample_check(inputs, out) -> str | None:
    logits = (inputs["hidden"].float() @ inputs["weight"].float().T)
    return _sample_check({"logits": logits.to(inputs["hidden"].dtype)}, out)


LINEAR_SAMPLE_TOKENS = OpSpec(
    name="linear_sample_tokens",
    modes=("fwd",),
    bound="compute",
    cost_formula={"fwd": "2·R·D·V FLOPs"},
    sets=_linear_sets(),
    make=_linear_make,
    call=lambda f, i: f(i["hidden"], i["weight"]),
    reference=_linear_sample_reference,
    cost=_linear_cost,
    check=_linear_sample_check,
)

# --- the drop-in paths: FusedCategoricalHead and causal_lm_token_logprobs -----------------------

_HEADS: dict[tuple, Any] = {}


def categorical_head_log_prob_entropy(hidden, weight, bias, tokens, *, backend=None):
    """``FusedCategoricalHead.log_prob(hidden, tokens, return_entropy=True)`` with the given
    parameters (the head is built once per shape on the meta device; ``functional_call``
    binds ``weight`` and ``bias``), so the module's own code path is what is timed."""
    from dvae_kernels.nn import FusedCategoricalHead

    V, D = weight.shape
    key = (V, D, bias is not None, backend)
    if key not in _HEADS:
        _HEADS[key] = FusedCategoricalHead(D, V, bias is not None, device="meta",
                                           backend=backend)
    params = {"weight": weight, **({"bias": bias} if bias is not None else {})}
    return torch.func.functional_call(_HEADS[key], params, (hidden, tokens),
                                      {"return_entropy": True})


def _head_make(dims, dtype, device, gen):
    inp = _linear_make(dims, dtype, device, gen)
    inp["bias"] = (0.1 * torch.randn(dims["V"], device=device, generator=gen)).to(dtype)
    return inp


def _head_reference(hidden, weight, bias, tokens):
    lp = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias).float(), -1)
    return lp.gather(-1, tokens[..., None])[..., 0], -(lp.exp() * lp).sum(-1)


CATEGORICAL_HEAD = OpSpec(
    name="categorical_head",
    modes=("fwd", "fwd+bwd"),
    bound="compute",
    cost_formula={"fwd": "2·R·D·V FLOPs", "fwd+bwd": "6·R·D·V FLOPs"},
    sets=_linear_sets(),
    make=_head_make,
    call=lambda f, i: f(i["hidden"], i["weight"], i["bias"], i["tokens"]),
    reference=_head_reference,
    cost=_linear_cost,
    grad_wrt=("hidden", "weight", "bias"),
    op=categorical_head_log_prob_entropy,
    supports_of="linear_token_logprobs",
)


def _causal_sets() -> dict[str, list[Case]]:
    # hidden [B, T, D]: GPT-2 small (D = 768, V = 50257) and a 128k-vocabulary LM (Llama 3's
    # V = 128256 rounded to 131072) at D = 4096 on a GPU; smaller D and B·T on a CPU.
    def c(label, B, T, D, V):
        return Case(label, {"B": B, "T": T, "D": D, "V": V})

    return {
        "paper": [c("GPT-2 small B=8 T=1024", 8, 1024, 768, 50257)],
        "llm": [c("GPT-2 small B=8 T=1024", 8, 1024, 768, 50257),
                c("LLM D=4096 V=131072 B=4 T=2048", 4, 2048, 4096, 131072)],
        "cpu": [c("GPT-2 vocabulary, D=256, B=4 T=128", 4, 128, 256, 50257)],
        "quick": [c("GPT-2 vocabulary, D=64, B=2 T=32", 2, 32, 64, 50257)],
        "tiny": [c("tiny", 2, 9, 16, 300)],
    }


def _causal_make(dims, dtype, device, gen):
    B, T, D, V = dims["B"], dims["T"], dims["D"], dims["V"]
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[B // 2:, T - T // 4:] = 0  # half the batch right-padded by a quarter
    return {"hidden": torch.randn(B, T, D, device=device, generator=gen).to(dtype),
            "weight": (torch.randn(V, D, device=device, generator=gen) / math.sqrt(D)).to(dtype),
            "input_ids": _tokens((B, T), V, device, gen), "attention_mask": mask,
            "grad_out": torch.randn(B, T - 1, device=device, generator=gen)}


def _causal_reference(hidden, weight, input_ids, attention_mask):
    """``log_softmax(logits[:, :-1]).gather(input_ids[:, 1:])``, 0 where padding."""
    lp = torch.log_softmax((hidden @ weight.T)[:, :-1].float(), -1)
    logp = lp.gather(-1, input_ids[:, 1:, None])[..., 0]
    keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
    return torch.where(keep, logp, 0.0)


def _causal_cost(dims, b, tb, mode):
    flops = 2 * dims["B"] * (dims["T"] - 1) * dims["D"] * dims["V"]
    return 0.0, (flops if mode == "fwd" else 3 * flops)


def _cce_causal(lce):
    def run(i):
        keep = (i["attention_mask"][:, :-1] * i["attention_mask"][:, 1:]).bool()
        targets = torch.where(i["attention_mask"].bool(), i["input_ids"], -100)
        nll = lce(i["hidden"], i["weight"], targets, shift=1, reduction="none")
        return torch.where(keep, -nll, 0.0)
    return run


CAUSAL_LM_TOKEN_LOGPROBS = OpSpec(
    name="causal_lm_token_logprobs",
    modes=("fwd", "fwd+bwd"),
    bound="compute",
    cost_formula={"fwd": "2·B·(T-1)·D·V FLOPs", "fwd+bwd": "6·B·(T-1)·D·V FLOPs"},
    sets=_causal_sets(),
    make=_causal_make,
    call=lambda f, i: f(i["hidden"], i["weight"], i["input_ids"], i["attention_mask"]),
    reference=_causal_reference,
    cost=_causal_cost,
    grad_wrt=("hidden", "weight"),
    external=lambda device: [_cce_provider(device, _cce_causal)],
    supports_of="linear_token_logprobs",
)

SPECS: list[OpSpec] = [TOKEN_LOGPROBS, WEIGHTED_TOKEN_NLL, DAPS_WEIGHTS, SOLVE_ETA,
                       SAMPLE_TOKENS, LINEAR_TOKEN_LOGPROBS, LINEAR_WEIGHTED_TOKEN_NLL,
                       LINEAR_SAMPLE_TOKENS, CATEGORICAL_HEAD, CAUSAL_LM_TOKEN_LOGPROBS]
SPEC_BY_NAME = {s.name: s for s in SPECS}

# ---------------------------------------------------------------------------------------------
# 5. Providers
# ---------------------------------------------------------------------------------------------


def providers_for(spec: OpSpec, device: torch.device, compile_reference: bool = True
                  ) -> list[Provider]:
    """Every provider of ``spec`` on ``device``; those that cannot run carry the reason."""
    op = spec.resolve()
    # The op's registered backends (dvae_kernels' registry): one it lacks is absent, not an
    # error.
    registered = _dispatch.OPS.get(spec.supports_of or spec.name)
    out = []
    for name in _dispatch.BACKENDS:
        reason = _dispatch.backend_unavailable(name, device)
        if reason is None and registered is not None and name not in registered.backends:
            reason = f"{spec.name} has no {name} implementation"
        if name == "triton" and device.type != "cuda":
            reason = "interpreted Triton (TRITON_INTERPRET=1) is a test vehicle; never timed"
        if reason is not None:
            out.append(Provider(name, None, unavailable=reason))
            continue
        bound_op = functools.partial(op, backend=name)
        out.append(Provider(name, functools.partial(spec.call, bound_op)))
    if compile_reference:
        # The plain-PyTorch reference, not the torch backend: the backend sits behind an opaque
        # custom op, so compiling it would fuse nothing.
        # dynamic=False: one kernel specialised per shape, as a fixed-shape training loop gets.
        compiled = torch.compile(functools.partial(spec.call, spec.reference), dynamic=False)
        out.append(Provider("torch.compile", compiled))
    out.extend(spec.external(device))
    return out


# ---------------------------------------------------------------------------------------------
# 6. The runner
# ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    quick: bool = False
    budget_s: float = 1.0  # timed seconds per case and mode, shared by its providers
    min_reps: int = 5
    max_reps: int = 200
    warmup: int = 3
    max_sets: int = 64
    max_sets_bytes: int = 512 << 20  # on a CPU; on a GPU a quarter of free memory


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _clone_inputs(inp: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(v.requires_grad)
                if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def _mode_inputs(inp: dict, spec: OpSpec, mode: str) -> dict:
    """Forward-only calls get detached views (no autograd graph, and Liger's in-place gradient
    path stays off); forward+backward calls get leaves that require a gradient."""
    if mode == "fwd":
        return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    return inp


def _make_runner(spec: OpSpec, provider: Provider, mode: str) -> Callable[[dict], Any]:
    fn = provider.fn
    if mode == "fwd":
        def run(i):
            with torch.no_grad():
                return fn(i)
        return run

    def run_bwd(i):
        out = _first(fn(i))
        grads = torch.autograd.grad(out, [i[k] for k in spec.grad_wrt], i["grad_out"])
        return out, grads
    return run_bwd


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan, 0.0, (a - b).abs()).nan_to_num(math.inf).max().item()
    return diff / max(1.0, b.abs().nan_to_num(0.0).max().item())


def _validate(spec, mode, out, ref_out, inputs, dtype) -> str | None:
    """A wrong kernel's speed is meaningless: compare with the torch backend before timing."""
    if spec.check is not None:
        return spec.check(inputs, out if mode == "fwd" else out[0])
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    if mode == "fwd":
        pairs = list(zip(out, ref_out)) if isinstance(out, tuple) else [(out, ref_out)]
        pairs = [(a, b) for a, b in pairs if isinstance(a, torch.Tensor)]
    else:
        pairs = [(out[0], ref_out[0])] + list(zip(out[1], ref_out[1]))
    for idx, (a, b) in enumerate(pairs):
        err = _max_rel_err(a, b)
        if err > tol:
            what = "output" if idx == 0 else f"gradient {idx}"
            return f"{what} differs from the torch backend by {err:.3g} (tolerance {tol:g})"
    return None


def _peak_bytes(run, inputs, device) -> int | None:
    """Extra device memory one call allocates beyond its inputs (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = run(inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def _n_sets(set_bytes: int, device: torch.device, settings: Settings) -> int:
    """Enough input sets that cycling them overflows the last-level cache twice over (so no
    provider reads its inputs from cache), capped by memory and ``max_sets``."""
    cache = cache_bytes(device)
    n = max(1, math.ceil(2 * cache / max(1, set_bytes)))
    if set_bytes < 4 * cache:
        n = max(n, 2)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(0.25 * free)
    else:
        budget = settings.max_sets_bytes
    n = min(n, max(1, budget // max(1, set_bytes)))
    return min(n, settings.max_sets)


def _tensor_bytes(inp: dict) -> int:
    return sum(v.numel() * v.element_size() for v in inp.values() if isinstance(v, torch.Tensor))


def run_case(spec: OpSpec, case: Case, set_name: str, mode: str, providers: list[Provider],
             device: torch.device, settings: Settings, roofline: dict, log=print
             ) -> list[dict]:
    """Benchmark one op, shape and mode with every provider; one result row per provider."""
    dtype = case.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    first = spec.make(case.dims, dtype, device, gen)
    n_sets = _n_sets(_tensor_bytes(first), device, settings)
    sets = [first]
    for s in range(1, n_sets):
        gen.manual_seed(s)
        sets.append(spec.make(case.dims, dtype, device, gen))
    for inp in sets:
        for k in spec.grad_wrt:
            inp[k].requires_grad_(mode != "fwd")
    sets = [_mode_inputs(inp, spec, mode) for inp in sets]
    tb = next((v.element_size() for k, v in first.items() if k == "tokens"), 8)
    nbytes, flops = spec.cost(case.dims, torch.empty((), dtype=dtype).element_size(), tb, mode)

    base_row = {"op": spec.name, "mode": mode, "set": set_name, "case": case.label,
                "shape": case.key(), "dtype": str(dtype).replace("torch.", ""),
                "bytes": nbytes, "flops": flops, "cost_formula": spec.cost_formula[mode],
                "bound": spec.bound, "input_sets": n_sets}
    rows: dict[str, dict] = {}
    live: list[tuple[Provider, Callable, list[dict]]] = []
    ref_out = None
    timer = Timer(device)
    for p in providers:
        row = dict(base_row, provider=p.name, status="ok")
        rows[p.name] = row
        if p.unavailable is not None:
            row["status"] = f"unavailable: {p.unavailable}"
            continue
        if p.modes is not None and mode not in p.modes:
            row["status"] = f"unavailable: no {mode} mode"
            continue
        run = _make_runner(spec, p, mode)
        own_sets = [_clone_inputs(s) for s in sets] if p.mutates else sets
        try:
            out = run(own_sets[0])
        except Exception as exc:  # a provider that cannot serve this shape is reported, not fatal
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            row["status"] = f"error: {type(exc).__name__}: {msg}"
            continue
        if p.name == "torch":
            ref_out = out
        if p.name != "torch" and (ref_out is not None or spec.check is not None):
            bad = _validate(spec, mode, out, ref_out, sets[0], dtype)
            if bad is not None:
                row["status"] = f"mismatch: {bad}"
                continue
        live.append((p, run, own_sets))
    del ref_out

    # Warm-up (the first call above compiled and autotuned; these fill allocator caches and
    # settle clocks), timed roughly to choose the number of rounds.
    est = {}
    for p, run, own in live:
        timer.sync()
        t0 = time.perf_counter()
        n = max(1, settings.warmup)
        for w in range(n):
            run(own[w % len(own)])
        timer.sync()
        est[p.name] = (time.perf_counter() - t0) / n
        rows[p.name]["peak_bytes"] = _peak_bytes(run, own[0], device)
    round_s = sum(est.values()) or 1e-6
    reps = int(min(settings.max_reps, max(settings.min_reps, settings.budget_s / round_s)))

    # Rounds: every provider once per round on the same input set; the order rotates each
    # round so none is always first after a pause (a shared machine's noise spreads evenly).
    samples: dict[str, list] = {p.name: [] for p, _, _ in live}
    for r in range(reps):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for p, run, own in order:
            inp = own[r % len(own)]
            t = timer.start()
            run(inp)
            samples[p.name].append(timer.stop(t))
        if timer.cuda and r % 16 == 15:
            timer.sync()  # keep the queue of recorded events short
    for p, _, _ in live:
        stats = summarize(timer.seconds(samples[p.name]))
        row = rows[p.name]
        row.update(stats)
        sec = stats["median_ms"] / 1e3
        row["GBps"] = nbytes / sec / 1e9 if nbytes else None
        row["TFLOPs"] = flops / sec / 1e12 if flops else None
        if spec.bound == "memory" and nbytes:
            row["roofline_frac"] = row["GBps"] / roofline["copy_GBps"]
        elif spec.bound == "compute" and flops:
            row["roofline_frac"] = row["TFLOPs"] / roofline["matmul_TFLOPs"]
    for ref_name, col in (("torch", "x_vs_torch"), ("torch.compile", "x_vs_compile")):
        ref = rows.get(ref_name, {}).get("median_ms")
        for row in rows.values():
            if ref and row.get("median_ms"):
                row[col] = ref / row["median_ms"]
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# 7. Output
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = ["op", "mode", "set", "case", "shape", "dtype", "provider", "status", "median_ms",
              "p20_ms", "p80_ms", "samples", "input_sets", "bytes", "flops", "GBps", "TFLOPs",
              "roofline_frac", "x_vs_torch", "x_vs_compile", "peak_bytes", "bound",
              "cost_formula"]
MACHINE_FIELDS = ["name", "device", "torch", "triton", "python", "dvae", "cuda", "date"]


def write_results(out_dir: Path, report: dict) -> dict[str, Path]:
    """results.json (everything) and results.csv (one row per op/shape/mode/provider, each
    with the machine's name, versions and date, so rows from several runs can be pooled)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str) + "\n")
    machine = report["machine"]
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + [f"machine_{k}" for k in MACHINE_FIELDS])
        w.writeheader()
        for row in report["rows"]:
            rec = {k: row.get(k) for k in CSV_FIELDS}
            rec.update({f"machine_{k}": machine.get(k) for k in MACHINE_FIELDS})
            w.writerow(rec)
    return paths


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: dict) -> str:
    """The results as text, one block per op and mode."""
    m, roof = report["machine"], report["roofline"]
    load0 = m["loadavg"][0] if m.get("loadavg") else None
    load1 = m["loadavg_end"][0] if m.get("loadavg_end") else None
    lines = [f"machine: {m['name']} ({m['device']}, {m['cpu_count']} cores, "
             f"{m.get('torch_threads')} torch threads, load average {_fmt(load0, '.2f')} at "
             f"start, {_fmt(load1, '.2f')} at end); torch "
             f"{m['torch']}, triton {m['triton']}, python {m['python']}, dvae {m['dvae']}; "
             f"{m['date']}",
             f"roofline (measured now): copy {roof['copy_GBps']:.1f} GB/s ({roof['copy_dtype']}), "
             f"matmul {roof['matmul_TFLOPs']:.3g} TFLOP/s ({roof['matmul_dtype']}, "
             f"n={roof['matmul_n']})"]
    groups: dict[tuple, list[dict]] = {}
    for row in report["rows"]:
        groups.setdefault((row["op"], row["mode"]), []).append(row)
    head = (f"{'case':<34} {'shape':<22} {'dtype':<8} {'provider':<16} {'median ms':>10} "
            f"{'p20-p80 ms':>17} {'GB/s':>8} {'TFLOP/s':>8} {'%roof':>6} {'x torch':>7} "
            f"{'x compile':>9} {'peak MiB':>8}")
    for (op, mode), rows in groups.items():
        lines += ["", f"== {op} [{mode}]  cost per call: {rows[0]['cost_formula']}  "
                  f"(b = bytes per logit, tb = bytes per token)", head]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"{r['case'][:34]:<34} {r['shape'][:22]:<22} {r['dtype']:<8} "
                             f"{r['provider']:<16} {r['status'][:110]}")
                continue
            frac = r.get("roofline_frac")
            peak = r.get("peak_bytes")
            lines.append(
                f"{r['case'][:34]:<34} {r['shape'][:22]:<22} {r['dtype']:<8} "
                f"{r['provider']:<16} {r['median_ms']:>10.4g} "
                f"{r['p20_ms']:>8.4g}-{r['p80_ms']:<8.4g} {_fmt(r.get('GBps'), '8.1f'):>8} "
                f"{_fmt(r.get('TFLOPs'), '8.3g'):>8} "
                f"{_fmt(None if frac is None else 100 * frac, '5.1f'):>6} "
                f"{_fmt(r.get('x_vs_torch'), '.2f'):>7} {_fmt(r.get('x_vs_compile'), '.2f'):>9} "
                f"{_fmt(None if peak is None else peak / 2**20, '.1f'):>8}")
    return "\n".join(lines)


def plot_throughput(report: dict, path: Path) -> Path | None:
    """Throughput (GB/s, or TFLOP/s for compute-bound ops) against V, one panel per op and
    mode, one line per provider, the measured roofline dashed. None without matplotlib (it
    comes with the ``train`` extra, not with the kernels-only install)."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (pip install \"dvae[train]\"); no plot")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, dict[str, list]] = {}
    for r in report["rows"]:
        if r["status"] != "ok" or "V=" not in r["shape"]:
            continue
        V = int(re.search(r"\bV=(\d+)", r["shape"]).group(1))
        y = r["TFLOPs"] if r["bound"] == "compute" else r["GBps"]
        if y is None:
            continue
        panels.setdefault((r["op"], r["mode"], r["bound"]), {}).setdefault(
            r["provider"], []).append((V, y))
    if not panels:
        return None
    n = len(panels)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n), squeeze=False)
    roof = report["roofline"]
    for ax, ((op, mode, bound), lines) in zip(axes.flat, panels.items()):
        for prov, pts in sorted(lines.items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ceiling = roof["matmul_TFLOPs"] if bound == "compute" else roof["copy_GBps"]
        ax.axhline(ceiling, ls="--", color="grey", label="measured roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # the roofline can sit decades above a slow provider
        ax.set_xlabel("V")
        ax.set_ylabel("TFLOP/s" if bound == "compute" else "GB/s")
        ax.set_title(f"{op} [{mode}]", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m = report["machine"]
    fig.suptitle(f"{m['name']} - torch {m['torch']} - {m['date']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# 8. Regression check
# ---------------------------------------------------------------------------------------------

DEFAULT_TOLERANCE = 0.15


def row_key(row: dict) -> tuple:
    return (row["op"], row["mode"], row["shape"], row["dtype"], row["provider"])


@dataclass
class Comparison:
    compared: list[tuple[tuple, float, float]] = field(default_factory=list)  # key, base, new
    regressions: list[tuple[tuple, float, float]] = field(default_factory=list)
    baseline_machine: str | None = None
    machine: str | None = None

    @property
    def exit_code(self) -> int:
        """1 when a figure regressed, 2 when nothing was compared, else 0."""
        if self.regressions:
            return 1
        return 0 if self.compared else 2


def load_report(path: str | Path, names: Sequence[str] = ("baseline.json", "results.json")
                ) -> dict:
    """A results file, or a folder holding one of ``names`` (the first found)."""
    p = Path(path)
    if p.is_dir():
        for name in names:
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"--compare: {path} holds none of {', '.join(names)}")
    if not p.is_file():
        raise FileNotFoundError(f"--compare: no such file {path}")
    return json.loads(p.read_text())


def compare(baseline: dict, current: dict, tolerance: float = DEFAULT_TOLERANCE, *,
            key: Callable[[dict], tuple] = row_key) -> Comparison:
    """Compare median times row by row (same op, mode, shape, dtype, provider: ``key``). A row
    regresses when its median is more than ``tolerance`` (a fraction) slower than the
    baseline's. Rows without a timing on either side are not compared."""
    if not (0 <= tolerance < 10):
        raise ValueError(f"tolerance must be a fraction in [0, 10), got {tolerance!r}")
    base = {key(r): r for r in baseline.get("rows", []) if r.get("median_ms")}
    result = Comparison(baseline_machine=baseline.get("machine", {}).get("name"),
                        machine=current.get("machine", {}).get("name"))
    for row in current.get("rows", []):
        b = base.get(key(row))
        if b is None or not row.get("median_ms"):
            continue
        entry = (key(row), b["median_ms"], row["median_ms"])
        result.compared.append(entry)
        if row["median_ms"] > b["median_ms"] * (1 + tolerance):
            result.regressions.append(entry)
    return result


def format_comparison(c: Comparison, tolerance: float, baseline_path: str) -> str:
    lines = [f"== compare with {baseline_path} (tolerance: a median more than "
             f"{100 * tolerance:.0f}% slower is a regression)"]
    if c.baseline_machine != c.machine:
        lines.append(f"warning: the baseline was measured on {c.baseline_machine!r}, this run on "
                     f"{c.machine!r}; times from different machines are not comparable")
    if not c.compared:
        lines.append("nothing was compared: no row of this run (op, mode, shape, dtype, "
                     "provider) has a timed match in the baseline")
        return "\n".join(lines)
    bad = {k for k, _, _ in c.regressions}
    for key, b, n in c.compared:
        flag = "REGRESSION" if key in bad else "ok"
        lines.append(f"{flag:<10} {'/'.join(key):<80} {b:9.4g} ms -> {n:9.4g} ms "
                     f"({100 * (n / b - 1):+.0f}%)")
    lines.append(f"{len(c.compared)} compared, {len(c.regressions)} regressed")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 9. Command line
# ---------------------------------------------------------------------------------------------


def default_sets(device: torch.device, quick: bool) -> list[str]:
    if quick:
        return ["quick"]
    return ["paper", "llm"] if device.type == "cuda" else ["cpu"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Kernel microbenchmarks of dvae_kernels against torch, torch.compile and "
                    "public kernels, on whatever device is there.")
    ap.add_argument("--quick", action="store_true",
                    help="small shapes and short budgets (the 'quick' set): minutes on a CPU")
    ap.add_argument("--ops", nargs="+", metavar="OP",
                    help="ops to run (default: every one dvae_kernels has): "
                         + ", ".join(SPEC_BY_NAME))
    ap.add_argument("--sets", nargs="+", metavar="SET",
                    help="shape sets: paper, llm, cpu, quick, tiny (default: paper llm on a GPU, "
                         "cpu on a CPU, quick with --quick)")
    ap.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], help="default: all")
    ap.add_argument("--providers", nargs="+", metavar="NAME",
                    help="only these providers (torch, triton, cuda, cpu, torch.compile, liger, "
                         "cce); default: all that run here")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="override every case's dtype (default: bf16 on GPU, float32 on CPU)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    ap.add_argument("--budget", type=float, help="timed seconds per case and mode (default: "
                                                 "0.3 with --quick, else 1.5)")
    ap.add_argument("--out", default="bench/results/latest",
                    help="folder for results.json, results.csv, throughput_vs_V.png")
    ap.add_argument("--compare", metavar="BASELINE",
                    help="a results.json (or a folder with baseline.json) to check against: exit "
                         "1 on a regression, 2 when nothing could be compared")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help=f"regression tolerance, a fraction of the baseline median "
                         f"(default {DEFAULT_TOLERANCE})")
    ap.add_argument("--check-values", action="store_true",
                    help="keep dvae_kernels' token-range checks on (they cost a host sync on "
                         "CUDA; off by default, as in a tuned training loop)")
    ap.add_argument("--threads", type=int,
                    help="torch intra-op threads (default: torch's own choice); on a shared "
                         "machine fewer threads than cores avoids waiting on a descheduled one")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    saved = os.environ.get("DVAE_KERNELS_CHECK_VALUES")
    if not args.check_values:
        os.environ["DVAE_KERNELS_CHECK_VALUES"] = "0"
    try:
        return _main(args, argv)
    finally:  # main() may run inside another program (the tests): leave its environment be
        if saved is None:
            os.environ.pop("DVAE_KERNELS_CHECK_VALUES", None)
        else:
            os.environ["DVAE_KERNELS_CHECK_VALUES"] = saved


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = args.ops or [s.name for s in SPECS]
    unknown = [n for n in names if n not in SPEC_BY_NAME]
    if unknown:
        print(f"error: --ops: unknown op(s) {unknown}; known: {', '.join(SPEC_BY_NAME)}",
              file=sys.stderr)
        return 2
    specs = [SPEC_BY_NAME[n] for n in names]
    missing = [s.name for s in specs if not s.available()]
    specs = [s for s in specs if s.available()]
    set_names = args.sets or default_sets(device, args.quick)
    settings = Settings(quick=args.quick,
                        budget_s=args.budget if args.budget is not None else
                        (0.3 if args.quick else 1.5),
                        min_reps=5, max_reps=100 if args.quick else 300)
    dtype = getattr(torch, args.dtype) if args.dtype else None

    for name in missing:
        print(f"note: dvae_kernels has no {name} yet; not benchmarked")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1: Triton kernels are interpreted here and are not timed")
    started = time.time()
    roofline = measure_roofline(device, args.quick, tiny=set(set_names) == {"tiny"})
    report = {"schema": 1, "machine": machine_info(device), "roofline": roofline,
              "config": {"argv": list(argv) if argv is not None else sys.argv[1:],
                         "sets": set_names, "budget_s": settings.budget_s,
                         "check_values": args.check_values,
                         "ops_missing": missing},
              "rows": []}
    print(f"benchmarking {', '.join(s.name for s in specs) or 'nothing'} on {device} "
          f"({report['machine']['name']}), sets {', '.join(set_names)}", flush=True)
    # Each shape and grad mode is one more compiled graph of the same function; the default
    # limit (8) would silently send the rest to eager.
    if not args.no_compile:
        import torch._dynamo as dynamo

        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, attr):
                setattr(dynamo.config, attr, max(64, getattr(dynamo.config, attr)))
    load = report["machine"].get("loadavg")
    if load and device.type == "cpu" and load[0] > (os.cpu_count() or 1) - 0.5:
        print(f"note: the machine is busy (load average {load[0]:.2f} on {os.cpu_count()} "
              f"cores): CPU figures are noisy; --threads 1 avoids waiting on descheduled "
              f"threads")
    for spec in specs:
        if not args.no_compile:
            dynamo.reset()  # the previous op's compiled graphs are no longer needed
        provs = providers_for(spec, device, compile_reference=not args.no_compile)
        if args.providers:
            provs = [p for p in provs if p.name in args.providers
                     or p.name.split("[")[0] in args.providers]
        for set_name in set_names:
            for case in spec.sets.get(set_name, []):
                if dtype is not None:
                    case = Case(case.label, case.dims, dtype)
                for mode in spec.modes:
                    if args.modes and mode not in args.modes:
                        continue
                    t0 = time.time()
                    rows = run_case(spec, case, set_name, mode, provs, device, settings,
                                    roofline)
                    report["rows"].extend(rows)
                    print(f"  {spec.name} [{mode}] {case.key()}: {time.time() - t0:.1f} s",
                          flush=True)
    report["config"]["wall_s"] = time.time() - started
    try:
        report["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    out_dir = Path(args.out)
    paths = write_results(out_dir, report)
    print()
    print(format_table(report))
    if not args.no_plot:
        png = plot_throughput(report, out_dir / "throughput_vs_V.png")
        if png:
            paths["png"] = png
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} in "
          f"{report['config']['wall_s']:.0f} s")
    if args.compare:
        c = compare(load_report(args.compare), report, args.tolerance)
        print(format_comparison(c, args.tolerance, args.compare))
        return c.exit_code
    return 0
