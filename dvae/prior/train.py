"""``dvae prior train``: the generation prior over a trained tokenizer's frozen latents, with
every guarantee of ``dvae train`` (the shared :class:`dvae.trainer.RunLoop`): a progress bar,
``metrics.jsonl`` and TensorBoard, exact resume, one run per out_dir, one-line errors,
SIGINT/SIGTERM saving a checkpoint, torchrun DDP (``batch_size`` is the global batch).

A training step (the authors' ``get_loss_args`` and ``loss_fn``): a batch of training images
and labels; ``z₁`` the tokenizer's categories of each image (one sample of a categorical
encoder, the nearest codes of VQ-VAE and FSQ; fresh each step, as theirs); ``(z_t, t)`` drawn
on the path of :mod:`dvae.prior.flow`; labels dropped to the null label with probability
``class_dropout``; loss ``−mean log p(z₁ | z_t, t, label)`` (summed over positions) through the
fused log-probability op; AdamW, a step whose loss or gradients are not finite skipped
(optax's ``apply_if_finite``; 100 in a row end the run). All randomness comes from one
checkpointed generator per rank.

Outputs in ``out_dir`` (default: ``prior/`` beside the tokenizer's checkpoint):

    metrics.jsonl   the run's description, training lines, and each evaluation (split "test":
                    test loss, generation metrics)
    samples.png     one row of generated images per label (the first ten labels)
    checkpoint.pt   the prior, its optimiser, the random streams, and the digest of the
                    tokenizer checkpoint it belongs to
    tb/             TensorBoard scalars
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dvae_kernels import _dispatch

from .. import checkpoint as ckpt
from .. import optim
from ..data import Batches, BatchStream
from ..trainer import RunLoop, _Window, run_to_end
from .config import RUN_CONTROL_KEYS, PriorConfig
from .flow import drop_labels, sample_path
from .generate import Prior, build_prior, evaluate_prior, num_classes_of, open_tokenizer
from .metrics import feature_net, metric_kind
from .tokens import TokenSpace


class PriorTrainer(RunLoop):
    """Trains a :class:`dvae.prior.network.FlowTransformer` from a :class:`PriorConfig`."""

    postfix_keys = ("loss",)

    def _desc(self) -> str:
        return "dvae prior train"

    def _check(self, cfg: PriorConfig, device: torch.device) -> None:
        backend = _dispatch.requested_backend(cfg.kernel_backend)
        if backend is None:
            return
        unavailable = _dispatch.backend_unavailable(backend, device)
        if unavailable:
            raise ValueError(f"kernel_backend={backend} cannot run on device {device}: "
                             f"{unavailable}")
        lacking = _dispatch.lacking(backend, ["linear_token_logprobs", "sample_tokens"])
        if lacking:
            raise ValueError(f"kernel_backend={backend} has no implementation of "
                             f"{', '.join(lacking)}, which the prior calls; use "
                             "kernel_backend=auto or torch")

    def _build(self, cfg: PriorConfig, resume: bool) -> None:
        self._setup_process(cfg)
        torch.manual_seed(cfg.seed)
        self.tokenizer = open_tokenizer(cfg.tokenizer, data_path=cfg.data_path,
                                        device=str(self.device),
                                        kernel_backend=cfg.kernel_backend)
        self.tokenizer_digest = ckpt.digest(cfg.tokenizer)
        if cfg.threads is None and self.tokenizer.cfg.threads is not None:
            torch.set_num_threads(self.tokenizer.cfg.threads)
        for p in self.tokenizer.model.parameters():
            p.requires_grad_(False)
        self.train_set, self.test_set = self.tokenizer.train, self.tokenizer.test
        self.num_classes = num_classes_of(self.train_set, self.test_set)
        self.space = TokenSpace.for_config(self.tokenizer.cfg)
        self.model = build_prior(cfg, self.space, self.num_classes).to(self.device)
        self.fwd: nn.Module = self.model
        if self.distributed:
            self.fwd = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optim.make_adamw(self.params, cfg.lr, cfg.weight_decay)
        self._skipped = torch.zeros((), device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(
            cfg.seed * 7919 + 17 + self.rank)
        stream = BatchStream(len(self.train_set), cfg.batch_size // self.world, cfg.seed,
                             self.rank, self.world)
        tok = self.tokenizer.cfg
        self._begin(resume, {"kind": "prior", "tokenizer": cfg.tokenizer,
                             "tokenizer_method": tok.method, "dataset": tok.dataset,
                             "bits_per_image": tok.bits_per_image,
                             "positions": self.space.num_positions,
                             "categories": self.space.num_categories,
                             "num_classes": self.num_classes}, stream)
        self.batches = Batches(self.train_set, self.stream, cfg.num_workers, labels=True)
        self._features = None
        kind = metric_kind(cfg.metrics, tok.channels)
        if kind is not None and self.rank == 0:  # fail now, not at the first evaluation
            self._features = feature_net(kind, self.train_set, self.test_set, self.device,
                                         classifier_path=cfg.classifier_path,
                                         fid_weights=cfg.fid_weights, log=print)

    def autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def skipped(self) -> torch.Tensor:
        return self._skipped

    def state(self) -> dict:
        return {**self._common_state(), "kind": "prior", "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "num_classes": self.num_classes,
                "tokenizer_digest": self.tokenizer_digest}

    def load(self, path) -> None:
        state = ckpt.load(path, map_location="cpu")
        if state.get("kind") != "prior":
            raise ValueError(f"cannot resume {path}: not a prior checkpoint")
        self._check_resumable(path, state, RUN_CONTROL_KEYS)
        if state["tokenizer_digest"] != self.tokenizer_digest:
            raise ValueError(f"cannot resume {path}: it was trained on another tokenizer "
                             f"checkpoint (tokenizer={self.cfg.tokenizer} has changed since)")
        self._load_state_dict(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_common(state)

    # -- the step and the evaluation -----------------------------------------------------------

    def _train_one(self, window: _Window, bar) -> None:
        cfg, g = self.cfg, self.generator
        x01, skipped, labels = next(self.batches)
        self.batches_consumed += 1
        self.files_skipped += skipped
        x = self.tokenizer.preprocess(x01.to(self.device, non_blocking=True))
        labels = labels.to(self.device, non_blocking=True)
        self.model.train()
        with torch.no_grad(), self.autocast():
            z1 = self.space.to_categories(self.tokenizer.model.encode_codes(x, generator=g))
        z_t, t = sample_path(z1, self.space, g)
        y = drop_labels(labels, cfg.class_dropout, self.model.null_label, g)
        with self.autocast():
            logp = self.fwd(z_t, t, y, z1)
        loss = -logp.mean()
        loss.backward()
        found_inf = optim.nonfinite_flag(self.params, loss)
        if self.distributed:
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
        optim.step_unless_nonfinite(self.optimizer, found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        self._skipped += found_inf
        loss = loss.detach()
        self._record_step(window, {"loss": loss,
                                   "loss_per_position": loss / self.space.num_positions},
                          found_inf.float(), bar)

    def prior(self) -> Prior:
        """The prior being trained, as :func:`dvae.prior.generate.open_prior` returns one."""
        return Prior(self.cfg, self.model, self.tokenizer, self.space, self.device, {})

    def evaluate(self, final: bool = True) -> dict[str, float | None]:
        """Generation metrics (the same for a periodic evaluation and the final one)."""
        res = evaluate_prior(self.prior(), self._features, num=self.cfg.eval_samples,
                             grid_path=self.out_dir / "samples.png")
        self.model.train()
        self.last_eval = res
        self._log({"split": "test", "step": self.step, **res})
        return res

    def _eval_message(self, res: dict) -> str:
        parts = [f"step {self.step}: test loss {res['loss']:.2f} nats"]
        for key, label, fmt in (("fd", "FD", ".2f"), ("fid", "FID", ".2f"),
                                ("label_accuracy", "label accuracy", ".3f"),
                                ("precision", "precision", ".3f"), ("recall", "recall", ".3f")):
            if res.get(key) is not None:
                parts.append(f"{label} {res[key]:{fmt}}")
        return ", ".join(parts)


def train_prior(cfg: PriorConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a prior from a config (the ``dvae prior train`` command)."""
    return run_to_end(PriorTrainer(cfg, resume=resume, overwrite=overwrite))
