"""The training loop: data, model, DAPS steps, logging, evaluation, checkpoints.

Distributed training uses ``torchrun`` (DDP; NCCL on CUDA, gloo on CPU). ``batch_size`` is the
global batch: each of the W ranks draws its own batch_size/W rows of it and its own samples;
the DAPS weights, mean ESS and η are computed over the global batch (the [N, K] rewards and log
q are all-gathered), so a W-rank step is the 1-rank step of the same batch and samples, up to
float rounding; gradients are averaged by DDP. BatchNorm statistics (ResNet decoders) are per
rank, over its batch_size/W images. Rank 0 logs, evaluates and writes checkpoints. Outputs in
``cfg.out_dir``:

    metrics.jsonl        one JSON object per logging interval / evaluation
    tb/                  TensorBoard scalars
    reconstructions.png  originals (top) above their reconstructions (bottom), test images
    checkpoint.pt        the latest checkpoint (atomic, checksummed); ``--resume`` continues it
    .dvae.lock           held while a run is alive (one run per out_dir)
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dvae_kernels.info import machine

from . import checkpoint as ckpt
from .config import RUN_CONTROL_KEYS, Config, changed_keys
from .data import Batches, BatchStream, Preprocess, load_datasets, pixel_stats
from .device import check_kernel_backend, pick_device
from .evaluate import evaluate
from .models import build_model
from .profiling import Phases
from .rundir import RunDir
from .train_step import TrainStep

# The paper's optax.apply_if_finite(100): so many non-finite steps in a row end the run.
MAX_CONSECUTIVE_SKIPS = 100


class _Window:
    """Sums of each metric over the steps of a logging window that trained (a skipped step's
    loss is not finite and would turn an average into NaN), kept on the device."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.trained = torch.zeros((), device=device)
        self.count = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], bad: torch.Tensor) -> None:
        ok = 1.0 - bad
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + torch.where(ok > 0, v.float(), 0.0)
        self.trained = self.trained + ok
        self.count += 1

    def read(self) -> dict[str, float]:
        """Averages over the steps that trained (None when none did), the skipped count and
        the wall-clock ms per step (this reads the device: call it at log time)."""
        n_ok = int(self.trained.item())
        out = {k: ((v / n_ok).item() if n_ok else None) for k, v in self.sums.items()}
        out["skipped_in_window"] = self.count - n_ok
        out["ms_per_step"] = 1000 * (time.perf_counter() - self.t0) / max(self.count, 1)
        return out


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run finished its step and saved its checkpoint."""

    def __init__(self, signum: int, step: int, path):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}; checkpoint saved to {path} "
                         "(continue with --resume)")


class TrainingDiverged(ValueError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class RunLoop:
    """What every dvae training run shares, whatever it trains (the autoencoder here, the
    generation prior in :mod:`dvae.prior.train`): the device and torchrun processes, the
    out_dir's ownership (:class:`dvae.rundir.RunDir`), the checkpoint's common fields (step,
    wall-clock, data position, skipped steps, every random stream), metrics.jsonl and
    TensorBoard, SIGINT/SIGTERM, the non-finite-step limit and the loop with its progress bar.

    A subclass builds its parts in ``_build`` (calling :meth:`_setup_process` first and
    :meth:`_begin` last) and provides ``_train_one``, ``evaluate``, ``state``/``load`` (around
    :meth:`_common_state`/:meth:`_load_common`) and ``skipped``: a 0-d tensor counting the
    steps skipped as non-finite.
    """

    postfix_keys: tuple[str, ...] = ("loss",)  # shown beside the progress bar

    def __init__(self, cfg, *, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(cfg.device, local_rank)
        self._check(cfg, self.device)
        self.rundir = None
        if int(os.environ.get("RANK", "0")) == 0:
            # Before any work: the folder is writable, ours alone, and holds no other run.
            self.rundir = RunDir(cfg.out_dir)
            try:
                self.rundir.claim(resume=resume, overwrite=overwrite)
            except BaseException:
                self.rundir.release()
                raise
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _check(self, cfg, device: torch.device) -> None:
        """Refuse a configuration that cannot run on ``device``, before any work."""

    def _desc(self) -> str:
        return "dvae train"

    def _build(self, cfg, resume: bool) -> None:
        raise NotImplementedError

    def _setup_process(self, cfg) -> None:
        """Threads, the process group, rank and world, the out_dir paths."""
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size is the global batch and must divide among the "
                             f"{self.world} processes; got batch_size={cfg.batch_size}")

    def _begin(self, resume: bool, description: dict, stream) -> None:
        """Resume from the checkpoint if asked (and there is one), cut the outputs back to
        its step, and head a new run's metrics with ``description`` (``dvae compare`` reads
        it). ``stream``: the run's :class:`dvae.data.BatchStream`."""
        self.stream = stream
        self.step = 0
        self.train_seconds = 0.0
        self.batches_consumed = 0
        self.files_skipped = 0
        self._writer = None
        self.start_step = 0
        if resume and self.ckpt_path.is_file():
            self.load(self.ckpt_path)
            self.start_step = self.step
        if self.rundir is not None:
            self.rundir.cut_back(self.step)
            if self.step == 0:
                self._log({"split": "config", "step": 0, **description,
                           "machine": machine(), "config": self.cfg.to_dict()})
        self.last_eval: dict[str, float] = {}
        self._stop_signal: int | None = None
        self._consecutive = torch.zeros((), device=self.device)
        self._max_consecutive = torch.zeros((), device=self.device)

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def skipped(self) -> torch.Tensor:
        raise NotImplementedError

    def _common_state(self) -> dict:
        """The checkpoint fields every run has (collective in DDP: the generators)."""
        gen_states = [self.generator.get_state()]
        if self.distributed:
            gen_states = [None] * self.world
            dist.all_gather_object(gen_states, self.generator.get_state())
        return {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "batches_consumed": self.batches_consumed,
            "skipped_steps": self.skipped.cpu(),
            "files_skipped": self.files_skipped,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": (torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                         else None),
            "generators": [s.cpu() for s in gen_states],
        }

    def save(self) -> None:
        state = self.state()  # collective in DDP: every rank must call save()
        if self.rank == 0:
            ckpt.save_atomic(state, self.ckpt_path)
        if self.distributed:
            dist.barrier()

    def _check_resumable(self, path, state: dict, run_control_keys) -> None:
        saved = state["config"]
        refused = changed_keys(saved, self.cfg.to_dict(), run_control_keys,
                               defaults=type(self.cfg))
        if refused:
            listing = ", ".join(f"{k}={getattr(self.cfg, k)!r} (checkpoint: {saved.get(k)!r})"
                                for k in refused)
            raise ValueError(f"cannot resume {path}: the configuration differs in keys that "
                             f"change the result: {listing}")
        if int(state["step"]) > self.cfg.steps:
            raise ValueError(f"cannot resume {path}: it is at step {int(state['step'])}, past "
                             f"steps={self.cfg.steps}; give steps >= {int(state['step'])}")

    def _load_state_dict(self, module: nn.Module, weights: dict, path) -> None:
        try:
            module.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {str(path)!r}: its weights do not fit the model its "
                             f"config describes: {str(err).splitlines()[0]}") from None

    def _load_common(self, state: dict) -> None:
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.batches_consumed = int(state["batches_consumed"])
        self.stream.seek(self.batches_consumed)
        self.skipped.copy_(state["skipped_steps"])
        self.files_skipped = int(state["files_skipped"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        gens = state["generators"]
        if len(gens) != self.world:
            warnings.warn(f"checkpoint has {len(gens)} sampling streams, this run has "
                          f"{self.world} ranks: streams are re-derived, not resumed",
                          stacklevel=2)
            self.generator.manual_seed(self.cfg.seed * 7919 + 17 + self.rank + self.step)
        else:
            self.generator.set_state(gens[self.rank].to(self.generator.get_state().device))

    # -- logging -------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.cfg.tensorboard:
            if self._writer is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    # purge_step drops events a killed run wrote after its last checkpoint
                    self._writer = SummaryWriter(str(self.out_dir / "tb"),
                                                 purge_step=self.start_step + 1)
                except Exception as err:  # tensorboard missing or broken: keep training
                    warnings.warn(f"TensorBoard disabled: {err}", stacklevel=2)
                    self.cfg.tensorboard = False
                    return
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time") \
                        and not isinstance(v, bool):
                    self._writer.add_scalar(f"{split}/{k}", v, record["step"])
            self._writer.flush()

    # -- the loop ------------------------------------------------------------------------------

    def run(self, until: int | None = None, *, time_budget: float | None = None
            ) -> dict[str, float]:
        """Train up to step ``until`` (default: ``cfg.steps``), or until the run's training
        wall-clock (``train_seconds``, carried across resumes; evaluations and checkpoints
        not counted) reaches ``time_budget`` seconds; then log, evaluate and save. Returns
        the last logged training metrics, and evaluation metrics under ``test_*`` when an
        evaluation ran.

        SIGINT and SIGTERM let the current step finish, save the checkpoint and raise
        :class:`Interrupted`. :data:`MAX_CONSECUTIVE_SKIPS` non-finite steps in a row raise
        :class:`TrainingDiverged` at the next log interval (the loop reads device values only
        at log and evaluation intervals).
        """
        previous = self._install_signal_handlers()
        try:
            return self._run(until, time_budget)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now, unsaved
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        return previous

    def _stop_requested(self, collective: bool) -> bool:
        flag = self._stop_signal is not None
        if self.distributed and collective:
            t = torch.tensor([float(self._stop_signal or 0)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() > 0 and self._stop_signal is None:
                self._stop_signal = int(t.item())
            flag = t.item() > 0
        return flag and (not self.distributed or collective)

    def _record_step(self, window: _Window, metrics: dict[str, torch.Tensor],
                     bad: torch.Tensor, bar) -> None:
        """Count a finished step: its metrics into the window, ``bad`` (1.0: skipped as
        non-finite) into the run of consecutive skips, the step and the bar."""
        window.add(metrics, bad)
        self._consecutive = (self._consecutive + bad) * bad
        self._max_consecutive = torch.maximum(self._max_consecutive, self._consecutive)
        self.step += 1
        bar.update(1)

    #: training seconds between periodic evaluations (0: none); a subclass's config sets it
    eval_every_seconds = 0.0

    def _all_agree(self, flag: bool) -> bool:
        """True on every rank when it is true on any."""
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _check_diverged(self) -> None:
        worst = int(self._max_consecutive.item())
        if worst >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingDiverged(
                f"{worst} consecutive steps up to step {self.step} had a non-finite loss or "
                f"gradient (the limit is {MAX_CONSECUTIVE_SKIPS}); the run stopped. Check the "
                f"data for NaN/inf, or lower lr (now {self.cfg.lr})")

    def _run(self, until: int | None, time_budget: float | None = None) -> dict[str, float]:
        cfg = self.cfg
        end = cfg.steps if until is None else min(until, cfg.steps)
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=self.step, disable=not cfg.progress or self.rank != 0,
                   desc=self._desc(), dynamic_ncols=True)
        window = _Window(self.device)
        last: dict[str, float] = {}
        every_s = self.eval_every_seconds
        next_eval_at = (self.train_seconds // every_s + 1) * every_s if every_s > 0 else 0.0
        while self.step < end:
            t0 = time.perf_counter()
            self._train_one(window, bar)
            over = time_budget is not None and (
                self.train_seconds + time.perf_counter() - t0 >= time_budget)
            if self.distributed and time_budget is not None:
                # every rank stops together; agreed at log intervals only (a collective and a
                # host read per step would stall the device)
                over = self.step % cfg.log_every == 0 and self._all_agree(over)
            done = self.step == end or over
            log_now = self.step % cfg.log_every == 0 or done
            if log_now:
                # read at log intervals only: the loop never waits for the device otherwise
                self._check_diverged()
                last = window.read()
                last["skipped"] = int(self.skipped.item())
                last["files_skipped"] = self.files_skipped
                last["train_seconds"] = self.train_seconds + time.perf_counter() - t0
                self._log({"split": "train", "step": self.step, **last})
                if last.get("loss") is not None:
                    shown = {k: last[k] for k in self.postfix_keys
                             if last.get(k) is not None}
                    bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
                window = _Window(self.device)
            self.train_seconds += time.perf_counter() - t0
            evaluate_now = cfg.eval_every > 0 and self.step % cfg.eval_every == 0
            if every_s > 0:
                # by training wall-clock; under torchrun agreed at log intervals (a
                # collective per step would stall the device)
                due = self.train_seconds >= next_eval_at
                if self.distributed:
                    due = log_now and self._all_agree(due)
                if due:
                    evaluate_now = True
                    next_eval_at = (self.train_seconds // every_s + 1) * every_s
            final = done and (self.step == cfg.steps or over)
            if (evaluate_now or final) and self.rank == 0:
                bar.write(self._eval_message(self.evaluate(final=final)))
            if self.distributed and (evaluate_now or done):
                dist.barrier()
            stop = self._stop_requested(collective=log_now or done)
            if (cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0) or done or stop:
                self.save()
            if stop:
                bar.close()
                raise Interrupted(self._stop_signal, self.step, self.ckpt_path)
            if over:
                break
        bar.close()
        out = dict(last)
        out.update({f"test_{k}": v for k, v in self.last_eval.items()})
        return out

    def __enter__(self) -> RunLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Flush TensorBoard and release the out_dir lock (also on garbage collection)."""
        if getattr(self, "_writer", None) is not None:
            self._writer.close()
            self._writer = None
        if getattr(self, "rundir", None) is not None:
            self.rundir.release()
            self.rundir = None


class Trainer(RunLoop):
    """Trains an autoencoder from a :class:`Config`: builds everything, :meth:`run` trains
    (optionally only up to a step), :meth:`save` writes the checkpoint. ``resume=True``
    continues from ``out_dir/checkpoint.pt`` exactly: models, optimisers, η, step, RNG states
    and the data position."""

    postfix_keys = ("loss", "log_px", "ess_frac", "eta", "temperature")

    def _check(self, cfg: Config, device: torch.device) -> None:
        check_kernel_backend(cfg, device)

    def _desc(self) -> str:
        return f"dvae train ({self.cfg.method})"

    def _build(self, cfg: Config, resume: bool) -> None:
        self._setup_process(cfg)
        torch.manual_seed(cfg.seed)
        self.train_set, self.test_set = load_datasets(cfg)
        shift, scale = pixel_stats(self.train_set, cfg.channels, cfg.likelihood, cfg.dataset)
        self.preprocess = Preprocess(cfg.likelihood, shift, scale)
        self.model = build_model(cfg, shift, scale).to(self.device)
        fwd: nn.Module = self.model
        if self.distributed:
            fwd = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        if cfg.compile:
            fwd = torch.compile(fwd)
        self.generator = torch.Generator(device=self.device).manual_seed(
            cfg.seed * 7919 + 17 + self.rank)
        self.phases = Phases(False, self.device)
        self.step_fn = TrainStep(fwd, cfg, generator=self.generator, phases=self.phases,
                                     distributed=self.distributed)
        # batch_size is global: each of the world ranks takes its own batch_size/world rows
        stream = BatchStream(len(self.train_set), cfg.batch_size // self.world, cfg.seed,
                             self.rank, self.world)
        self._begin(resume, {"method": cfg.method, "bits_per_image": cfg.bits_per_image},
                    stream)
        self.batches = Batches(self.train_set, self.stream, cfg.num_workers)
        self._fid_net = None
        if cfg.fid and self.rank == 0:  # fail now, not at the first evaluation
            from .fid import inception

            self._fid_net = inception(cfg.fid_weights, self.device)

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def skipped(self) -> torch.Tensor:
        return self.step_fn.skipped

    def state(self) -> dict:
        return {
            **self._common_state(),
            "model": self.model.state_dict(),
            "optimizer": self.step_fn.optimizer.state_dict(),
            "eta_optimizer": (self.step_fn.eta_optimizer.state_dict()
                              if self.step_fn.eta_optimizer else None),
        }

    def load(self, path) -> None:
        state = ckpt.load(path, map_location="cpu")
        self._check_resumable(path, state, RUN_CONTROL_KEYS)
        self._load_state_dict(self.model, state["model"], path)
        self.step_fn.optimizer.load_state_dict(state["optimizer"])
        if self.step_fn.eta_optimizer is not None and state["eta_optimizer"] is not None:
            self.step_fn.eta_optimizer.load_state_dict(state["eta_optimizer"])
        self._load_common(state)

    @property
    def eval_every_seconds(self) -> float:
        return self.cfg.eval_every_seconds

    def evaluate(self, final: bool = True) -> dict[str, float]:
        """Test metrics, logged as a ``split: test`` record. A periodic evaluation
        (``final=False``) takes the first ``curve_samples`` test images, the same subset in
        every run (``eval: curve``: the points of ``dvae compare --curves``); the final one
        ``eval_samples`` (``eval: final``), after a last curve point when periodic
        evaluations are on and the two sizes differ."""
        cfg = self.cfg
        curve_n = cfg.curve_samples or cfg.eval_samples
        if not final:
            return self._evaluate(curve_n, "curve")
        periodic = cfg.eval_every > 0 or cfg.eval_every_seconds > 0
        total = len(self.test_set)
        if periodic and min(curve_n or total, total) != min(cfg.eval_samples or total, total):
            self._evaluate(curve_n, "curve")
        return self._evaluate(cfg.eval_samples, "final")

    def _evaluate(self, images: int, kind: str) -> dict[str, float]:
        if self.cfg.fid and self._fid_net is None:
            from .fid import inception

            self._fid_net = inception(self.cfg.fid_weights, self.device)
        t0 = time.perf_counter()
        res = evaluate(self.model, self.test_set, self.preprocess, self.cfg, self.device,
                       max_images=images or None,
                       grid_path=self.out_dir / "reconstructions.png", fid_net=self._fid_net)
        self.last_eval = res
        self._log({"split": "test", "step": self.step, "eval": kind,
                   "train_seconds": round(self.train_seconds, 3),
                   "eval_seconds": round(time.perf_counter() - t0, 3), **res})
        return res

    def _eval_message(self, res: dict) -> str:
        elbo = "" if res["beta_elbo"] is None else f", beta-ELBO {res['beta_elbo']:.2f}"
        return (f"step {self.step}: test PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.3f}"
                f"{elbo}, codebook {res['codebook_usage']:.2f}")

    def _train_one(self, window: _Window, bar) -> None:
        """One iteration of the training loop, without its periodic work (logs, evaluations,
        checkpoints): the next batch, preprocessing, the DAPS step, the window's sums. Nothing
        here reads a device value back to the host."""
        x01, skipped = next(self.batches)
        self.batches_consumed += 1
        self.files_skipped += skipped
        x = self.preprocess(x01.to(self.device, non_blocking=True))
        m = self.step_fn(x, self.step)
        self._record_step(window, m, m.pop("skipped").float(), bar)


def run_to_end(trainer: RunLoop) -> dict[str, float]:
    """Run ``trainer`` to its last step, then release its folder and its process group."""
    try:
        return trainer.run()
    finally:
        trainer.close()
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
    """Train from a config (the ``dvae train`` command)."""
    return run_to_end(Trainer(cfg, resume=resume, overwrite=overwrite))
