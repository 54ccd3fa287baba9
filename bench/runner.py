"""The providers of an op (each ``dvae_kernels`` backend that runs on the device, the reference
under ``torch.compile``, Liger-Kernel and Cut Cross-Entropy where installed) and the runner:
the same rotating input sets for every provider, providers validated against the ``torch``
backend first, warm-up, then providers interleaved round by round."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dvae_kernels import _dispatch

from .machine import cache_bytes
from .specs import Case, OpSpec, Provider
from .timing import Timer, summarize

# ---------------------------------------------------------------------------------------------
# Providers
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
