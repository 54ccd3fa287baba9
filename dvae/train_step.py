"""One training step, shared by the trainer and the benchmark API: the method's objective
(:mod:`dvae.objectives`) and the optimisation every method shares. For DAPS (docs/algorithm.md):

    sample          K sequences per image from q_θ (KV cache, no gradient)
    reward          decoder forward: log p_φ(x|z) for each sample
    teacher_forced  causal pass over the samples: hidden states, log q, entropies
    weights         η (learned or solved), DAPS weights and ESS
    losses          encoder, decoder and η losses; backward
    optimizer       non-finite check, adaptive clipping, AdamW steps

The baselines use "sample" (encode and sample or quantise), "reward" (decoder), "losses" and
"optimizer". The step never reads a device value back to the host; its metrics are tensors.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

import dvae_kernels

from . import host_memory, optim
from .objectives import make_objective
from .profiling import Phases


def unwrap(model: nn.Module) -> nn.Module:
    """The autoencoder inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class GraphedSampler:
    """``fn(x) -> tensor or tuple of tensors`` (the whole sampling loop: the tokens and their
    log q) captured as one CUDA graph per input shape.

    Static buffers: the graph reads the images from a buffer that each call copies into, and
    its tokens come out in a buffer it owns (a call returns a copy). The weights are read in
    place, so optimizer updates between calls are seen.

    The random stream: torch's CUDA generators are graph-safe. Inside a captured graph a
    Philox draw reads its seed and offset from device memory, and every replay first advances
    the generator's offset by the numbers the graph draws, so each replay draws fresh numbers
    and the generator's state (what a checkpoint saves) after n replays is the state after n
    eager calls' worth of draws: a run resumed from it redraws the same tokens. A non-default
    generator is registered with the graph (``register_generator_state``). The warm-up call
    before capture (cuBLAS and Triton initialisation) runs with the generator's state saved
    and restored, so it draws nothing from the stream.

    Args:
        fn: the loop to capture; it must not synchronise with the host.
        generator: the sampling stream (None: the device's default generator).
        capture: the capture context (``torch.cuda.graph``); a parameter for the tests.
        make_graph: the graph constructor (``torch.cuda.CUDAGraph``); likewise.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor],
                 generator: torch.Generator | None = None, *, capture=None, make_graph=None):
        self.fn = fn
        self.generator = generator
        self.capture = capture or torch.cuda.graph
        self.make_graph = make_graph or torch.cuda.CUDAGraph
        self.graphs: dict[tuple, tuple] = {}

    def _warmup(self, x: torch.Tensor) -> None:
        """One eager call that leaves the random stream where it was."""
        state = self.generator.get_state() if self.generator is not None else None
        default = None
        if self.generator is None and x.device.type == "cuda":
            default = torch.cuda.get_rng_state(x.device)
        try:
            if x.device.type == "cuda":
                side = torch.cuda.Stream(x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    self.fn(x)
                torch.cuda.current_stream(x.device).wait_stream(side)
            else:
                self.fn(x)
        finally:
            if state is not None:
                self.generator.set_state(state)
            if default is not None:
                torch.cuda.set_rng_state(default, x.device)

    def _build(self, x: torch.Tensor) -> tuple:
        static_x = x.detach().clone()
        self._warmup(static_x)
        graph = self.make_graph()
        if self.generator is not None and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self.generator)
        with self.capture(graph):
            static_out = self.fn(static_x)
        return graph, static_x, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            self.graphs[key] = self._build(x)
        graph, static_x, static_out = self.graphs[key]
        static_x.copy_(x)
        graph.replay()
        if isinstance(static_out, tuple):
            return tuple(t.clone() for t in static_out)
        return static_out.clone()


class TrainStep:
    """Callable ``step(x, step_index) -> metrics`` (0-d tensors) for any method.

    Args:
        model: the autoencoder :func:`dvae.models.build_model` made for ``cfg.method``,
            possibly wrapped by DDP (its forward is the differentiable part) and/or
            ``torch.compile``.
        cfg: the run's :class:`dvae.config.Config`.
        generator: the sampling random stream (checkpointed).
        phases: NVTX ranges and optional timers.
    """

    def __init__(self, model: nn.Module, cfg, *, generator: torch.Generator | None = None,
                 phases: Phases | None = None, distributed: bool = False):
        self.model = model
        self.raw = unwrap(model)
        self.compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        self.cfg = cfg
        self.generator = generator
        device = next(self.raw.parameters()).device
        self.device = device
        if device.type == "cpu":  # the step's large tensors reuse freed heap (host_memory)
            host_memory.keep_freed_memory()
        self.phases = phases or Phases(False, device)
        self.distributed = distributed
        learned_eta = cfg.method in ("daps", "daps_na") and cfg.eta_mode == "learned"
        net_params = [p for n, p in self.raw.named_parameters() if n != "log_eta"]
        self.net_params = net_params
        self.optimizer = optim.make_adamw(net_params, cfg.lr, cfg.weight_decay)
        self.eta_optimizer = (optim.make_adamw([self.raw.log_eta], cfg.eta_lr, cfg.weight_decay)
                              if learned_eta else None)
        clip_dims = optim.unit_reduce_dims(self.raw)
        if hasattr(self.raw, "clip_dims"):  # a model's own units (VQ-VAE's codebook)
            clip_dims.update(self.raw.clip_dims())
        self.clip_dims = {p: clip_dims[p] for p in net_params}
        # all gradients clipped in a fixed number of kernels (index maps built once)
        self.clipper = optim.AdaptiveClip(self.clip_dims, cfg.clip) if cfg.clip > 0 else None
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        self.use_amp = cfg.amp and device.type == "cuda"
        self.fused = (cfg.fused_linear == "always"
                      or (cfg.fused_linear == "auto" and device.type == "cuda"))
        mode = cfg.sampler_graph
        if mode == "on" and device.type != "cuda":
            raise ValueError(f"sampler_graph='on' needs a CUDA device, the model is on {device}")
        # captured only on CUDA; None: the eager loop
        self.graphed: GraphedSampler | None = None
        self.graph_mode = mode if device.type == "cuda" and torch.cuda.is_available() else "off"
        self.objective = make_objective(self)

    def autocast(self):
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fp32(self):
        """The precision of the encoder's output layer (sampling, log q): autocast off with
        ``fp32_outputs`` (the default), float32 as in the reference, so that the proposal and
        the q in the weights are the same numbers up to the bodies' rounding; else the step's
        autocast."""
        if self.use_amp and self.cfg.fp32_outputs:
            return torch.autocast(self.device.type, enabled=False)
        return self.autocast()

    def lr(self, step: int) -> float:
        """This step's learning rate: constant, or the reference's cosine decay to 0.1·lr
        over ``steps`` (optax ``cosine_decay_schedule(alpha=0.1)``)."""
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        frac = min(max(step, 0) / max(self.cfg.steps, 1), 1.0)
        return self.cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def sampler(self):
        """The per-position sampler the KV-cache loop calls, drawing from the counter-based
        stream every dvae_kernels backend shares (so paths and devices draw the same tokens
        for a seed, up to the logits' rounding): ``linear_sample_tokens`` on the fused path and
        on a CPU (whose backend is the logits path itself: an MKL matmul, then the C++ sampling
        kernel, which adds the bias as it reads each row); on the logits path on a GPU, the
        head's logits, then ``sample_tokens``. With ``kernel_backend=torch`` (the plain-PyTorch
        baseline) off the fused path: the encoder's own Gumbel-max over ``torch.rand``."""
        head = self.raw.encoder.head
        backend = self.cfg.kernel_backend
        if not self.fused and backend == "torch":
            return None
        if not self.fused and self.device.type != "cpu":

            def sample_logits(h, g):
                with self.fp32():
                    logits = head(h.float() if self.cfg.fp32_outputs else h)
                return dvae_kernels.sample_tokens(logits, generator=g, backend=backend)
            return sample_logits
        # With fp32_outputs the head runs in float32 (autocast off), as in the reference, on
        # the float32 output of the final LayerNorm: the proposal is the q in the weights.
        # Otherwise in the autocast dtype, its weight and bias cast here once per step, not
        # at every position.
        weight, bias = head.weight.detach(), head.bias.detach()
        dev = weight.device.type
        if not self.cfg.fp32_outputs and torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
            weight, bias = weight.to(dtype), bias.to(dtype)

        def sample(h, g):
            with self.fp32():
                return dvae_kernels.linear_sample_tokens(
                    h.float() if self.cfg.fp32_outputs else h, weight, bias, generator=g,
                    backend=backend)
        return sample

    def _sample_eager(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling loop: K token sequences per image, ``[N, K, L]``, and the log q of
        each drawn token (float32). Its autocast region is entered here, inside what a graph
        captures, so autocast's cache of cast weights lives and dies within one call (within
        one replay when captured)."""
        with self.autocast():
            return self.raw.sample(x, self.cfg.num_samples, generator=self.generator,
                                   sampler=self.sampler())

    def sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's samples ``[N, K, L]`` and their per-token log q: from the captured graph
        when ``sampler_graph`` allows it (on CUDA), else from the eager loop. ``auto`` falls
        back to eager, with one warning, when capture fails."""
        if self.graph_mode == "off":
            return self._sample_eager(x)
        if self.graphed is None:
            self.graphed = GraphedSampler(self._sample_eager, self.generator)
        try:
            return self.graphed(x)
        except Exception as err:
            if self.graph_mode == "on":
                raise
            warnings.warn(f"sampler_graph=auto: capturing the sampling loop failed "
                          f"({type(err).__name__}: {err}); sampling eagerly", stacklevel=2)
            self.graph_mode = "off"
            self.graphed = None
            return self._sample_eager(x)

    def gather_rows(self, rewards: torch.Tensor, logq: torch.Tensor):
        """``(rewards, logq)`` of the global batch, rank-major (the order a single process
        sees them in), and the slice of this rank's rows; the local tensors on one process."""
        if not self.distributed:
            return rewards, logq, slice(None)
        dist = torch.distributed
        world, rank = dist.get_world_size(), dist.get_rank()
        both = torch.stack([rewards, logq.to(rewards.dtype)])
        parts = [torch.empty_like(both) for _ in range(world)]
        dist.all_gather(parts, both.contiguous())
        full = torch.cat(parts, dim=1)
        n = rewards.shape[0]
        return full[0], full[1], slice(rank * n, (rank + 1) * n)

    def __call__(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        # The tokens are the step's own samples, in [0, V) by construction: the ops need not
        # read them back to check (that would be a host sync per call on CUDA).
        with dvae_kernels.no_value_checks():
            return self._step(x, step)

    def _step(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        raw, ph = self.raw, self.phases
        raw.train()
        metrics = self.objective(x, step)  # every phase up to the losses and their backward
        with ph("optimizer"):
            params = self.net_params + ([raw.log_eta] if self.eta_optimizer else [])
            found_inf = optim.nonfinite_flag(params, metrics["loss"])
            if self.distributed:
                torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
            if self.clipper is not None:
                self.clipper()
            if self.cfg.lr_schedule != "constant":
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr(step)
            optim.step_unless_nonfinite(self.optimizer, found_inf)
            if self.eta_optimizer is not None:
                optim.step_unless_nonfinite(self.eta_optimizer, found_inf)
            self.objective.after_update(found_inf)
            self.optimizer.zero_grad(set_to_none=True)
            if self.eta_optimizer is not None:
                self.eta_optimizer.zero_grad(set_to_none=True)
            self.skipped += found_inf
        metrics["skipped"] = found_inf
        return metrics
