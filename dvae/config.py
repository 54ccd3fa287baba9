"""Training configuration: one flat dataclass, four presets, YAML files and key=value overrides.

The presets follow the paper's configurations (the table in docs/algorithm.md) and add
``digits``, a small real dataset that ships with scikit-learn so that ``dvae train`` with no
arguments trains on a CPU in minutes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Config:
    """Everything a run needs. Field comments say what the paper uses where it matters."""

    preset: str = "digits"  # the preset this run started from (set by --config; a label)
    # Each method brings its authors' settings for the preset (METHOD_DEFAULTS, below).
    method: str = "daps"  # daps|daps_na|vq|fsq|gumbel|gumbel_na|grmck|grmck_na (Table 1)
    recipe: str = "paper"  # paper | fast: a bundle of keys applied over the method's (RECIPES)
    # --- data ---
    dataset: str = "digits"  # digits | mnist | cifar10 | imagenet256 | synthetic
    data_path: str | None = None  # mnist: .npz or IDX folder; cifar10: the pickle folder
    image_size: int = 8  # square images, side in pixels
    channels: int = 1  # colour channels (1 or 3)
    likelihood: str = "gaussian"  # bernoulli (binarised pixels) | gaussian (standardised)
    min_var: float = 0.01  # Gaussian variance clip (ImageNet: [0.01, 1])
    max_var: float = 1.0  # upper clip of the Gaussian variance
    num_workers: int = 0  # DataLoader workers (ImageFolder only; in-memory sets use none)
    eval_protocol: str = "paper"  # test images: paper (whole image resized) | center_crop
    # --- model ---
    latent_len: int = 4  # L tokens per image
    vocab_size: int = 64  # V
    d_model: int = 64  # transformer width d
    num_heads: int = 4  # attention heads
    enc_layers: int = 1  # bidirectional layers over patches
    dec_layers: int = 1  # causal layers over latent tokens
    mlp_ratio: int = 4  # transformer MLP width / d
    num_patches: int | None = None  # defaults to latent_len, as in the reference
    decoder: str = "mlp"  # mlp | resnet
    mlp_hidden: list[int] = field(default_factory=lambda: [128, 256])  # MLP decoder widths
    resnet_hidden: int = 64  # ResNet decoder channels
    resnet_blocks: int = 2  # ResNet decoder residual blocks
    # --- the factorised (non-autoregressive) encoder of daps_na, vq, fsq, gumbel_na, grmck_na
    na_layers: int = 2  # bidirectional layers of the factorised encoder
    na_mlp_ratio: int = 6  # its MLP width / d
    # --- baselines (docs/algorithm.md) ---
    fsq_levels: list[int] = field(default_factory=lambda: [8, 6, 5])  # FSQ levels per dim
    fsq_adapter_width: int = 85  # FSQ's extra decoder Dense: MLP width (ResNet: d*ratio)
    commitment: float = 0.25  # VQ-VAE commitment weight (codebook loss weight is 1)
    temp_start: float = 1.0  # Gumbel / GR-MCK temperature at step 0 (exponential anneal)
    temp_end: float = 1.0  # ... at the last step
    grmck_k: int = 100  # GR-MCK Monte-Carlo samples per token
    lr_schedule: str = "constant"  # constant | cosine (to 0.1 lr, optax alpha=0.1)
    # --- DAPS (docs/algorithm.md) ---
    num_samples: int = 8  # K
    ess_target: float = 0.33  # rho: target mean ESS = rho * K
    eta_mode: str = "learned"  # learned (paper) | solved (solve_eta each step)
    eta_init: float | str = 100.0  # initial eta (learned mode; the paper's 100), or solve:
    # the exact solve_eta of the first batch, then learned as in the paper
    decoder_samples: int | None = None  # K': samples per image in the decoder's loss (a
    # random subset of the K, the same k for every image; the rest only rewards); null: K
    encoder_samples: int | None = None  # K'': sequences per image in the encoder's gradient,
    # drawn from the DAPS weights (log q from the sampler; the teacher-forced pass on those
    # alone); null: all K, weighted (the paper)
    eta_lr: float = 1e-3  # AdamW learning rate of log eta (learned mode)
    baseline: str = "logsumexp"  # logsumexp | mean (cancels in the weights; metrics only)
    beta_start: float = 0.5  # beta at step 0, annealed exponentially to beta_end
    beta_end: float = 0.01  # beta at the last step (also the beta of the reported beta-ELBO)
    # --- optimiser ---
    lr: float = 3e-4  # AdamW learning rate (the paper's 3e-4, constant)
    weight_decay: float = 1e-4  # optax.adamw's default, which the reference uses
    clip: float = 1.0  # adaptive unit-wise gradient clipping
    # --- run ---
    steps: int = 1500  # training steps in all (a resumed run may raise it)
    batch_size: int = 64  # images per step, the global batch (divided among torchrun ranks)
    seed: int = 0  # initialisation, data order and sampling streams
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads (None: torch's default)
    amp: bool = True  # bf16 autocast on CUDA; false: float32 throughout (exact replication)
    fp32_outputs: bool = True  # under amp: encoder head and decoder output layer in float32
    compile: bool = False  # torch.compile the decoder and teacher-forced pass
    kernel_backend: str | None = None  # dvae_kernels backend: null/auto|torch|triton|cuda|cpu
    # Fused linear ops (teacher-forced pass and sampling straight from hidden states, no
    # [N, K, L, V] logits): "auto" uses them on CUDA, where the Triton kernels make them fast;
    # on the CPU the logits path with the cpu kernels is faster at these vocabulary sizes.
    fused_linear: str = "auto"  # auto | always | never
    # The sampling loop as one captured CUDA graph: "auto" captures on CUDA and falls back to
    # eager (one warning) if capture fails; "on" requires it; "off" never captures.
    sampler_graph: str = "auto"  # sampling loop as a CUDA graph: auto | on | off
    out_dir: str = "runs/digits"  # checkpoint, metrics.jsonl, tb/, reconstructions.png
    log_every: int = 50  # steps per metrics line (>= 1)
    eval_every: int = 500  # steps between test evaluations (0: only at the end)
    ckpt_every: int = 500  # steps between checkpoints (0: only at the end and on a signal)
    eval_samples: int = 512  # test images in the final evaluation (0: the whole test set)
    eval_every_seconds: float = 0.0  # training seconds between curve evaluations (0: off)
    curve_samples: int = 512  # test images per periodic evaluation (eval_every,
    # eval_every_seconds): the first n, the same in every run; 0: eval_samples
    fid: bool = False  # rFID in every evaluation (FID Inception weights; never downloaded)
    fid_weights: str | None = None  # the FID Inception weights (null: torch hub cache)
    grid_images: int = 16  # test images in reconstructions.png (>= 1)
    tensorboard: bool = True  # TensorBoard scalars under out_dir/tb
    progress: bool = True  # progress bar

    def __post_init__(self) -> None:
        self.validate()

    @property
    def patches(self) -> int:
        return self.num_patches if self.num_patches is not None else self.latent_len

    @property
    def bits_per_image(self) -> float:
        return self.latent_len * math.log2(self.codebook_size)

    @property
    def codebook_size(self) -> int:
        """Codes per token: V, or the product of the FSQ levels."""
        return math.prod(self.fsq_levels) if self.method == "fsq" else self.vocab_size

    @property
    def factorised(self) -> bool:
        """The method's encoder is the factorised (bidirectional) one."""
        return self.method in FACTORISED

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.method in METHODS,
             f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.lr_schedule in ("constant", "cosine"),
             f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        need(bool(self.fsq_levels) and all(isinstance(v, int) and v >= 3
                                           for v in self.fsq_levels),
             f"fsq_levels must be a non-empty list of ints >= 3, got {self.fsq_levels}")
        for name in ("na_layers", "na_mlp_ratio", "grmck_k", "fsq_adapter_width"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.temp_start > 0 and self.temp_end > 0,
             f"temp_start and temp_end must be > 0, got {self.temp_start}, {self.temp_end}")
        need(self.commitment >= 0, f"commitment must be >= 0, got {self.commitment}")
        if self.method in FACTORISED:
            need(self.num_patches is None or self.num_patches == self.latent_len,
                 f"method={self.method} has one encoder output per patch: num_patches must be "
                 f"null or latent_len ({self.latent_len}), got {self.num_patches}")
        need(self.dataset in ("digits", "mnist", "cifar10", "imagenet256", "synthetic"),
             f"dataset must be digits, mnist, cifar10, imagenet256 or synthetic, "
             f"got {self.dataset!r}")
        need(self.likelihood in ("bernoulli", "gaussian"),
             f"likelihood must be 'bernoulli' or 'gaussian', got {self.likelihood!r}")
        need(self.decoder in ("mlp", "resnet"),
             f"decoder must be 'mlp' or 'resnet', got {self.decoder!r}")
        need(self.eval_protocol in ("paper", "center_crop"),
             f"eval_protocol must be 'paper' or 'center_crop', got {self.eval_protocol!r}")
        need(self.fused_linear in ("auto", "always", "never"),
             f"fused_linear must be auto, always or never, got {self.fused_linear!r}")
        need(self.sampler_graph in ("auto", "on", "off"),
             f"sampler_graph must be auto, on or off, got {self.sampler_graph!r}")
        need(self.eta_mode in ("learned", "solved"),
             f"eta_mode must be 'learned' or 'solved', got {self.eta_mode!r}")
        need(self.baseline in ("logsumexp", "mean"),
             f"baseline must be 'logsumexp' or 'mean', got {self.baseline!r}")
        need(0 < self.ess_target <= 1, f"ess_target must be in (0, 1], got {self.ess_target}")
        need(0 < self.min_var <= self.max_var,
             f"need 0 < min_var <= max_var, got min_var={self.min_var}, "
             f"max_var={self.max_var}")
        for name in ("latent_len", "d_model", "num_heads", "batch_size", "image_size",
                     "channels", "steps", "log_every", "grid_images"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "eval_samples", "curve_samples",
                     "num_workers"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.num_samples >= 2 or self.method not in ("daps", "daps_na"),
             f"num_samples (K) must be >= 2: DAPS weighs K samples against each other, got "
             f"{self.num_samples}")
        need(self.vocab_size >= 2, f"vocab_size must be >= 2 (1 code carries 0 bits), got "
             f"{self.vocab_size}")
        need(self.num_patches is None or self.num_patches >= 1,
             f"num_patches must be null or >= 1, got {self.num_patches}")
        need(bool(self.mlp_hidden) and all(isinstance(h, int) and h >= 1
                                           for h in self.mlp_hidden),
             f"mlp_hidden must be a non-empty list of positive ints, got {self.mlp_hidden}")
        need(self.device == "auto" or _is_device(self.device),
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(self.kernel_backend in KERNEL_BACKENDS,
             f"kernel_backend must be null, auto, torch, triton, cuda or cpu, got "
             f"{self.kernel_backend!r}")
        if self.kernel_backend in ("cuda", "cpu") and self.device != "auto":
            need(self.device.split(":")[0] == self.kernel_backend,
                 f"kernel_backend={self.kernel_backend} runs on {self.kernel_backend} tensors, "
                 f"but device={self.device}")
        need(self.d_model % self.num_heads == 0,
             f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        need(self.d_model % 2 == 0, f"d_model must be even (sinusoidal positions), "
             f"got {self.d_model}")
        need(self.beta_start > 0 and self.beta_end > 0,
             f"beta_start and beta_end must be > 0, got {self.beta_start}, {self.beta_end}")
        need(self.eta_init == "solve" or (not isinstance(self.eta_init, str)
                                          and self.eta_init > 0),
             f"eta_init must be a number > 0 or 'solve', got {self.eta_init!r}")
        need(self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}, got "
             f"{self.recipe!r}")
        for name, symbol in (("decoder_samples", "K'"), ("encoder_samples", "K''")):
            value = getattr(self, name)
            if value is None:
                continue
            need(self.method in ("daps", "daps_na"), f"{name} applies to daps and daps_na (K "
                 f"samples per image), not method={self.method}; leave it null")
            need(1 <= value <= self.num_samples, f"{name} ({symbol}) must be null or in "
                 f"[1, num_samples={self.num_samples}], got {value}")
        need(self.eval_every_seconds >= 0,
             f"eval_every_seconds must be >= 0, got {self.eval_every_seconds}")
        need(self.threads is None or self.threads >= 1,
             f"threads must be None or >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


KERNEL_BACKENDS = (None, "auto", "torch", "triton", "cuda", "cpu")

# The paper's Table 1 methods (docs/algorithm.md). The factorised ones use the bidirectional
# "self-attention recognition model" with one output per token; the others the
# autoregressive encoder of docs/algorithm.md.
METHODS = ("daps", "daps_na", "vq", "fsq", "gumbel", "gumbel_na", "grmck", "grmck_na")
FACTORISED = frozenset({"daps_na", "vq", "fsq", "gumbel_na", "grmck_na"})
# Methods whose latent is a categorical distribution q(z|x) (a KL to the uniform prior, hence
# a β-ELBO); VQ-VAE and FSQ encode deterministically and have none.
CATEGORICAL = frozenset(METHODS) - {"vq", "fsq"}


def _na(layers: int, ratio: int) -> dict[str, int]:
    return {"na_layers": layers, "na_mlp_ratio": ratio}


def _sched(beta: tuple[float, float], temp: tuple[float, float] | None = None
           ) -> dict[str, float]:
    out = {"beta_start": beta[0], "beta_end": beta[1]}
    if temp is not None:
        out.update(temp_start=temp[0], temp_end=temp[1])
    return out


# Each method's settings per preset, from the authors' configs
# (jadex/algorithms/vae/configs/model_dataset/<method>_<dataset>.yaml and configs/nn/,
# branch daps-iclr2026): applied over the preset when ``method=`` is given, under any key the
# user sets. ``digits`` (not in the paper) takes the MNIST settings (FSQ: [4, 4, 4], the 64
# codes of its V). The presets themselves are DAPS's.
_MNIST_LIKE: dict[str, dict[str, Any]] = {
    "daps": {},
    "daps_na": dict(ess_target=0.5, **_na(2, 6)),
    "vq": dict(commitment=0.25, **_na(2, 7)),
    "fsq": dict(fsq_levels=[8, 6, 5], fsq_adapter_width=85, **_na(2, 7)),
    "gumbel": _sched((0.5, 0.01), (1.0, 1.0)),
    "gumbel_na": dict(**_sched((1.0, 1.0), (1.0, 0.1)), **_na(2, 6)),
    "grmck": dict(grmck_k=100, **_sched((1.0, 1.0), (1.0, 0.75))),
    "grmck_na": dict(grmck_k=100, **_sched((1.0, 1.0), (1.0, 0.75)), **_na(2, 6)),
}
METHOD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {**_MNIST_LIKE, "fsq": dict(_MNIST_LIKE["fsq"], fsq_levels=[4, 4, 4])},
    "mnist": _MNIST_LIKE,
    "cifar10": {
        "daps": {},
        "daps_na": dict(ess_target=0.33, **_sched((6.0, 1.0)), **_na(4, 6)),
        "vq": dict(commitment=0.25, **_na(4, 6)),
        "fsq": dict(fsq_levels=[8, 8, 8], fsq_adapter_width=2 * 128, **_na(4, 6)),
        "gumbel": dict(**_sched((6.0, 0.01), (1.0, 1.0)), lr=1e-4, lr_schedule="cosine"),
        "gumbel_na": dict(**_sched((6.0, 0.01), (1.0, 0.1)), **_na(4, 6)),
        "grmck": dict(grmck_k=100, **_sched((3.0, 0.01), (1.0, 0.75))),
        "grmck_na": dict(grmck_k=100, **_sched((3.0, 0.01), (1.0, 0.1)), **_na(4, 6)),
    },
    "imagenet256": {
        "daps": {},
        "daps_na": dict(ess_target=0.25, **_sched((50.0, 1.0)), **_na(6, 4)),
        "vq": dict(commitment=0.25, **_na(6, 4)),
        "fsq": dict(fsq_levels=[8, 5, 5, 5], fsq_adapter_width=4 * 128, **_na(6, 4)),
        "gumbel": dict(**_sched((50.0, 1.0), (1.0, 0.75)), lr=1e-4),
        "gumbel_na": dict(**_sched((50.0, 1.0), (1.0, 0.1)), **_na(6, 4)),
        # the authors: batch 32 with 2 accumulation steps, the same 64 images per update
        "grmck": dict(grmck_k=10, **_sched((10.0, 1.0), (1.0, 0.75)), lr=1e-4),
        "grmck_na": dict(grmck_k=10, **_sched((10.0, 1.0), (1.0, 0.1)), **_na(6, 4)),
    },
}

# Named bundles of DAPS keys (``recipe=``), applied over the method's defaults and under any
# key the user sets. ``paper`` is the paper's configuration; ``fast`` trades none of the
# estimator's expectation for wall-clock (README, "Time to quality"): the decoder trained on
# K' = 2 of the K samples, the encoder on K'' = 2 sequences drawn from the weights, η started
# from the exact solve, and lr 2e-3 (on real MNIST, 20 minutes: 15.95 dB against 15.67 at
# 1e-3; in 5-minute trials the paper's 3e-4 was 1 dB behind 1e-3).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {"decoder_samples": 2, "encoder_samples": 2, "eta_init": "solve", "lr": 2e-3},
}

# Keys a resumed run may change: they steer the run (length, intervals, where things go,
# what is shown, how fast) but not the result of any training step. Every other key is fixed
# by the checkpoint: changing it would make the resumed run a different experiment.
RUN_CONTROL_KEYS = frozenset({
    "steps", "log_every", "eval_every", "ckpt_every", "eval_samples", "grid_images",
    "eval_every_seconds", "curve_samples",
    "tensorboard", "progress", "out_dir", "data_path", "num_workers", "threads",
    "eval_protocol", "fid", "fid_weights",
})
# Keys `dvae eval` / `dvae reconstruct` may override on a checkpoint's config: the above, and
# where and how the evaluation runs (the weights are the checkpoint's whatever these say).
EVAL_KEYS = RUN_CONTROL_KEYS | {"device", "kernel_backend", "fused_linear", "amp", "fp32_outputs",
                                "batch_size"}


def _is_device(name: str) -> bool:
    kind, _, index = name.partition(":")
    return kind in ("cpu", "cuda") and (not index or (kind == "cuda" and index.isdigit()))


def _field_help(schema: type = None) -> dict[str, str]:
    """Each field's one-line meaning: the comment after its definition in its source."""
    import inspect

    out: dict[str, str] = {}
    for line in inspect.getsource(schema or Config).splitlines():
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if "#" in stripped and ":" in stripped and name.isidentifier():
            out[name] = stripped.split("#", 1)[1].strip()
    return out


def keys_help(schema: type = None, intro: str | None = None) -> str:
    """Every config key with its default and meaning (``dvae train --help``); ``schema``: a
    config dataclass other than :class:`Config` (whose fields all have defaults)."""
    schema = schema or Config
    meaning = _field_help(schema)
    default = schema.__new__(schema)
    for f in dataclasses.fields(schema):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        setattr(default, f.name, value)
    rows = []
    for f in dataclasses.fields(schema):
        value = getattr(default, f.name)
        shown = "null" if value is None else (str(value).lower() if isinstance(value, bool)
                                              else str(value).replace(" ", ""))
        rows.append(f"  {f.name}={shown}".ljust(30) + f"  {meaning.get(f.name, '')}".rstrip())
    presets = ", ".join(PRESETS)
    if intro is None:
        intro = ("config keys (key=value; defaults shown are the dataclass's, each preset sets "
                 f"its own; presets: {presets}):")
    return intro + "\n" + "\n".join(rows)


# The paper's configurations (docs/algorithm.md, the configurations table) and the CPU demo.
PRESETS: dict[str, dict[str, Any]] = {
    # 1797 real 8x8 digits from scikit-learn; 4 tokens of 6 bits; a few minutes on 2 cores.
    # eta is solved each step: the learned eta starts at 100 and needs thousands of steps to
    # make the trust region bind (ESS stays near K), too slow for a demo. One CPU thread: the
    # ops are too small for intra-op threads to pay, and they hurt on a shared machine.
    # lr 1e-3 (not the paper's 3e-4): 1500 steps is short; in trials 3e-4 and 3e-3 did worse.
    "digits": dict(
        eta_mode="solved", threads=1, lr=1e-3,
        dataset="digits", image_size=8, channels=1, likelihood="gaussian",
        min_var=0.01, max_var=1.0, latent_len=4, vocab_size=64, d_model=64, num_heads=4,
        enc_layers=1, dec_layers=1, decoder="mlp", mlp_hidden=[128, 256], num_samples=8,
        ess_target=0.33, beta_start=0.5, beta_end=0.01, steps=1500, batch_size=64,
        log_every=50, eval_every=500, ckpt_every=500, eval_samples=0, out_dir="runs/digits",
    ),
    "mnist": dict(
        dataset="mnist", image_size=28, channels=1, likelihood="bernoulli",
        latent_len=8, vocab_size=256, d_model=64, num_heads=4, enc_layers=1, dec_layers=1,
        decoder="mlp", mlp_hidden=[64, 256], num_samples=8, ess_target=0.33,
        beta_start=0.5, beta_end=0.01, steps=250_000, batch_size=256,
        log_every=500, eval_every=5000, ckpt_every=5000, eval_samples=0, out_dir="runs/mnist",
    ),
    "cifar10": dict(
        dataset="cifar10", image_size=32, channels=3, likelihood="gaussian",
        # the reference leaves CIFAR's variance unclipped (machine epsilon below)
        min_var=1.1920929e-07, max_var=1e30, latent_len=64, vocab_size=512, d_model=128,
        num_heads=4, enc_layers=2, dec_layers=2, decoder="resnet", resnet_hidden=64,
        resnet_blocks=2, num_samples=8, ess_target=0.33, beta_start=6.0, beta_end=0.01,
        steps=250_000, batch_size=256, log_every=500, eval_every=5000, ckpt_every=5000,
        eval_samples=10_000, out_dir="runs/cifar10",
    ),
    "imagenet256": dict(
        dataset="imagenet256", image_size=256, channels=3, likelihood="gaussian",
        min_var=0.01, max_var=1.0, latent_len=1024, vocab_size=1024, d_model=128,
        num_heads=4, enc_layers=2, dec_layers=2, decoder="resnet", resnet_hidden=64,
        resnet_blocks=2, num_samples=8, ess_target=0.25, beta_start=50.0, beta_end=1.0,
        steps=300_000, batch_size=64, num_workers=8, log_every=500, eval_every=5000,
        # the paper's evaluation: all 50,000 validation images, each resized whole to 256x256
        ckpt_every=5000, eval_samples=0, eval_protocol="paper", out_dir="runs/imagenet256",
    ),
}


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list[int]": list,
          "float | str": (float, str)}


def _coerce(value: Any, name: str, schema: type = None) -> Any:
    """Check ``value`` against the field's declared type; YAML 1.1 reads ``1e-3`` as a string
    and ``1`` as an int, both fine for a float field."""
    annotation = {f.name: f.type for f in dataclasses.fields(schema or Config)}[name]
    optional = annotation.endswith("| None")
    kind = _TYPES[annotation.removesuffix("| None").strip()]
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} expects a {kind.__name__}, got null")
    if kind == (float, str) and not isinstance(value, bool):
        try:  # a number, or a word such as eta_init=solve
            return float(value) if isinstance(value, (int, float, str)) else value
        except ValueError:
            return value
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, bool):
        value = "on" if value else "off"  # YAML 1.1 reads on/off in a file as booleans
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is list:
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
        expected = ("list of ints" if kind is list else "number or word" if kind == (float, str)
                    else kind.__name__)
        article = "an" if expected[0] in "aeiou" else "a"
        raise ValueError(f"{name} expects {article} {expected}"
                         f"{' or null' if optional else ''}, got {value!r}")
    return value


def _parse_value(raw: str, name: str, schema: type = None) -> Any:
    """Parse a command-line value with YAML rules (``1e-3``, ``true``, ``[64, 256]``, ``null``);
    for a string field, ``on``/``off``/``yes``/``no`` stay words (YAML 1.1 reads them as
    booleans: ``sampler_graph=on``)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ValueError(f"{name}={raw}: not a value (YAML syntax: 1e-3, true, [64, 256], "
                         "null)") from None
    annotation = {f.name: f.type for f in dataclasses.fields(schema or Config)}.get(name, "")
    if annotation.startswith("str") and isinstance(value, bool):
        value = raw
    return _coerce(value, name, schema)


def load_config(config: str | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> Config:
    """Build a :class:`Config` from a preset name or a YAML file, then ``key=value`` overrides.

    A YAML file may name a ``preset:`` to start from; its other keys override that preset.
    """
    values: dict[str, Any] = {}
    if config is None:
        config = "digits"
    if config in PRESETS:
        values.update(PRESETS[config], preset=config)
        loaded: dict[str, Any] = {}
    else:
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"--config must be a preset ({', '.join(PRESETS)}) or a YAML "
                             f"file, got {config!r} (no such file)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ValueError(f"{path}: not valid YAML{at}: {problem}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--config {path}: cannot read it: {err}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got "
                             f"{type(loaded).__name__}")
        base = loaded.pop("preset", "digits")
        if base not in PRESETS:
            raise ValueError(f"{path}: preset must be one of {', '.join(PRESETS)}, got {base!r}")
        values.update(PRESETS[base], preset=base)
        known = {f.name for f in dataclasses.fields(Config)}
        for key, value in loaded.items():
            if key not in known:
                raise ValueError(f"{path}: unknown config key {key!r}")
            loaded[key] = _coerce(value, key)
    given = parse_overrides(overrides)
    method = given.get("method", loaded.get("method", "daps"))
    # preset < the method's defaults for it < the recipe < the file's keys < the command line's
    values.update(METHOD_DEFAULTS[values["preset"]].get(method, {}))
    recipe = given.get("recipe", loaded.get("recipe", "paper"))
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if RECIPES[recipe] and method not in ("daps", "daps_na"):
        raise ValueError(f"recipe={recipe} is a DAPS recipe (daps, daps_na), not one for "
                         f"method={method}")
    values.update(RECIPES[recipe])
    values.update(loaded)
    values.update(given)
    return Config(**values)


def parse_overrides(overrides: list[str] | tuple[str, ...], schema: type = None
                    ) -> dict[str, Any]:
    """``["lr=1e-3", "mlp_hidden=[8, 9]"]`` -> ``{"lr": 0.001, "mlp_hidden": [8, 9]}``, each
    value checked against its field's type in ``schema`` (default :class:`Config`); an
    unknown key or a bad value raises."""
    known = [f.name for f in dataclasses.fields(schema or Config)]
    values: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"overrides are key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if key == "preset" and schema is None:
            raise ValueError(f"preset is chosen with --config {raw or 'NAME'}, not as a "
                             f"key=value override (got {item!r})")
        if key not in known:
            raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(known)}")
        values[key] = _parse_value(raw, key, schema)
    return values


def changed_keys(old: dict[str, Any], new: dict[str, Any], allowed=frozenset(),
                 defaults: type | None = None) -> list[str]:
    """Keys whose values differ between two config dicts, less those in ``allowed``. A key
    ``old`` lacks (a checkpoint written before the key existed) takes its default there (the
    dataclass ``defaults``, :class:`Config` unless given)."""
    schema = defaults or Config
    old = {**{f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(schema)}, **old}
    return sorted(k for k in new if k not in allowed and old.get(k) != new[k])


def resume_config(saved: dict[str, Any], config: str | None,
                  overrides: list[str] | tuple[str, ...]) -> Config:
    """The configuration of a resumed run: the checkpoint's, with only run-control keys
    (:data:`RUN_CONTROL_KEYS`) changed by what the user gave. A result-changing key given
    with another value than the checkpoint's is refused, naming it. With ``--config`` every
    key of that preset or file counts as given; without it, only the overrides do."""
    known = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in saved.items() if k in known}
    asked = (load_config(config, overrides).to_dict() if config is not None
             else parse_overrides(overrides))
    asked = {k: v for k, v in asked.items() if k != "preset" or config is not None}
    refused = changed_keys(saved, asked, RUN_CONTROL_KEYS)
    if refused:
        listing = ", ".join(f"{k}={asked[k]!r} (checkpoint: {saved.get(k)!r})"
                            for k in refused)
        raise ValueError(f"--resume keeps the checkpoint's configuration; these would change "
                         f"the result: {listing}. Start a new run in another out_dir, or use "
                         "--overwrite")
    values = dict(saved)
    values.update({k: v for k, v in asked.items() if k in RUN_CONTROL_KEYS})
    return Config(**values)
