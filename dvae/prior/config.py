"""The prior's configuration: one flat dataclass, defaults per tokenizer preset, ``key=value``
overrides (the rules of :mod:`dvae.config`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as _config


@dataclass
class PriorConfig:
    """Everything a prior run needs; the defaults are the authors' (image_label_df_config)."""

    tokenizer: str = ""  # the tokenizer's checkpoint.pt (dvae prior train --tokenizer)
    # --- network: the authors' DiT ---
    d_model: int = 128  # transformer width
    num_heads: int = 4  # attention heads
    layers: int = 2  # adaLN-Zero blocks
    mlp_ratio: int = 4  # MLP width / d_model
    class_dropout: float = 0.1  # probability a training label becomes the null label
    # --- flow and sampler ---
    dt: float = 0.025  # Euler step of the sampler (1/dt steps from t=0)
    guidance: float = 0.0  # classifier-free guidance of evaluations (0: the authors' sampler)
    # --- optimiser ---
    lr: float = 1e-4  # AdamW learning rate, constant (the authors')
    weight_decay: float = 1e-4  # optax.adamw's default, which the authors use
    # --- run ---
    steps: int = 250_000  # training steps (the authors' 250k; the digits preset: 3000)
    batch_size: int = 64  # images per step, the global batch (divided among torchrun ranks)
    seed: int = 0  # initialisation, data order, noise, label dropout, encoder samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads (None: the tokenizer's setting)
    amp: bool = True  # bf16 autocast on CUDA
    kernel_backend: str | None = None  # dvae_kernels backend: null/auto|torch|triton|cpu
    data_path: str | None = None  # the tokenizer's data, if it has moved (null: as trained)
    num_workers: int = 0  # DataLoader workers (ImageFolder only)
    out_dir: str | None = None  # null: the folder 'prior' beside the tokenizer's checkpoint
    log_every: int = 500  # steps per metrics line (>= 1)
    eval_every: int = 0  # steps between generation evaluations (0: only at the end)
    ckpt_every: int = 5000  # steps between checkpoints (0: only at the end and on a signal)
    eval_samples: int = 1000  # images generated (and test images compared) per evaluation
    metrics: str = "auto"  # auto | classifier | inception | none (auto: by channels, 1 or 3)
    classifier_path: str | None = None  # the metric classifier's file (null: the user cache)
    fid_weights: str | None = None  # FID Inception weights (inception metrics; never downloaded)
    grid_per_label: int = 8  # samples per label in samples.png (>= 1)
    tensorboard: bool = True  # TensorBoard scalars under out_dir/tb
    progress: bool = True  # progress bar

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("d_model", "num_heads", "layers", "mlp_ratio", "steps", "batch_size",
                     "log_every", "grid_per_label"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "eval_samples", "num_workers"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.d_model % self.num_heads == 0,
             f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        need(self.d_model % 2 == 0, f"d_model must be even (sin-cos positions), got "
             f"{self.d_model}")
        need(0 <= self.class_dropout < 1,
             f"class_dropout must be in [0, 1), got {self.class_dropout}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        from .flow import euler_steps

        euler_steps(self.dt)
        need(self.guidance == self.guidance and abs(self.guidance) != float("inf"),
             f"guidance must be a finite float, got {self.guidance}")
        need(self.metrics in ("auto", "classifier", "inception", "none"),
             f"metrics must be auto, classifier, inception or none, got {self.metrics!r}")
        need(self.device == "auto" or _config._is_device(self.device),
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(self.kernel_backend in _config.KERNEL_BACKENDS,
             f"kernel_backend must be null, auto, torch, triton, cuda or cpu, got "
             f"{self.kernel_backend!r}")
        need(self.threads is None or self.threads >= 1,
             f"threads must be None or >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Defaults by the tokenizer's preset, under what the user gives: the authors' 250k steps are
# hours on a CPU; the digits demo trains its prior in under a minute.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(steps=3000, log_every=100, ckpt_every=1000, eval_samples=0),
}

# Keys a resumed prior run may change (nothing any training step computes depends on them).
RUN_CONTROL_KEYS = frozenset({
    "steps", "log_every", "eval_every", "ckpt_every", "eval_samples", "tensorboard", "progress",
    "out_dir", "data_path", "num_workers", "threads", "metrics", "classifier_path",
    "fid_weights", "grid_per_label", "guidance", "tokenizer",
})
# Keys `dvae prior eval` and `dvae generate` may change on a prior checkpoint.
EVAL_KEYS = RUN_CONTROL_KEYS | {"device", "kernel_backend", "amp", "batch_size", "dt", "seed"}


def default_out_dir(tokenizer: str) -> str:
    return str(Path(tokenizer).parent / "prior")


def prior_config(tokenizer: str, tokenizer_preset: str, overrides: list[str] | tuple[str, ...]
                 ) -> PriorConfig:
    """The prior's configuration for a tokenizer checkpoint: the dataclass defaults, the
    tokenizer preset's (:data:`PRESET_DEFAULTS`), then ``key=value`` overrides."""
    given = _config.parse_overrides(overrides, PriorConfig)
    if given.get("tokenizer", tokenizer) != tokenizer:
        raise ValueError("the tokenizer is given with --tokenizer, not as tokenizer=")
    values: dict[str, Any] = dict(PRESET_DEFAULTS.get(tokenizer_preset, {}))
    values.update(given)
    values["tokenizer"] = tokenizer
    if values.get("out_dir") is None:
        values["out_dir"] = default_out_dir(tokenizer)
    return PriorConfig(**values)


def resume_prior_config(saved: dict[str, Any], tokenizer: str,
                        overrides: list[str] | tuple[str, ...]) -> PriorConfig:
    """A resumed prior run's configuration: the checkpoint's, with only run-control keys
    (:data:`RUN_CONTROL_KEYS`) changed by the overrides; another key is refused, naming it."""
    known = {f.name for f in dataclasses.fields(PriorConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    asked = _config.parse_overrides(overrides, PriorConfig)
    refused = _config.changed_keys(saved, asked, RUN_CONTROL_KEYS, defaults=PriorConfig)
    if refused:
        listing = ", ".join(f"{k}={asked[k]!r} (checkpoint: {saved.get(k)!r})" for k in refused)
        raise ValueError(f"--resume keeps the checkpoint's configuration; these would change "
                         f"the result: {listing}. Start a new run in another out_dir, or use "
                         "--overwrite")
    values = {**saved, **{k: v for k, v in asked.items() if k in RUN_CONTROL_KEYS},
              "tokenizer": tokenizer}
    return PriorConfig(**values)


def keys_help() -> str:
    return _config.keys_help(PriorConfig, "prior config keys (key=value; the digits preset "
                             "sets steps=3000, log_every=100, ckpt_every=1000, eval_samples=0):")
