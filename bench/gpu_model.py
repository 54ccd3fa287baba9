"""A step cost model: what one DAPS training step costs on a GPU, predicted without one.

    python -m bench.gpu_model --preset imagenet256 [--gpu h100|h200|a100] [key=value ...]
                              [--json FILE] [--calibration FILE]

It builds the preset's model and :class:`dvae.train_step.TrainStep` through dvae's own code,
runs one warm-up step (it creates the optimizer's state) and traces the next, steady-state step
on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no data, no device),
recording every aten op and every ``dvae_kernels`` op with a ``TorchDispatchMode``. Each op is
priced on the chosen GPU as

    time = max(launch floor, FLOPs / peak FLOP rate, HBM bytes / copy bandwidth)

with a 4 µs launch floor eager and 1.5 µs inside a CUDA graph, and the ops are summed per phase
of the step (``sample``, ``reward``, ``teacher_forced``, ``weights``, ``losses``,
``optimizer``, and ``other`` for the metrics after them), through the step's own
:class:`dvae.profiling.Phases` hooks.

Assumptions (each a choice a measurement can overturn; bench/README.md lists them too):

* **The CUDA path's settings, traced on the CPU device.** Fake CUDA tensors cannot run a
  backward pass without a GPU (the autograd engine asks the driver for the device's streams), so
  the trace uses fake CPU tensors with the CUDA path's settings forced: fused linear ops
  (``fused_linear=always``), bf16 autocast (the CPU autocast lists; like CUDA's they cast
  linear, matmul, convolution and attention to bf16 and keep LayerNorm and softmax in fp32), and
  ``dvae_kernels`` dispatched to its Triton backend (the backend CUDA picks first), and the
  grouped adaptive clipping (:class:`dvae.optim.AdaptiveClip` groups on CUDA only), the
  sampler's decoding kernels included (``add_layer_norm``, ``linear_add_layer_norm``,
  ``decode_attention``). Each ``dvae_kernels`` op is one opaque op in the trace and is counted
  as the Triton launches its implementation makes (:data:`CUSTOM_LAUNCHES`). The captured sampler
  (``sampler_graph``) is traced as its eager loop; its graph adds one copy of the images in and
  one of the tokens out per step.
* **Launches.** Views and metadata ops (``view``, ``transpose``, ``slice``, ``detach``,
  ``empty``, ...) launch nothing; every other aten op is one kernel, except: SDPA backward 3
  (flash backward: preprocess, main, dq conversion), convolution backward one per gradient it
  returns, ``_foreach_*`` and fused AdamW ``multi_tensor_apply`` launches (at most 110/64/48/36/30
  tensors for 1..5 tensor lists and 320 blocks of 65536 elements per launch; ``_foreach_norm``
  adds its final reduction kernel), ``cat`` one per 128 inputs (CUDA's batched copy).
  ``_local_scalar_dense`` (a host read) is listed in ``host_reads`` and not priced (a sync of
  the device on CUDA: the step should have none).
* **SDPA on CUDA.** bf16 with head dim <= 256: flash attention when there is no mask; with a
  boolean mask the memory-efficient kernel after the mask is converted to an additive one (the
  ``scalar_tensor``/``where`` ops of the trace, three kernels per call). Attention FLOPs are
  ``torch.utils.flop_counter``'s formulas (halved when causal: the kernels skip masked tiles);
  its bytes are q, k, v, mask and output once, so an attention over a whole static KV cache
  reads the whole cache. ``dvae_kernels::decode_attention`` (the sampler's kernel) reads the
  ``t`` earlier slots of position ``t`` and writes slot ``t`` (t known here from the position
  counter of the trace; the kernel reads it from device memory).
* **FLOPs** are counted for matmul-like ops only (mm, addmm, bmm, convolution and its backward,
  attention, the linear ``dvae_kernels`` ops: 2·N·V·D per logits pass); elementwise ops are
  priced by their bytes. bf16/fp16 matmuls run at the bf16 tensor-core rate, fp32 ones at the
  fp32 (non-tensor-core) rate.
* **HBM bytes** are the sizes of every tensor an op reads and writes, once each (no cache
  reuse across ops, no re-reads inside an op); a broadcast (stride 0) dimension counts once.

Peaks (:data:`GPUS`): H100 and H200 copy bandwidth and bf16 matmul rate were measured on the
project's machines (about 3.0 TB/s, 4.3 TB/s and 790 TFLOP/s;
docs/conventions.md#predictions-without-a-gpu); fp32 rates and all A100 figures are public spec
sheets, labelled as such. ``--calibration FILE`` replaces them with measured ones: a JSON object
with any of ``copy_tbps``, ``bf16_tflops``, ``fp32_tflops``, ``launch_us_eager``,
``launch_us_graphed``. ``--measure FILE`` writes such a file on a machine with a GPU (a 1 GiB
device copy, an 8192³ bf16 matmul, empty-kernel launches eager and replayed from a CUDA graph).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("sample", "reward", "teacher_forced", "weights", "losses", "optimizer", "other")


# Matmul shape classes by the contraction dim k: cuBLAS reaches less of the peak on thin
# products (the DAPS head's k = d = 128) than on large square ones.
MATMUL_CLASSES = (("k<=128", 128), ("k<=512", 512), ("k>512", None))


def matmul_class(k: int) -> str:
    for name, limit in MATMUL_CLASSES:
        if limit is None or k <= limit:
            return name
    return MATMUL_CLASSES[-1][0]


@dataclass(frozen=True)
class GPU:
    name: str
    copy_tbps: float  # HBM copy bandwidth, TB/s (read + write bytes per second / 1e12)
    bf16_tflops: float  # dense bf16 matmul rate
    fp32_tflops: float  # fp32 matmul rate without tensor cores (torch's default: no TF32)
    launch_us_eager: float = 4.0
    launch_us_graphed: float = 1.5
    source: str = ""
    # the fraction of the matmul rate reached per shape class (MATMUL_CLASSES); 1.0 where not
    # measured
    matmul_efficiency: tuple[tuple[str, float], ...] = ()

    def efficiency(self, k: int | None) -> float:
        if k is None:
            return 1.0
        return dict(self.matmul_efficiency).get(matmul_class(k), 1.0)


GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM", 3.0, 790.0, 67.0,
                source="copy bandwidth and bf16 matmul measured on the project's H100 machine; "
                       "fp32 rate: public spec sheet"),
    "h200": GPU("H200 SXM", 4.3, 790.0, 67.0,
                source="copy bandwidth and bf16 matmul measured on the project's H200 machine; "
                       "fp32 rate: public spec sheet"),
    "a100": GPU("A100 80GB SXM", 2.039, 312.0, 19.5,
                source="public spec sheet (peak HBM bandwidth, dense bf16, fp32); not measured"),
}

# Written by `python -m bench.gpu_report calibrate SUMMARY.json` from a GPU run; when present,
# its constants replace the defaults above for that GPU (and bench.static's).
CONSTANTS_FILE = Path(__file__).resolve().parent / "gpu_constants.json"


def calibrated(key: str, gpu: GPU, path: Path | None = None) -> GPU:
    """``gpu`` with the constants of ``bench/gpu_constants.json`` for ``key`` (h100, h200),
    if the file holds them."""
    path = path or CONSTANTS_FILE
    if not path.is_file():
        return gpu
    entry = json.loads(path.read_text()).get(key)
    if not entry:
        return gpu
    values = {k: float(entry[k]) for k in ("copy_tbps", "bf16_tflops", "fp32_tflops",
                                             "launch_us_eager", "launch_us_graphed")
              if isinstance(entry.get(k), (int, float))}
    eff = tuple(sorted((str(k), float(v)) for k, v in
                       (entry.get("matmul_efficiency") or {}).items()))
    return replace(gpu, source=f"measured on {entry.get('gpu')} at commit {entry.get('commit')} "
                   f"({entry.get('date')}), {path.name}", matmul_efficiency=eff, **values)


GPUS = {key: calibrated(key, gpu) for key, gpu in GPUS.items()}

# Ops that launch no kernel: views, metadata, allocation without initialisation.
ZERO_LAUNCH = {
    "view", "_unsafe_view", "_reshape_alias", "t", "transpose", "permute", "expand", "slice",
    "select", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "chunk", "alias",
    "as_strided", "detach", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "device", "unfold", "view_as_real", "view_as_complex", "diagonal",
    "_record_function_enter_new", "_record_function_exit", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "is_same_size", "_local_scalar_dense",
}

# multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): per launch at most this many
# tensors for 1..5 tensor lists, and 320 blocks of 65536 elements.
MTA_MAX_TENSORS = (110, 64, 48, 36, 30)
MTA_MAX_BLOCKS = 320
MTA_CHUNK = 65536


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a stride-0 dim counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _mta_launches(lists: list[list[torch.Tensor]]) -> int:
    lists = [lst for lst in lists if lst]
    if not lists:
        return 0
    depth = min(len(lists), len(MTA_MAX_TENSORS))
    n = len(lists[0])
    chunks = sum(math.ceil(t.numel() / MTA_CHUNK) for t in lists[0])
    return max(1, math.ceil(n / MTA_MAX_TENSORS[depth - 1]), math.ceil(chunks / MTA_MAX_BLOCKS))


def _linear_flops(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """One logits pass of a linear dvae_kernels op: 2·N·V·D."""
    n = hidden.numel() // hidden.shape[-1]
    return 2 * n * weight.shape[0] * weight.shape[1]


def _half(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


# dvae_kernels op -> (launches, flops, low-precision?) from its args and outputs: the Triton
# backend's launches (fills of zeroed outputs included, casts of fp32 accumulators back).
def _c_linear_sample_tokens(args, out):
    return 2, _linear_flops(args[0], args[1]), _half(args[0])  # zeros(tokens) + the kernel


def _c_linear_token_logprobs(args, out):
    return 1, _linear_flops(args[0], args[1]), _half(args[0])


def _c_linear_token_logprobs_backward(args, out):
    hidden, weight = args[4], args[5]
    casts = sum(1 for t in _tensors(out) if t.dtype != torch.float32)
    # three zeroed fp32 accumulators, one kernel (logits recomputed, dh and dW), casts back
    return 3 + 1 + casts, 3 * _linear_flops(hidden, weight), _half(hidden)


def _c_simple(launches: int):
    return lambda args, out: (launches, 0, False)


CUSTOM_LAUNCHES = {
    "linear_sample_tokens": _c_linear_sample_tokens,
    "linear_token_logprobs": _c_linear_token_logprobs,
    "linear_token_logprobs_backward": _c_linear_token_logprobs_backward,
    "sample_tokens": _c_simple(2),  # zeros(tokens) + the kernel
    "token_logprobs": _c_simple(1),
    "token_logprobs_backward": _c_simple(1),
    "weighted_token_nll": _c_simple(1),
    "daps_weights": _c_simple(1),
    "solve_eta": _c_simple(2),  # full(eta_max) + the kernel
    "decode_attention": _c_simple(1),
    "add_layer_norm": _c_simple(1),  # and embed_add_layer_norm
    "linear_add_layer_norm": lambda args, out: (
        1, 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[0], _half(args[0])),
}

SDPA_FWD = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
SDPA_BWD = {name + "_backward" for name in SDPA_FWD}


@dataclass
class OpCost:
    launches: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    half: bool = True  # matmul FLOPs at the bf16 rate (else fp32)
    k: int | None = None  # a cuBLAS matmul's contraction dim (its efficiency class)


@dataclass
class PhaseTotals:
    launches: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    ms_eager: float = 0.0
    ms_graphed: float = 0.0
    ms_bytes: float = 0.0
    ops: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def op_cost(func, args, kwargs, out, position: int | None) -> OpCost:
    """Launches, FLOPs and bytes of one dispatched op (see the module docstring)."""
    packet = func._overloadpacket
    name = packet.__name__
    ns = func.namespace
    if name in ZERO_LAUNCH:
        return OpCost()
    ins, outs = _tensors((args, kwargs)), _tensors(out)
    in_ids = {id(t) for t in ins}
    nbytes = sum(footprint(t) for t in ins) + sum(footprint(t) for t in outs
                                                 if id(t) not in in_ids)
    if name == "copy_":  # the destination is written, not read
        nbytes = footprint(args[1]) + footprint(args[0])
    if ns == "dvae_kernels":
        cost = CUSTOM_LAUNCHES.get(name)
        if cost is None:
            raise KeyError(f"bench.gpu_model has no launch count for {ns}::{name}; add it to "
                           f"CUSTOM_LAUNCHES")
        launches, flops, half = cost(args, out)
        if name == "decode_attention" and position is not None:
            q, kv_new, kv_cache = args[0], args[1], args[2]
            _, B, H, L, dh = kv_cache.shape
            slots = min(position + 1, L)  # reads slots 0..t-1, writes slot t
            nbytes = (2 * footprint(q) + 2 * footprint(kv_new)
                      + 2 * B * H * slots * dh * kv_cache.element_size())
            flops, half = 4 * B * H * slots * dh, _half(q)
        return OpCost(launches, flops, nbytes, half)
    if name.startswith("_foreach_") or name.startswith("_fused_"):
        lists = [a for a in args if isinstance(a, (list, tuple)) and a
                 and isinstance(a[0], torch.Tensor)]
        if not name.endswith("_") and outs:  # out of place: the result list is one more
            lists.append(outs)
        launches = _mta_launches(lists) + (1 if name == "_foreach_norm" else 0)
        return OpCost(launches, 0.0, nbytes, True)
    if name in ("cat", "stack"):  # CUDA batches up to 128 inputs per launch
        return OpCost(max(1, math.ceil(len(_tensors(args[0])) / 128)), 0.0, nbytes, True)
    if name in SDPA_FWD:
        q, k, v = args[:3]
        flops = flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape)
        causal = kwargs.get("is_causal", args[4] if len(args) > 4 and name.endswith("cpu")
                            else False)
        return OpCost(1, flops / 2 if causal is True else flops, nbytes, _half(q))
    if name in SDPA_BWD:
        g, q, k, v = args[:4]
        flops = flop_counter.sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)
        return OpCost(3, flops, nbytes, _half(q))
    if name == "convolution_backward":
        mask = args[-1] if isinstance(args[-1], (list, tuple)) else [True, True, True]
        launches = max(1, sum(1 for m in mask if m))
        flops = flop_counter.flop_registry[packet](*args, out_val=out, **kwargs)
        return OpCost(launches, flops, nbytes, _half(args[0]))
    flops = 0
    if name == "_addmm_activation":  # addmm with a cuBLASLt ReLU/GELU epilogue
        m, k = args[1].shape
        flops = 2 * m * k * args[2].shape[1]
    elif packet in flop_counter.flop_registry:
        flops = flop_counter.flop_registry[packet](*args, out_val=out, **kwargs)
    half = _half(ins[0]) if ins else True
    k = None
    if name in ("mm", "bmm"):
        k = args[0].shape[-1]
    elif name in ("addmm", "_addmm_activation"):
        k = args[1].shape[-1]
    return OpCost(1, flops, nbytes, half, k)


class Recorder(TorchDispatchMode):
    """Records the cost of every op dispatched under it, per phase; also counts the sampled
    positions (one ``linear_sample_tokens`` each: the trace forces the fused sampler) so that
    per-position figures can be read."""

    def __init__(self):
        super().__init__()
        self.phase = "other"
        self.costs: dict[str, list[OpCost]] = defaultdict(list)
        self.op_names: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.positions = 0
        self.loop_launches = 0  # sample-phase launches
        self.marks: list[int] = []  # loop_launches when each position ended
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.host_reads += 1
        # the position being sampled: how many tokens were drawn before this op
        position = self.positions if self.phase == "sample" else None
        cost = op_cost(func, args, kwargs, out, position)
        self.costs[self.phase].append(cost)
        if cost.launches:
            self.op_names[self.phase][f"{func.namespace}::{name}"] += cost.launches
        if self.phase == "sample":
            self.loop_launches += cost.launches
            if name == "linear_sample_tokens":  # the last op of each position
                self.positions += 1
                self.marks.append(self.loop_launches)
        return out

    def launches_per_position(self) -> float:
        """Steady-state sampler launches per position: between the ends of the first and the
        last positions (each ends with its ``linear_sample_tokens``), over the positions in
        between; the first position also pays the encoder, the cache allocation and autocast's
        one-time casts of the weights, which later positions reuse."""
        if self.positions >= 2:
            return (self.marks[-1] - self.marks[0]) / (self.positions - 1)
        return float(self.loop_launches)


class _PhaseHooks:
    """Stands in for :class:`dvae.profiling.Phases`: ``with hooks(name)`` sets the phase the
    recorder attributes ops to."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.timed = False
        self.times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        old, self.recorder.phase = self.recorder.phase, name
        try:
            yield
        finally:
            self.recorder.phase = old


@contextlib.contextmanager
def _cuda_like_dispatch() -> Iterator[None]:
    """Make dvae_kernels treat the fake CPU tensors of the trace as CUDA ones would be: it
    picks its Triton backend (the custom ops run their fake implementations, so no kernel
    runs), and a 0-d tensor argument (eta) is not read on the host (dvae_kernels reads the
    value of CPU scalars only, to check it; on CUDA it stays on the device)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from dvae_kernels import _dispatch, _validate

    original_scalar = _validate.scalar

    def scalar(name, value, device, **kw):
        if isinstance(value, FakeTensor):
            return value.to(device=device, dtype=torch.float32)
        return original_scalar(name, value, device, **kw)

    _validate.scalar = scalar
    try:
        with _dispatch.as_if_cuda():
            yield
    finally:
        _validate.scalar = original_scalar


def trace_step(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recorder, object]:
    """Trace one steady-state training step of ``preset`` (with ``key=value`` overrides) on
    fake tensors with the CUDA path's settings; returns the recorder and the config."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dvae.config import load_config
    from dvae.models import build_model
    from dvae.train_step import TrainStep

    cfg = load_config(preset, ["dataset=synthetic", "fused_linear=always",
                               "kernel_backend=triton", *overrides])
    recorder = Recorder()
    hooks = _PhaseHooks(recorder)
    with _cuda_like_dispatch(), FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(cfg)
        step = TrainStep(model, cfg, phases=hooks)
        step.use_amp = cfg.amp  # the CUDA path: bf16 autocast (here the CPU lists)
        if step.clipper is not None:
            step.clipper.grouped = True  # what AdaptiveClip picks on CUDA
        if cfg.amp:
            step.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        x = torch.rand(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
        # Warm-up: creates the optimizer's state. Its tokens need not be sampled (the trace
        # is of the next step), so the KV-cache loop is skipped here.
        encoder = model.encoder
        real_sample = encoder.sample

        def random_tokens(memory, num_samples, **_):
            shape = (memory.shape[0], num_samples, encoder.latent_len)
            return (torch.randint(0, encoder.vocab_size, shape),
                    torch.zeros(shape, dtype=torch.float32))

        encoder.sample = random_tokens
        try:
            step(x, 0)
        finally:
            encoder.sample = real_sample
        with recorder:
            step(x, 1)
    return recorder, cfg


def summarise(recorder: Recorder, cfg, gpu: GPU) -> dict:
    """Price the recorded ops on ``gpu``; the ``--json`` document."""
    phases: dict[str, PhaseTotals] = {}
    for name in PHASES:
        tot = PhaseTotals()
        for c in recorder.costs.get(name, []):
            if not c.launches:
                continue
            rate = (gpu.bf16_tflops if c.half else gpu.fp32_tflops) * 1e12 * gpu.efficiency(c.k)
            t_flops = c.flops / rate
            t_bytes = c.bytes / (gpu.copy_tbps * 1e12)
            tot.launches += c.launches
            tot.flops += c.flops
            tot.bytes += c.bytes
            floor_e = c.launches * gpu.launch_us_eager * 1e-6
            floor_g = c.launches * gpu.launch_us_graphed * 1e-6
            tot.ms_eager += 1e3 * max(floor_e, t_flops, t_bytes)
            tot.ms_graphed += 1e3 * max(floor_g, t_flops, t_bytes)
            tot.ms_bytes += 1e3 * t_bytes
        phases[name] = tot
    total_e = sum(p.ms_eager for p in phases.values())
    total_g = sum(p.ms_graphed for p in phases.values())
    sampler_graphed = total_e - phases["sample"].ms_eager + phases["sample"].ms_graphed
    launches = sum(p.launches for p in phases.values())
    per_pos = recorder.launches_per_position()
    hours = {k: v * cfg.steps / 3.6e6 for k, v in (("eager", total_e), ("graphed", total_g),
                                                   ("sampler_graphed", sampler_graphed))}
    return {
        "preset": cfg.preset,
        "gpu": gpu.name,
        "gpu_constants": asdict(gpu),
        "config": {k: getattr(cfg, k) for k in ("batch_size", "num_samples", "latent_len",
                                                 "vocab_size", "d_model", "dec_layers",
                                                 "enc_layers", "steps", "amp")},
        "phases": {name: {"launches": p.launches, "gflop": p.flops / 1e9,
                          "gbytes": p.bytes / 1e9, "ms_eager": p.ms_eager,
                          "ms_graphed": p.ms_graphed, "ms_bytes_bound": p.ms_bytes,
                          "top_ops": dict(sorted(recorder.op_names[name].items(),
                                                 key=lambda kv: -kv[1])[:12])}
                   for name, p in phases.items()},
        "total_ms_eager": total_e,
        "total_ms_graphed": total_g,
        "total_ms_sampler_graphed": sampler_graphed,
        "total_ms_bytes_bound": sum(p.ms_bytes for p in phases.values()),
        "launches_per_step": launches,
        "sampler_launches_per_position": per_pos,
        "sampled_positions": recorder.positions,
        "host_reads": recorder.host_reads,
        "gpu_hours": hours["eager"],
        "gpu_hours_graphed": hours["graphed"],
        "gpu_hours_sampler_graphed": hours["sampler_graphed"],
    }


def format_report(doc: dict) -> str:
    lines = [f"{doc['preset']} on {doc['gpu']} (predicted; {doc['gpu_constants']['source']})",
             f"{'phase':<15}{'launches':>10}{'GFLOP':>10}{'GB':>9}{'ms eager':>10}"
             f"{'ms graphed':>12}{'ms bytes':>10}"]
    for name, p in doc["phases"].items():
        lines.append(f"{name:<15}{p['launches']:>10,}{p['gflop']:>10,.1f}{p['gbytes']:>9,.2f}"
                     f"{p['ms_eager']:>10.2f}{p['ms_graphed']:>12.2f}"
                     f"{p['ms_bytes_bound']:>10.2f}")
    total_l = doc["launches_per_step"]
    gflop = sum(p["gflop"] for p in doc["phases"].values())
    gb = sum(p["gbytes"] for p in doc["phases"].values())
    lines.append(f"{'step':<15}{total_l:>10,}{gflop:>10,.1f}{gb:>9,.2f}"
                 f"{doc['total_ms_eager']:>10.2f}{doc['total_ms_graphed']:>12.2f}"
                 f"{doc['total_ms_bytes_bound']:>10.2f}")
    steps = doc["config"]["steps"]
    lines += [
        f"step with only the sampler graphed: {doc['total_ms_sampler_graphed']:.2f} ms",
        f"sampler launches per sampled position: {doc['sampler_launches_per_position']:.1f} "
        f"({doc['sampled_positions']} positions)",
        f"GPU-hours for {steps:,} steps: {doc['gpu_hours']:.1f} eager, "
        f"{doc['gpu_hours_sampler_graphed']:.1f} sampler graphed, "
        f"{doc['gpu_hours_graphed']:.1f} all graphed",
    ]
    return "\n".join(lines)


def load_calibration(path: str | Path, gpu: GPU) -> GPU:
    """``gpu`` with the constants a calibration JSON file gives (see the module docstring)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"--calibration: expected a JSON object, got {type(data).__name__}")
    known = ("copy_tbps", "bf16_tflops", "fp32_tflops", "launch_us_eager", "launch_us_graphed")
    unknown = sorted(set(data) - set(known) - {"name", "source", "device",
                                                "matmul_efficiency"})
    if unknown:
        raise ValueError(f"--calibration: unknown keys {unknown}; expected some of {known}")
    values = {}
    for key in known:
        if key in data:
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"--calibration: {key} must be a positive number, got {v!r}")
            values[key] = float(v)
    source = data.get("source", f"calibrated from {path}")
    eff = data.get("matmul_efficiency") or {}
    bad = {k: v for k, v in eff.items() if k not in dict(MATMUL_CLASSES)
           or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1.5}
    if bad:
        raise ValueError(f"--calibration: matmul_efficiency must map {list(dict(MATMUL_CLASSES))} "
                         f"to fractions, got {bad}")
    if eff:
        values["matmul_efficiency"] = tuple(sorted((k, float(v)) for k, v in eff.items()))
    return replace(gpu, name=data.get("name", gpu.name), source=source, **values)


def measure_calibration() -> dict:
    """Measure the constants on this machine's GPU (CUDA only)."""
    if not torch.cuda.is_available():
        raise RuntimeError("--measure needs a CUDA device (torch.cuda.is_available() is False)")
    dev = torch.device("cuda")

    def timed(fn, reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    src = torch.empty(2 ** 29, dtype=torch.int16, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 20)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    mm_s = timed(lambda: a @ a, 20)
    af = a.float()
    mmf_s = timed(lambda: af @ af, 5)
    tiny = torch.zeros(1, device=dev)
    eager_s = timed(lambda: tiny.add_(1), 2000)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        tiny.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        for _ in range(1000):
            tiny.add_(1)
    graphed_s = timed(graph.replay, 20) / 1000
    # one product per shape class (MATMUL_CLASSES), against the large square one
    eff = {}
    for cls, (m, k, n) in (("k<=128", (262144, 128, 1024)), ("k<=512", (65536, 512, 2048))):
        x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        y = torch.randn(k, n, dtype=torch.bfloat16, device=dev)
        eff[cls] = (2 * m * k * n / timed(lambda x=x, y=y: x @ y, 20)) / (2 * 8192 ** 3 / mm_s)
    eff["k>512"] = 1.0
    return {"name": torch.cuda.get_device_name(dev),
            "source": "measured by python -m bench.gpu_model --measure",
            "copy_tbps": 2 * src.numel() * 2 / copy_s / 1e12,
            "bf16_tflops": 2 * 8192 ** 3 / mm_s / 1e12,
            "fp32_tflops": 2 * 8192 ** 3 / mmf_s / 1e12,
            "launch_us_eager": eager_s * 1e6, "launch_us_graphed": graphed_s * 1e6,
            "matmul_efficiency": eff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="imagenet256",
                        help="digits, mnist, cifar10 or imagenet256 (or a YAML config file)")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--json", metavar="FILE", help="write the prediction as JSON")
    parser.add_argument("--calibration", metavar="FILE",
                        help="JSON with measured constants (see --measure)")
    parser.add_argument("--measure", metavar="FILE",
                        help="measure the constants on this machine's GPU, write them, exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dvae config overrides (batch_size=32, latent_len=256, ...)")
    args = parser.parse_args(argv)
    if args.measure:
        data = measure_calibration()
        Path(args.measure).write_text(json.dumps(data, indent=1) + "\n")
        print(json.dumps(data, indent=1))
        return 0
    gpu = GPUS[args.gpu]
    if args.calibration:
        gpu = load_calibration(args.calibration, gpu)
    t0 = time.perf_counter()
    recorder, cfg = trace_step(args.preset, args.overrides)
    doc = summarise(recorder, cfg, gpu)
    doc["overrides"] = list(args.overrides)
    doc["trace_seconds"] = time.perf_counter() - t0
    print(format_report(doc))
    print(f"(traced in {doc['trace_seconds']:.0f} s on fake tensors)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
