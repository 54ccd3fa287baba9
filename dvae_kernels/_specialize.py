"""Every Triton launch of the package, specialised exactly as a real launch is, without a GPU.

A real launch lets Triton's JIT specialise the kernel on its arguments: pointers 16-byte aligned
get ``tt.divisibility = 16``, integers divisible by 16 likewise, integers equal to 1 become
constexprs, and the launcher's own constexprs and ``num_warps``/``num_stages`` apply. Compiling
hand-written signatures instead would compile variants that never run. Here the op files' own
launchers (``_triton_forward``/``_triton_backward``) run on ``meta`` tensors (no memory, 16-byte
aligned data pointers, real shapes and strides) while :func:`capture` replaces
``JITFunction.run``: each launch is recorded with the signature, constexprs, attributes and
options that Triton's binder derives from the arguments, and the grid, instead of being compiled
and run. ``_compile_check`` and ``bench.static`` compile these records with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target, options)``, which is what
``JITFunction.run`` itself does on a GPU.

Run without TRITON_INTERPRET (the interpreter replaces the kernels).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

META = torch.device("meta")


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch."""

    kernel: Any  # the JITFunction
    signature: dict[str, str]
    constexprs: dict
    attrs: dict
    options: dict
    grid: tuple[int, int, int]
    ints: dict = dataclasses.field(default_factory=dict)  # the integer arguments' values

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def num_warps(self) -> int:
        return int(self.options["num_warps"])

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def constexpr(self, name: str):
        return self.constexprs[(self.kernel.arg_names.index(name),)]

    def describe(self) -> str:
        names = self.kernel.arg_names
        consts = {names[k[0]]: v for k, v in self.constexprs.items()}
        div = sorted(names[k[0]] for k in self.attrs)
        return f"{self.name} {consts} divisible16={div} warps={self.num_warps}"


@contextlib.contextmanager
def capture(capability: int = 90) -> Iterator[list[Launch]]:
    """Within the block, Triton launches are recorded (for a ``cuda`` target of compute
    capability ``capability``) instead of compiled and run."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature"):  # pragma: no cover - other triton
        raise RuntimeError("this triton version has no create_function_from_signature")
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    launches: list[Launch] = []
    binders: dict[int, Callable] = {}
    original = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        binder = binders.get(id(self))
        if binder is None:
            binder = jit.create_function_from_signature(self.signature, self.params, backend)
            binders[id(self)] = binder
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound_args, specialization, options)
        g = grid(bound_args) if callable(grid) else grid
        g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
        ints = {k: v for k, v in bound_args.items()
                if isinstance(v, int) and not isinstance(v, bool)}
        launches.append(Launch(self, signature, constexprs, attrs, dict(options.__dict__), g,
                               ints))
        return None

    from . import _triton

    jit.JITFunction.run = run
    _triton.CAPABILITY_OVERRIDE = capability
    try:
        yield launches
    finally:
        jit.JITFunction.run = original
        _triton.CAPABILITY_OVERRIDE = None


def compile_launch(launch: Launch, capability: int):
    """``triton.compile`` of a recorded launch for ``capability`` (80, 90): what
    ``JITFunction.run`` does on a GPU when the kernel is not cached."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=launch.kernel, signature=launch.signature,
                    constexprs=launch.constexprs, attrs=launch.attrs)
    options = {k: v for k, v in launch.options.items()
               if k in ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


# ---------------------------------------------------------------------------------------------
# Workloads: the op launchers at given shapes, on meta tensors.
# ---------------------------------------------------------------------------------------------

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _module(name: str):
    """The op module (the package namespace binds the op names to the public functions)."""
    import importlib

    return importlib.import_module(f"dvae_kernels.{name}")


# Where the workloads' tensors live: ``meta`` (no memory; what capture() records) unless
# :func:`materialise` points them at a real device to run and time them.
_DEVICE = META


@contextlib.contextmanager
def materialise(device: torch.device | str) -> Iterator[None]:
    """Workloads built within the block hold real tensors on ``device``: random values in
    every floating-point input, integer inputs within their valid range (tokens below V,
    positions below the cache length), so that ``run()`` launches the kernels for real (on a
    GPU, to time them against the static report; on the CPU, through the interpreter)."""
    global _DEVICE
    previous, _DEVICE = _DEVICE, torch.device(device)
    try:
        yield
    finally:
        _DEVICE = previous


def _t(*shape, dtype=torch.float32):
    if _DEVICE.type == "meta":
        return torch.empty(shape, dtype=dtype, device=META)
    return torch.randn(shape, dtype=dtype, device=_DEVICE)


def _ints(shape, high: int, dtype=torch.int64, fill: int | None = None):
    """Integers in ``[0, high)`` (token ids, row indices, seeds) of ``shape``, or all equal
    to ``fill`` (a position)."""
    if _DEVICE.type == "meta":
        return torch.empty(shape, dtype=dtype, device=META)
    if fill is not None:
        return torch.full(shape, fill, dtype=dtype, device=_DEVICE)
    return torch.randint(0, max(high, 1), shape, dtype=dtype, device=_DEVICE)


@dataclasses.dataclass
class Workload:
    """An op phase at one shape: ``run()`` calls the launchers (inside :func:`capture`)."""

    op: str
    phase: str
    shape: dict
    run: Callable[[], Any]

    @property
    def label(self) -> str:
        return f"{self.op}.{self.phase}"


def token_workloads(R: int, V: int, dtype: str = "bf16", token_dtype=torch.int64,
                    entropy: bool = False, all_variants: bool = False) -> list[Workload]:
    """token_logprobs and weighted_token_nll at logits [R, V]."""
    tlp = _module("token_logprobs")
    wnll = _module("weighted_token_nll")

    dt = _DT[dtype]
    shape = {"R": R, "V": V, "dtype": dtype}
    logits = _t(R, V, dtype=dt)
    tokens = _ints((R,), V, token_dtype)
    rowf = _t(R)
    out = [Workload("token_logprobs", "fwd", shape,
                    lambda: tlp._triton_forward(logits, tokens, entropy)),
           Workload("token_logprobs", "bwd", shape,
                    lambda: tlp._triton_backward(rowf, rowf if entropy else None, logits,
                                                 tokens, rowf, rowf)),
           Workload("weighted_token_nll", "fwd", shape,
                    lambda: wnll._triton_forward(logits, tokens, rowf, False)),
           # The backward: the same kernel with the weights times the upstream gradient.
           Workload("weighted_token_nll", "bwd", shape,
                    lambda: wnll._triton_forward(logits, tokens, rowf, True))]
    if all_variants:
        out += [Workload("token_logprobs", "fwd_entropy", shape,
                         lambda: tlp._triton_forward(logits, tokens, True)),
                Workload("token_logprobs", "bwd_entropy_only", shape,
                         lambda: tlp._triton_backward(None, rowf, logits, tokens, rowf, rowf)),
                Workload("token_logprobs", "bwd_both", shape,
                         lambda: tlp._triton_backward(rowf, rowf, logits, tokens, rowf, rowf)),
]
    return out


def linear_workloads(N: int, D: int, V: int, dtype: str = "bf16", bias: bool = False,
                     all_variants: bool = False) -> list[Workload]:
    """linear_token_logprobs (and so linear_weighted_token_nll) at hidden [N, D], weight
    [V, D]."""
    ltl = _module("linear_token_logprobs")

    dt = _DT[dtype]
    shape = {"N": N, "D": D, "V": V, "dtype": dtype}
    h, w = _t(N, D, dtype=dt), _t(V, D, dtype=dt)
    b = _t(V, dtype=dt) if bias else None
    tokens = _ints((N,), V)
    rowf = _t(N)
    out = [Workload("linear_token_logprobs", "fwd", shape,
                    lambda: ltl._triton_forward(h, w, tokens, b)),
           Workload("linear_token_logprobs", "bwd", shape,
                    lambda: ltl._triton_backward(rowf, None, None, None, h, w, tokens, b, rowf,
                                                 rowf))]
    if all_variants:
        out.append(Workload("linear_token_logprobs", "bwd_all_grads", shape,
                            lambda: ltl._triton_backward(rowf, rowf, rowf, None, h, w, tokens,
                                                         b, rowf, rowf)))
        # temperature, softcap and the mean logit (label smoothing), forward and backward
        out += [Workload("linear_token_logprobs", "fwd_transformed", shape,
                         lambda: ltl._triton_forward(h, w, tokens, b, 0.5, 30.0, True)),
                Workload("linear_token_logprobs", "bwd_transformed", shape,
                         lambda: ltl._triton_backward(rowf, rowf, None, rowf, h, w, tokens, b,
                                                      rowf, rowf, 0.5, 30.0))]
    return out


def sampler_workloads(R: int, V: int, D: int, dtype: str = "bf16", greedy: bool = False,
                      bias: bool = False) -> list[Workload]:
    """sample_tokens at logits [R, V] and linear_sample_tokens at hidden [R, D]."""
    lst = _module("linear_sample_tokens")
    st = _module("sample_tokens")

    dt = _DT[dtype]
    temperature = 0.0 if greedy else 1.0
    logits = _t(R, V, dtype=dt)
    seeds = _ints((2,), 1 << 62)
    h, w = _t(R, D, dtype=dt), _t(V, D, dtype=dt)
    b = _t(V, dtype=dt) if bias else None
    return [Workload("sample_tokens", "fwd", {"R": R, "V": V, "dtype": dtype},
                     lambda: st._triton_forward(logits, seeds, temperature)),
            Workload("linear_sample_tokens", "fwd", {"N": R, "D": D, "V": V, "dtype": dtype},
                     lambda: lst._triton_forward(h, w, b, seeds, temperature))]


def daps_workloads(N: int, K: int) -> list[Workload]:
    """daps_weights and solve_eta at rewards [N, K] float32."""
    dw = _module("daps_weights")
    se = _module("solve_eta")

    r, q, s = _t(N, K), _t(N, K), _t()
    shape = {"N": N, "K": K, "dtype": "fp32"}
    return [Workload("daps_weights", "fwd", shape, lambda: dw._triton_forward(r, q, s, s)),
            Workload("solve_eta", "fwd", shape,
                     lambda: se._triton_forward(r, q, s, 0.5, 1e-3, 1e3))]


def decoding_workloads(B: int, D: int, H: int, L: int, K_mlp: int, dtype: str = "bf16",
                       bias: bool = False, t: int | None = None) -> list[Workload]:
    """The decoding ops of one sampled position: B rows of width D, H heads over a KV cache of
    L slots (the position ``t``, default L // 2, only sets the decode loop's trip count in
    the static report), the projections into D from D and from K_mlp (the MLP's fc2)."""
    aln = _module("add_layer_norm")
    laln = _module("linear_add_layer_norm")
    dec = _module("decode_attention")

    dt = _DT[dtype]
    f32 = torch.float32
    x, r = _t(B, D, dtype=f32), _t(D, dtype=f32)
    w, b = _t(D, dtype=f32), _t(D, dtype=f32)
    table = _t(1024, D, dtype=f32)
    index = _ints((B,), 1024)
    a_attn, a_mlp = _t(B, D, dtype=dt), _t(B, K_mlp, dtype=dt)
    w_attn, w_mlp = _t(D, D, dtype=dt), _t(D, K_mlp, dtype=dt)
    b_proj = _t(D, dtype=dt) if bias else None
    DH = D // H
    q, kv_new = _t(B, H, DH, dtype=dt), _t(B, 2, H, DH, dtype=dt)
    cache = _t(2, B, H, L, DH, dtype=dt)
    pos = _ints((), L, torch.int32, fill=L // 2 if t is None else t)
    return [
        Workload("add_layer_norm", "fwd", {"R": B, "D": D, "embed": 1, "dtype": dtype},
                 lambda: aln._triton_forward(table, r, w, b, 1e-5, dt, index)),
        Workload("add_layer_norm", "fwd", {"R": B, "D": D, "dtype": dtype},
                 lambda: aln._triton_forward(x, x, w, b, 1e-5, dt)),
        Workload("linear_add_layer_norm", "fwd", {"R": B, "K": D, "D": D, "dtype": dtype},
                 lambda: laln._triton_forward(a_attn, w_attn, b_proj, x, w, b, 1e-5, dt)),
        Workload("linear_add_layer_norm", "fwd", {"R": B, "K": K_mlp, "D": D, "dtype": dtype},
                 lambda: laln._triton_forward(a_mlp, w_mlp, b_proj, x, w, b, 1e-5, dt)),
        Workload("decode_attention", "fwd",
                 {"B": B, "H": H, "DH": DH, "L": L, "t": L // 2 if t is None else t,
                  "dtype": dtype},
                 lambda: dec._triton_forward(q, kv_new, cache, pos)),
    ]


def compile_check_workloads() -> list[Workload]:
    """Every constexpr branch a launcher can take, at small shapes whose specialisation differs:
    V a multiple of 16 and not (1000, 50257: a multi-row tile and a one-row tile), each
    dtype, int32 and int64 tokens, bias or not, greedy or not, every backward gradient
    combination. Few tl.dot variants: each takes seconds to compile."""
    out: list[Workload] = []
    for dtype in ("fp32", "bf16", "fp16"):
        full = dtype == "bf16"
        for V in (1024, 1000, 50257):
            for tok in ((torch.int64, torch.int32) if full else (torch.int64,)):
                out += token_workloads(64, V, dtype, tok, all_variants=full)
    for dtype, D, V, bias, full in (("fp32", 128, 1024, False, False),
                                    ("bf16", 100, 1000, True, True),
                                    ("fp16", 128, 1024, True, False)):
        out += linear_workloads(256, D, V, dtype, bias, all_variants=full)
    for dtype, V, greedy, bias in (("fp32", 1024, True, False), ("bf16", 1000, False, True),
                                   ("fp16", 50257, False, False)):
        out += sampler_workloads(64, V, 64, dtype, greedy, bias)
    for N, K in ((4096, 8), (64, 4096), (1 << 20, 4096)):
        out += daps_workloads(N, K)
    for dtype, D, H, bias in (("bf16", 128, 4, False), ("fp32", 24, 3, True),
                              ("fp16", 256, 8, True)):
        out += decoding_workloads(64, D, H, 40, 4 * D, dtype, bias)
    return out


def launches_of(workloads: list[Workload], capability: int = 90
                ) -> list[tuple[Workload, Launch]]:
    """(workload, launch) for every launch the workloads make, in order."""
    out = []
    for wl in workloads:
        with capture(capability) as launches:
            wl.run()
        if not launches:
            raise RuntimeError(f"{wl.label} {wl.shape} launched no Triton kernel")
        out.extend((wl, launch) for launch in launches)
    return out


def unique_launches(pairs: list[tuple[Workload, Launch]]) -> list[Launch]:
    """Distinct compilations (kernel, signature, constexprs, attrs, options)."""
    seen, out = set(), []
    for _, launch in pairs:
        key = (id(launch.kernel), tuple(sorted(launch.signature.items())),
               repr(sorted(launch.constexprs.items())), repr(sorted(launch.attrs.items())),
               launch.num_warps, launch.options.get("num_stages"))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def cdiv(a: int, b: int) -> int:
    return -(-a // b) if b else 0


__all__ = ["Launch", "Workload", "capture", "compile_launch", "launches_of", "unique_launches",
           "compile_check_workloads", "cdiv"]
