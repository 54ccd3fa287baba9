"""The op specs of ``python -m bench``: one small :class:`OpSpec` per op, with its shape sets,
its inputs, its plain-PyTorch reference (what ``torch.compile`` is given) and the bytes or
FLOPs one call moves or does, written as a formula. An op is benchmarked only when
``dvae_kernels`` has it.

Adding an op: write its ``OpSpec`` here and append it to ``SPECS``. A spec that is not one
dvae_kernels function (``categorical_head``: the FusedCategoricalHead's log-probabilities with
their entropy) names its callable in ``op=`` and the registered op whose backends it has in
``supports_of=``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import dvae_kernels

# ---------------------------------------------------------------------------------------------
# Op specs
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


# The paper's shapes (docs/algorithm.md): rows = N·K·L sampled tokens of one training step.
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
    """``FusedCategoricalHead(hidden, targets=tokens, return_entropy=True)`` with the given
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
