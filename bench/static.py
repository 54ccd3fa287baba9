"""``python -m bench.static``: what each kernel will do on an H100/H200, predicted from its
compiled code, without a GPU.

    python -m bench.static [--arch sm_90 sm_80] [--ops OP ...] [--quick] --out DIR

Every Triton kernel is compiled exactly as a real launch specialises it
(:mod:`dvae_kernels._specialize`: the op launchers run on ``meta`` tensors at the
representative shapes of :func:`representative_workloads`, and Triton's own binder derives
16-byte divisibility and
unit-stride constexprs from the arguments). For each launch the report reads registers,
spills and shared memory (ptxas' own ``-v`` log of that compilation), disassembles the cubin
(``cuobjdump -sass``, shipped with Triton) and counts its instruction mix, atomics and MMA
instructions. Then, per GPU::

    predicted = max(bytes_moved / copy bandwidth,
                    issued warp-instructions / issue rate,
                    MUFU warp-instructions / MUFU rate,
                    MMA FLOPs / tensor peak)
    roofline_fraction = max(bytes_min / copy bandwidth, FLOPs / tensor peak) / predicted

Dynamic instruction counts: each SASS loop (a backward branch) runs the trip count the
launch implies (:data:`TRIPS`: V tiles, D tiles, by nesting depth); everything else once per
program. All warps of a program are assumed to run the same stream. ``bytes_moved`` is a
per-kernel model of HBM traffic (:func:`traffic`): a tensor re-read by consecutive programs
counts once when it fits in half of L2, otherwise once per re-read. ``bytes_min`` is what the
op phase must move under the autograd contract (the forward cannot know the upstream
gradient): each input once, the outputs the backward needs, the gradient once.

GPU constants (:data:`GPUS`): copy bandwidth and bf16 tensor peak are the figures measured on
the project's H100/H200 machines (device copy about 3.0 / 4.3 TB/s, bf16 matmul about 790
TFLOP/s; docs/conventions.md#predictions-without-a-gpu). Assumed, not measured: 132 SMs at 1.755
GHz, 4 warp-instructions issued per SM per clock (one per scheduler), MUFU at 16 lanes per SM
per clock (0.5 warp-instructions), 65,536 registers, 228 KiB shared memory and 64 warps per SM,
L2 50 MiB. A kernel with fewer programs than SMs gets that share of the bandwidth and tensor
peak. sm_80 builds are compiled and disassembled (registers, spills, instruction mix) but not
predicted: no A100 constants were measured.

Writes ``DIR/static.json`` (a list of records: op, phase, kernel, arch, shape, gpu, regs,
spills, smem_bytes, ctas_per_sm, instruction mix, atomics, bytes_moved, bytes_min,
predicted_ms, roofline_fraction, ...), ``DIR/sass/<kernel>__<arch>.sass`` for each compiled
kernel (``<kernel>-<n>`` when one kernel compiles to several variants), ``DIR/summary.json``
(per op, fwd+bwd) and prints a table. Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

GPUS = {
    "H100": {"sms": 132, "clock_hz": 1.755e9, "copy_bytes_s": 3.0e12, "bf16_flops_s": 790e12,
             "l2_bytes": 50 * 2**20},
    "H200": {"sms": 132, "clock_hz": 1.755e9, "copy_bytes_s": 4.3e12, "bf16_flops_s": 790e12,
             "l2_bytes": 50 * 2**20},
}


def _calibrate(gpus: dict, path: Path | None = None) -> dict:
    """The GPU constants with the copy bandwidth and bf16 rate measured on a GPU run
    (``bench/gpu_constants.json``, written by ``python -m bench.gpu_report calibrate``)."""
    path = path or Path(__file__).resolve().parent / "gpu_constants.json"
    if not path.is_file():
        return gpus
    data = json.loads(path.read_text())
    out = {}
    for name, g in gpus.items():
        entry = data.get(name.lower()) or {}
        g = dict(g)
        if isinstance(entry.get("copy_tbps"), (int, float)):
            g["copy_bytes_s"] = entry["copy_tbps"] * 1e12
        if isinstance(entry.get("bf16_tflops"), (int, float)):
            g["bf16_flops_s"] = entry["bf16_tflops"] * 1e12
        out[name] = g
    return out


GPUS = _calibrate(GPUS)
ISSUE_PER_SM_CLK = 4.0
MUFU_PER_SM_CLK = 0.5
SM_REGS, SM_SMEM, SM_WARPS, SM_CTAS = 65536, 228 * 1024, 64, 32
ARCHS = {"sm_90": 90, "sm_80": 80}
PREDICTED_ARCH = "sm_90"

# ---------------------------------------------------------------------------------------------
# SASS: disassembly, instruction mix, loops
# ---------------------------------------------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")

CATEGORIES = {
    "mufu": ("MUFU",),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FCHK", "FSET", "FRND"),
    "int": ("IADD3", "IMAD", "LEA", "SHF", "LOP3", "ISETP", "IMNMX", "SEL", "IABS", "SGXT",
            "PRMT", "VIADD", "VIMNMX", "IMUL", "BMSK", "POPC", "FLO", "I2F", "F2I", "F2F",
            "I2FP", "F2FP", "HADD2", "HMUL2", "HFMA2"),
    "global_load": ("LDG",),
    "global_store": ("STG",),
    "async_copy": ("LDGSTS", "LDGDEPBAR", "UBLKCP", "UTMALDG", "UTMASTG"),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "local": ("LDL", "STL"),
    "atomic": ("ATOMG", "ATOM", "RED", "REDG", "ATOMS"),
    "membar": ("MEMBAR", "CCTL", "FENCE"),
    "barrier": ("BAR", "SYNCS", "WARPSYNC", "BSYNC", "BSSY", "DEPBAR"),
    "shuffle": ("SHFL", "REDUX", "VOTE"),
    "mma": ("HMMA", "HGMMA", "IMMA", "WGMMA", "DMMA", "QGMMA", "WARPGROUP"),
    "control": ("BRA", "EXIT", "RET", "CALL", "NOP", "BPT", "JMP", "BREAK", "YIELD"),
}
_CATEGORY = {op: cat for cat, ops in CATEGORIES.items() for op in ops}


def tool(name: str) -> str:
    """Path of a CUDA binary shipped inside the installed triton package (or on PATH)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def disassemble(cubin: bytes, workdir: Path, stem: str) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    f = workdir / f"{stem}.cubin"
    f.write_bytes(cubin)
    try:
        out = subprocess.run([tool("cuobjdump"), "-sass", str(f)], capture_output=True,
                             text=True, check=True).stdout
    finally:
        f.unlink()
    return compact_sass(out)


def compact_sass(text: str) -> str:
    """cuobjdump's listing without the instruction encodings and the column padding (4x
    smaller; addresses, predicates, opcodes and operands kept)."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"/\* 0x[0-9a-f]{16} \*/", "", line).rstrip()
        if line:
            lines.append(re.sub(r"(\*/)\s+", r"\1 ", re.sub(r"^\s+", "  ", line)))
    return "\n".join(lines) + "\n"


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """[(address, opcode with modifiers, operands)] in program order."""
    return [(int(a, 16), op, rest) for a, op, rest in
            ((m.group(1), m.group(2) + _mods(m.group(0)), m.group(3))
             for m in _INSTR.finditer(sass))]


def _mods(text: str) -> str:
    m = re.search(r"\b[A-Z][A-Z0-9_]*((?:\.[A-Z0-9_]+)*)", text.split("*/", 1)[1])
    return m.group(1) if m else ""


def loops(instrs) -> list[tuple[int, int]]:
    """(start, end) address ranges of loops: a branch to an earlier address."""
    out = []
    for addr, op, rest in instrs:
        if op.split(".")[0] == "BRA":
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < addr:  # (a branch to itself: the trap after EXIT)
                out.append((int(t.group(1), 16), addr))
    return out


def dynamic_mix(instrs, trips: list[int]) -> tuple[Counter, Counter, list[dict]]:
    """(static counts by category, dynamic counts per warp by category, loop descriptions).

    An instruction inside k nested loops runs trips[0]·…·trips[k-1] times (depth beyond the
    list: once)."""
    spans = loops(instrs)
    static, dynamic = Counter(), Counter()
    for addr, op, _ in instrs:
        base = op.split(".")[0]
        cat = _CATEGORY.get(base, "other")
        depth = sum(1 for s, e in spans if s <= addr <= e)
        mult = 1
        for d in range(min(depth, len(trips))):
            mult *= trips[d]
        static[cat] += 1
        dynamic[cat] += mult
        if base == "MUFU":
            static["mufu:" + op] += 1
    desc = []
    for s, e in spans:
        depth = sum(1 for s2, e2 in spans if s2 <= s and e <= e2) - 1
        desc.append({"start": s, "end": e, "depth": depth,
                     "trips": trips[depth] if depth < len(trips) else 1,
                     "instructions": sum(1 for a, _, _ in instrs if s <= a <= e)})
    return static, dynamic, desc


# ---------------------------------------------------------------------------------------------
# Trip counts and traffic per kernel
# ---------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _c(launch, name, default=None):
    try:
        return launch.constexpr(name)
    except (ValueError, KeyError):
        return default


def trips(launch, shape: dict) -> list[int]:
    """Loop trip counts by nesting depth (outermost first) for one launch."""
    name = launch.name
    if name == "_add_layer_norm_kernel":  # one row per program, no loop
        return []
    if name == "_linear_add_layer_norm_kernel":  # the projection's K slices
        return [_cdiv(shape["K"], _c(launch, "BLOCK_K", 1))]
    if name == "_decode_attention_kernel":  # the cache's slots before t, BLOCK_S at a time
        return [_cdiv(shape["t"], _c(launch, "BLOCK_S", 1))]
    V, D = shape.get("V", 1), shape.get("D", 1)
    bv, bd = _c(launch, "BLOCK_V", 1), _c(launch, "BLOCK_D", 1)
    if name.startswith("_linear_token_logprobs_bwd"):
        return [_cdiv(D, bd)] if bd else []
    if name.startswith("_linear_dw"):  # rows of the split (outer), D slices of the recompute
        return [_cdiv(launch.ints.get("rows_per_split", 1), _c(launch, "BLOCK_N", 1)),
                _cdiv(D, bd)]
    if name == "_merge_kernel":  # two loops over the splits
        return [launch.ints.get("SPLITS", 1)]
    if name.startswith("_linear"):
        cols = launch.ints.get("cols_per_split", V)  # a vocabulary split, or all of it
        return [_cdiv(min(cols, V), bv), _cdiv(D, bd)]
    if name.startswith("_weighted_token_nll") and _c(launch, "ONE_TILE", False):
        return []
    return [_cdiv(V, bv)] if bv else []


def traffic(op: str, phase: str, shape: dict, launch, l2_bytes: int,
            concurrent: int = 1) -> dict:
    """HBM bytes moved by the launch (model), the phase's minimum, and MMA FLOPs."""
    it = {"bf16": 2, "fp16": 2, "fp32": 4}[shape["dtype"]]
    tb = 8  # int64 token ids
    fit = l2_bytes // 2
    if op in ("add_layer_norm", "linear_add_layer_norm", "decode_attention"):
        return _decoding_traffic(op, shape, it)
    if op in ("token_logprobs", "weighted_token_nll", "sample_tokens"):
        R, V = shape["R"], shape["V"]
        x = R * V * it
        if op == "sample_tokens":
            moved = x + R * (tb + 4)
            return {"bytes_moved": moved, "bytes_min": moved, "flops": 0}
        if op == "token_logprobs" and phase == "fwd":
            writes = 4 * (1 + 1 + (1 if _writes_entropy(launch) else 0))
            return {"bytes_moved": x + R * (tb + writes), "bytes_min": x + R * (tb + 8),
                    "flops": 0}
        if op == "token_logprobs":  # bwd: read logits, write the gradient
            small = R * (tb + 4 + 4 + (8 if _c(launch, "HAS_GENT", False) else 0))
            return {"bytes_moved": 2 * x + small, "bytes_min": 2 * x + R * (tb + 8),
                    "flops": 0}
        grad = _c(launch, "COMPUTE_GRAD", False)
        moved = x + (x if grad else 0) + R * (tb + 8)
        if phase == "fwd":
            return {"bytes_moved": moved, "bytes_min": x + R * (tb + 8), "flops": 0}
        return {"bytes_moved": moved, "bytes_min": 2 * x + R * (tb + 8), "flops": 0}
    N, D, V = shape["N"], shape["D"], shape["V"]
    h, w = N * D * it, V * D * it
    bn, bv = _c(launch, "BLOCK_N", 64), _c(launch, "BLOCK_V", 64)
    row_blocks, v_tiles = _cdiv(N, bn), _cdiv(V, bv)
    w_reads = 1 if w <= fit else row_blocks
    if launch.name == "_merge_kernel":  # reads the partial states, writes the outputs
        splits = launch.ints.get("SPLITS", 1)
        return {"bytes_moved": 6 * 4 * splits * N + N * (tb + 4), "bytes_min": 0, "flops": 0}
    if op == "linear_sample_tokens":
        splits = launch.grid[1]
        moved = h * splits + w * w_reads + N * (tb + 4) + (6 * 4 * splits * N if splits > 1
                                                           else 0)
        return {"bytes_moved": moved, "bytes_min": h + w + N * (tb + 4), "flops": 2 * N * D * V}
    if phase == "fwd":
        moved = h + w * w_reads + N * (tb + 12)
        return {"bytes_moved": moved, "bytes_min": h + w + N * (tb + 8), "flops": 2 * N * D * V}
    # bwd (recompute the logits tile, then dH and dW): 6·N·D·V FLOPs.
    kind = launch.name
    out = {"bytes_min": h + w + N * (tb + 12) + h + w, "flops": 6 * N * D * V}
    if kind.startswith("_linear_token_logprobs_bwd"):
        # Row blocks vary fastest in the grid: an h block comes back once per V tile, from HBM
        # when h does not fit in L2; gh and gw are accumulated with fp32 atomics (payload
        # 2·N·V·D/BLOCK·4 bytes at L2, the gh buffer itself beyond L2 too), zero-filled
        # first and cast at the end.
        h_reads = 1 if h <= fit else v_tiles
        atomics = (row_blocks * v_tiles) * (bn * D + bv * D) * 4
        buffers = (N * D + V * D) * 4 * 2 + N * D * it + V * D * it
        out["bytes_moved"] = h * h_reads + w + N * (tb + 12) + atomics + buffers
        out["atomic_bytes"] = atomics
        return out
    if kind.startswith("_linear_dh"):
        # grid (row blocks, D slices), row blocks fastest: each slice recomputes the logits
        # (all of D) and re-reads h, from HBM when h does not fit in L2; the weight stays in L2.
        slices = launch.grid[1]
        h_reads = 1 if h <= fit else slices
        return {"bytes_moved": h * h_reads + w + N * (tb + 12) + N * D * it,
                "bytes_min": h + w + N * (tb + 12) + N * D * it,
                "flops": (2 * slices + 2) * N * D * V, "flops_min": 4 * N * D * V}
    if kind.startswith("_linear_dw"):
        # grid (V tiles, D slices, row splits): the programs of one split read the same rows
        # of h; they run together only as far as the GPU holds them (concurrent programs).
        slices, splits = launch.grid[1], launch.grid[2]
        per_split = launch.grid[0] * slices
        h_reads = 1 if h <= fit else _cdiv(per_split, max(1, concurrent))
        partials = splits * V * D * 4
        moved = h * h_reads + w + N * (tb + 12) + partials * (2 if splits > 1 else 1) \
            + V * D * it
        return {"bytes_moved": moved, "bytes_min": V * D * it,
                "flops": (2 * slices + 2) * N * D * V, "flops_min": 2 * N * D * V}
    out["bytes_moved"] = out["bytes_min"]
    return out


def _elements(shape: dict) -> int:
    """What the per-element instruction mix is counted per: logits for the token and linear
    ops, cache values read for decode attention, row values for the LayerNorm ops."""
    if "V" in shape:
        return shape.get("R", shape.get("N")) * shape["V"]
    if "t" in shape:
        return shape["B"] * shape["H"] * shape["DH"] * (shape["t"] + 1)
    return shape["R"] * shape["D"]


def _decoding_traffic(op: str, shape: dict, it: int) -> dict:
    """The decoding kernels: every tensor once (their weights and tables are small and stay
    in L2); the residual stream, its sum and the LayerNorm parameters are float32, the
    LayerNorm output and the projection's operands in the compute dtype. decode_attention
    reads the t earlier slots of its cache, writes slot t and does its 4·B·H·DH·(t + 1)
    FLOPs on the CUDA cores (no MMA)."""
    if op == "decode_attention":
        B, H, DH, t = shape["B"], shape["H"], shape["DH"], shape["t"]
        vec = B * H * DH * it
        moved = vec * (1 + 2 + 2 + 2 * t + 1)  # q, k/v new, slot t, slots 0..t-1, out
        return {"bytes_moved": moved, "bytes_min": moved, "flops": 0}
    R, D = shape["R"], shape["D"]
    norm = 2 * D * 4 + R * D * (4 + it)  # LayerNorm weight and bias; s and y
    if op == "add_layer_norm":
        x = R * D * 4 + (R * 8 if shape.get("embed") else 0)  # the rows (and their index)
        r = D * 4 if shape.get("embed") else R * D * 4  # a broadcast position or a stream
        moved = x + r + norm
        return {"bytes_moved": moved, "bytes_min": moved, "flops": 0}
    K = shape["K"]
    moved = R * K * it + D * K * it + R * D * 4 + norm
    return {"bytes_moved": moved, "bytes_min": moved, "flops": 2 * R * K * D}


def _writes_entropy(launch) -> bool:
    v = _c(launch, "WITH_ENTROPY", None)
    return True if v is None else bool(v)


def occupancy(regs: int, smem: int, warps: int) -> int:
    """Resident CTAs per SM: registers (256 per warp granule), shared memory, warps, CTAs."""
    per_warp = _cdiv(max(regs, 1) * 32, 256) * 256
    by_regs = SM_REGS // (per_warp * warps)
    by_smem = SM_SMEM // smem if smem else SM_CTAS
    return max(0, min(by_regs, by_smem, SM_WARPS // warps, SM_CTAS))


def predict(rec: dict, gpu: dict) -> dict:
    sms = gpu["sms"]
    programs, warps = rec["programs"], rec["num_warps"]
    per_sm = _cdiv(programs, sms)
    busy = min(1.0, programs / sms)
    resident = max(1, min(rec["ctas_per_sm"] or 1, per_sm))
    rate = min(ISSUE_PER_SM_CLK, resident * warps)
    dyn = rec["dynamic_per_warp"]
    t_issue = per_sm * warps * sum(dyn.values()) / (rate * gpu["clock_hz"])
    t_mufu = per_sm * warps * dyn.get("mufu", 0) / (MUFU_PER_SM_CLK * gpu["clock_hz"])
    t_mem = rec["bytes_moved"] / (gpu["copy_bytes_s"] * busy)
    t_mma = rec["flops"] / (gpu["bf16_flops_s"] * busy)
    terms = {"memory": t_mem, "issue": t_issue, "mufu": t_mufu, "mma": t_mma}
    bound = max(terms, key=terms.get)
    ideal = max(rec["bytes_min"] / gpu["copy_bytes_s"],
                rec.get("flops_min", rec["flops"]) / gpu["bf16_flops_s"])
    pred = terms[bound]
    return {"predicted_ms": pred * 1e3, "ideal_ms": ideal * 1e3, "bound": bound,
            "terms_ms": {k: v * 1e3 for k, v in terms.items()},
            "roofline_fraction": ideal / pred if pred > 0 else None}


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------

_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")
_STACK = re.compile(r"(\d+) bytes stack frame")


def compile_with_log(launch, cap: int):
    """(compiled kernel, ptxas -v log of that compilation)."""
    from triton import knobs

    from dvae_kernels._specialize import compile_launch

    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    try:
        with contextlib.redirect_stdout(buf):
            compiled = compile_launch(launch, cap)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    return compiled, buf.getvalue()


def resources(compiled, log: str) -> dict:
    regs = _PTXAS.search(log)
    spill = _SPILL.search(log)
    smem = _SMEM.search(log)
    stack = _STACK.search(log)
    if regs is None:
        raise RuntimeError(f"no ptxas -v log for this compilation: {log[-2000:]!r}")
    return {"regs": int(regs.group(1)),
            "spills": int(spill.group(1)) + int(spill.group(2)) if spill else 0,
            "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0,
            "stack_bytes": int(stack.group(1)) if stack else 0,
            "smem_bytes": max(int(compiled.metadata.shared),
                              int(smem.group(1)) if smem else 0)}


def _variant_key(launch) -> str:
    return repr((launch.name, sorted(launch.signature.items()),
                 sorted(launch.constexprs.items()), sorted(launch.attrs.items()),
                 launch.num_warps, launch.options.get("num_stages")))


def build_records(workloads, archs: list[str], out: Path, keep_sass: list[str] | None = None,
                  log=print) -> list[dict]:
    from dvae_kernels._specialize import launches_of

    records = []
    sass_dir = out / "sass"
    sass_dir.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        cap = ARCHS[arch]
        compiled_cache: dict[str, dict] = {}
        names: Counter = Counter()
        for wl, launch in launches_of(workloads, cap):
            key = _variant_key(launch)
            info = compiled_cache.get(key)
            if info is None:
                t0 = time.perf_counter()
                compiled, ptxas_log = compile_with_log(launch, cap)
                res = resources(compiled, ptxas_log)
                stem = launch.name if names[launch.name] == 0 else \
                    f"{launch.name}-{names[launch.name]}"
                names[launch.name] += 1
                sass = disassemble(compiled.asm["cubin"], out / "tmp", stem)
                keep = keep_sass is None or arch in keep_sass
                if keep:
                    (sass_dir / f"{stem}__{arch}.sass").write_text(
                        f"// {launch.describe()}\n{sass}")
                info = {"res": res, "instrs": parse_sass(sass),
                        "sass": f"sass/{stem}__{arch}.sass" if keep else None,
                        "compile_s": time.perf_counter() - t0}
                compiled_cache[key] = info
            tr = trips(launch, wl.shape)
            static, dynamic, loop_desc = dynamic_mix(info["instrs"], tr)
            res = info["res"]
            warps = launch.num_warps
            ctas = occupancy(res.get("regs", 0), res.get("smem_bytes", 0), warps)
            base = {
                "op": wl.op, "phase": wl.phase, "kernel": launch.name, "arch": arch,
                "shape": wl.shape, "grid": list(launch.grid), "programs": launch.programs,
                "num_warps": warps, "num_stages": launch.options.get("num_stages"),
                "constexprs": {launch.kernel.arg_names[k[0]]: v
                               for k, v in launch.constexprs.items()},
                "divisible_by_16": sorted(launch.kernel.arg_names[k[0]]
                                          for k, v in launch.attrs.items() if v),
                **res, "ctas_per_sm": ctas, "sass": info["sass"],
                "sass_instructions": sum(v for k, v in static.items() if ":" not in k),
                "static_mix": dict(static), "dynamic_per_warp": {
                    k: v for k, v in dynamic.items()}, "loops": loop_desc, "trips": tr,
                "atomics": static.get("atomic", 0),
                "atomics_dynamic": dynamic.get("atomic", 0) * warps * launch.programs,
                "mma_instructions": static.get("mma", 0),
            }
            for gname, gpu in GPUS.items():
                rec = dict(base, gpu=gname if arch == PREDICTED_ARCH else None)
                rec.update(traffic(wl.op, wl.phase, wl.shape, launch, gpu["l2_bytes"],
                                   gpu["sms"] * max(1, ctas)))
                elements = _elements(wl.shape)
                rec["dynamic_per_element"] = {
                    k: v * warps * launch.programs / elements for k, v in dynamic.items()}
                if arch == PREDICTED_ARCH:
                    rec.update(predict(rec, gpu))
                else:
                    rec.update({"predicted_ms": None, "roofline_fraction": None})
                records.append(rec)
                if arch != PREDICTED_ARCH:
                    break  # one record per launch for unpredicted architectures
            log(f"  {arch} {wl.label:32s} {launch.name:38s} regs={res.get('regs')} "
                f"spills={res.get('spills')} smem={res.get('smem_bytes')}")
        tmp = out / "tmp"
        if tmp.exists():
            tmp.rmdir()
    return records


def summarise(records: list[dict]) -> list[dict]:
    """Per op, shape and GPU: fwd+bwd predicted and ideal time and the fraction."""
    groups: dict[tuple, dict] = {}
    for r in records:
        if r.get("gpu") is None or r.get("predicted_ms") is None:
            continue
        if r["phase"] not in ("fwd", "bwd"):
            continue
        key = (r["op"], json.dumps(r["shape"], sort_keys=True), r["gpu"])
        g = groups.setdefault(key, {"op": r["op"], "shape": r["shape"], "gpu": r["gpu"],
                                    "predicted_ms": 0.0, "ideal_ms": 0.0, "phases": []})
        g["predicted_ms"] += r["predicted_ms"]
        g["ideal_ms"] += r["ideal_ms"]
        g["phases"].append(r["phase"])
    out = []
    for g in groups.values():
        g["roofline_fraction"] = g["ideal_ms"] / g["predicted_ms"] if g["predicted_ms"] else None
        out.append(g)
    return out


def _shape_str(shape: dict | None) -> str:
    if not shape:
        return ""
    return ",".join(f"{k}={v}" for k, v in shape.items() if k != "dtype") + \
        f",{shape.get('dtype', '')}"


def print_table(records: list[dict], summary: list[dict], file=sys.stdout) -> None:
    cols = ("op.phase", "kernel", "arch", "shape", "regs", "spill", "smem", "cta/SM",
            "atom", "mma", "instr/warp", "GB moved", "GB min", "bound", "H100 ms", "frac")
    rows = []
    for r in records:
        if r.get("gpu") not in (None, "H100"):
            continue
        dyn = r.get("dynamic_per_warp") or {}
        rows.append((f"{r['op']}.{r['phase']}", r["kernel"][:34], r["arch"],
                     _shape_str(r["shape"]), r.get("regs"), r.get("spills"),
                     r.get("smem_bytes"), r.get("ctas_per_sm"), r.get("atomics"),
                     r.get("mma_instructions"), sum(dyn.values()) if dyn else "",
                     _gb(r.get("bytes_moved")), _gb(r.get("bytes_min")),
                     r.get("bound") or "", "" if r.get("predicted_ms") is None
                     else f"{r['predicted_ms']:.3f}",
                     "" if r.get("roofline_fraction") is None
                     else f"{r['roofline_fraction']:.2f}"))
    _table(cols, rows, file)
    print("\nfwd+bwd per op (sm_90 build; fraction = ideal / predicted time)", file=file)
    rows = [(s["op"], _shape_str(s["shape"]), s["gpu"], f"{s['predicted_ms']:.3f}",
             f"{s['ideal_ms']:.3f}", f"{s['roofline_fraction']:.2f}") for s in summary]
    _table(("op", "shape", "gpu", "predicted ms", "ideal ms", "fraction"), rows, file)


def _gb(x) -> str:
    return "" if x is None else f"{x / 1e9:.3f}"


def _table(cols, rows, file) -> None:
    cells = [tuple("" if c is None else str(c) for c in row) for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=file)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (the built _C_cuda library)
# ---------------------------------------------------------------------------------------------

_RES = re.compile(r"Function ([^\s:]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuda_records(archs: list[str], out: Path, keep_sass: list[str] | None = None
                 ) -> list[dict]:
    """Registers, stack/local bytes (spills show up there), shared memory and the static
    instruction mix of every kernel in the built CUDA library, per architecture; no timing
    prediction (their launch geometry is not modelled here)."""
    import dvae_kernels

    libs = sorted(Path(dvae_kernels.__file__).parent.glob("_C_cuda*.so"))
    if not libs:
        return []
    lib = str(libs[0])
    records = []
    for arch in archs:
        res = subprocess.run([tool("cuobjdump"), "-res-usage", "-arch", arch, lib],
                             capture_output=True, text=True)
        sass = subprocess.run([tool("cuobjdump"), "-sass", "-arch", arch, lib],
                              capture_output=True, text=True)
        if res.returncode != 0 or sass.returncode != 0:
            continue
        funcs = re.split(r"\n\s*Function : ", sass.stdout)
        mixes = {}
        for chunk in funcs[1:]:
            name = chunk.split("\n", 1)[0].strip()
            chunk = compact_sass(chunk)
            static, _, _ = dynamic_mix(parse_sass(chunk), [])
            mixes[name] = (static, chunk)
        demangled = _demangle(list(mixes))
        stems: Counter = Counter()
        for m in _RES.finditer(res.stdout):
            name = m.group(1)
            static, text = mixes.get(name, (Counter(), ""))
            pretty = demangled.get(name, name)
            stem = re.sub(r"[^A-Za-z0-9_]+", "_", pretty.replace("dvae_kernels::cuda::", "")
                          .replace("(anonymous namespace)::", ""))[:60].strip("_")
            stems[stem] += 1
            if stems[stem] > 1:
                stem = f"{stem}-{stems[stem] - 1}"
            text = text if keep_sass is None or arch in keep_sass else ""
            if text:
                (out / "sass" / f"cuda_{stem}__{arch}.sass").write_text(
                    f"// {pretty}\n{text}")
            records.append({
                "op": "csrc", "phase": "cuda", "kernel": pretty, "arch": arch, "shape": None,
                "gpu": None, "regs": int(m.group(2)), "stack_bytes": int(m.group(3)),
                "smem_bytes": int(m.group(4)), "local_bytes": int(m.group(5)),
                "spills": int(m.group(5)), "atomics": static.get("atomic", 0),
                "mma_instructions": static.get("mma", 0),
                "sass_instructions": sum(v for k, v in static.items() if ":" not in k),
                "static_mix": dict(static), "bytes_moved": None, "bytes_min": None,
                "predicted_ms": None, "roofline_fraction": None,
                "sass": f"sass/cuda_{stem}__{arch}.sass" if text else None})
    return records


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, check=True).stdout.split("\n")
        return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        return {}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def representative_workloads():
    """The report's shapes (bf16): token ops at [1,048,576, 1024] (the ImageNet-256 step's
    N·K·L rows) and [8192, 32768] (an LLM vocabulary); linear ops at the DAPS shape (N=524,288,
    D=128, V=1024) and at N=65,536, D=512, V=16,384; samplers at 512 rows, V=1024, D=128; the
    decoding ops of one ImageNet-256 sampled position (512 rows, d=128, 4 heads, 1,024 slots,
    MLP width 512)."""
    from dvae_kernels import _specialize as S

    return (S.token_workloads(1 << 20, 1024) + S.token_workloads(8192, 32768)
            + S.linear_workloads(524288, 128, 1024) + S.linear_workloads(65536, 512, 16384)
            + S.sampler_workloads(512, 1024, 128) + S.decoding_workloads(512, 128, 4, 1024, 512))


def workloads_for(ops: list[str] | None, quick: bool):
    from dvae_kernels import _specialize as S

    if quick:
        wls = (S.token_workloads(1 << 20, 1024) + S.linear_workloads(524288, 128, 1024)
               + S.sampler_workloads(512, 1024, 128)
               + S.decoding_workloads(512, 128, 4, 1024, 512))
    else:
        wls = representative_workloads()
    if ops:
        wls = [w for w in wls if w.op in ops]
    return wls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["sm_90", "sm_80"], choices=sorted(ARCHS))
    p.add_argument("--ops", nargs="+", default=None,
                   help="token_logprobs weighted_token_nll linear_token_logprobs "
                        "sample_tokens linear_sample_tokens add_layer_norm "
                        "linear_add_layer_norm decode_attention")
    p.add_argument("--quick", action="store_true",
                   help="one shape per op family (the DAPS shapes)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA library's kernels")
    p.add_argument("--keep-sass", nargs="+", default=None, choices=sorted(ARCHS),
                   help="write SASS files for these architectures only (default: all)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the static report needs the real compiler",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wls = workloads_for(args.ops, args.quick)
    records = build_records(wls, args.arch, args.out, args.keep_sass)
    if not args.no_cuda and not args.ops:
        records += cuda_records(args.arch, args.out, args.keep_sass)
    summary = summarise(records)
    (args.out / "static.json").write_text(json.dumps(records, indent=1, default=str))
    (args.out / "summary.json").write_text(json.dumps(
        {"command": "python -m " + " ".join(["bench.static", *(argv or sys.argv[1:])]),
         "gpus": GPUS, "issue_per_sm_clk": ISSUE_PER_SM_CLK, "mufu_per_sm_clk": MUFU_PER_SM_CLK,
         "ops": summary, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    with open(args.out / "table.txt", "w") as f:
        print_table(records, summary, f)
    print_table(records, summary)
    spills = [r for r in records if r.get("spills")]
    for r in spills:
        print(f"SPILL: {r['kernel']} {r['arch']} {r.get('spills')} bytes", file=sys.stderr)
    print(f"{len(records)} records in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
