"""Images from a trained prior: the tokenizer it belongs to, label-conditioned sampling, the
sample grid, and the generation evaluation (metrics of :mod:`dvae.prior.metrics`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import RUN_CONTROL_KEYS as TOKENIZER_RUN_KEYS
from .config import EVAL_KEYS, PriorConfig, _config
from .flow import euler_sample, sample_path
from .network import FlowTransformer
from .tokens import TokenSpace

# what a prior run may change on its tokenizer's configuration: where its data is, where it
# runs (the weights are the checkpoint's)
TOKENIZER_KEYS = TOKENIZER_RUN_KEYS | {"device", "kernel_backend", "amp"}


def open_tokenizer(path: str, *, data_path: str | None = None, device: str = "auto",
                   kernel_backend: str | None = None, digest: str | None = None):
    """The tokenizer checkpoint a prior belongs to (:func:`dvae.evaluate.open_checkpoint`),
    its data at ``data_path`` when given. With ``digest`` (the one the prior recorded), a
    checkpoint whose weights have changed since is refused."""
    from ..evaluate import open_checkpoint

    if not path:
        raise ValueError("no tokenizer checkpoint given (--tokenizer RUN/checkpoint.pt)")
    if digest is not None and Path(path).is_file() and ckpt.digest(path) != digest:
        raise ValueError(f"tokenizer {path!r} is not the checkpoint this prior was trained on "
                         "(its weights changed since: resumed or retrained); give the "
                         "original with tokenizer=PATH")
    overrides = [f"device={device}"]
    if data_path is not None:
        overrides.append(f"data_path={data_path}")
    if kernel_backend is not None:
        overrides.append(f"kernel_backend={kernel_backend}")
    return open_checkpoint(path, overrides, TOKENIZER_KEYS)


def num_classes_of(train, test) -> int:
    """The label count of a labelled dataset pair; a clear error without labels."""
    if getattr(train, "labels", None) is None or getattr(test, "labels", None) is None:
        raise ValueError("the prior is label-conditioned and the tokenizer's data has no class "
                         "labels (MNIST: y_train/y_test in the .npz or the labels-idx1 files; "
                         "CIFAR-10: the batches' labels; ImageNet: class folders)")
    return int(max(train.labels.max(), test.labels.max())) + 1


def build_prior(pcfg: PriorConfig, space: TokenSpace, num_classes: int) -> FlowTransformer:
    return FlowTransformer(space, num_classes, d_model=pcfg.d_model, num_heads=pcfg.num_heads,
                           layers=pcfg.layers, mlp_ratio=pcfg.mlp_ratio,
                           backend=_backend(pcfg.kernel_backend))


def _backend(name: str | None) -> str | None:
    return None if name in (None, "auto") else name


@dataclass
class Prior:
    """A trained prior with its tokenizer (:func:`open_prior`)."""

    cfg: PriorConfig
    model: FlowTransformer
    tokenizer: object  # dvae.evaluate.Opened
    space: TokenSpace
    device: torch.device
    state: dict

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def autocast(self):
        import contextlib

        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, guidance: float | None = None,
               dt: float | None = None, generator: torch.Generator | None = None,
               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images [N, C, H, W] in [0, 1], codes [N, L])`` for ``labels [N]``, in batches
        of ``batch_size`` drawing from one ``generator`` in turn."""
        guidance = self.cfg.guidance if guidance is None else guidance
        dt = self.cfg.dt if dt is None else dt
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {int(bad[0])}")
        self.model.eval()
        images, codes = [], []
        for s in range(0, labels.shape[0], batch_size):
            y = labels[s:s + batch_size].to(self.device)
            with self.autocast():
                cats = euler_sample(self.model.logits, y, self.space, dt=dt, guidance=guidance,
                                    null_label=self.model.null_label, generator=generator,
                                    backend=_backend(self.cfg.kernel_backend))
            c = self.space.to_codes(cats)
            images.append(self.tokenizer.model.reconstruct(c).float().cpu())
            codes.append(c.cpu())
        return torch.cat(images), torch.cat(codes)


def open_prior(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Prior:
    """A prior checkpoint of ``dvae prior train`` and its tokenizer, ready to sample.
    ``overrides`` may change :data:`dvae.prior.config.EVAL_KEYS` only."""
    from ..device import pick_device

    state = ckpt.load(path)
    if state.get("kind") != "prior":
        raise ValueError(f"{str(path)!r} is not a prior checkpoint (dvae prior train writes "
                         "them; a tokenizer's checkpoint goes to --tokenizer)")
    values = dict(state["config"])
    asked = _config.parse_overrides(overrides, PriorConfig)
    refused = _config.changed_keys(values, asked, EVAL_KEYS, defaults=PriorConfig)
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot be changed on a prior checkpoint; keys "
                         f"that may: {', '.join(sorted(EVAL_KEYS))}")
    values.update(asked)
    pcfg = PriorConfig(**values)
    if pcfg.threads is not None:
        torch.set_num_threads(pcfg.threads)
    if not Path(pcfg.tokenizer).is_file():
        # trained from another working directory: the default layout (prior/ beside the
        # tokenizer's checkpoint)
        beside = Path(path).parent.parent / "checkpoint.pt"
        if beside.is_file():  # its digest is checked below
            pcfg.tokenizer = str(beside)
        else:
            raise ValueError(f"the prior's tokenizer {pcfg.tokenizer!r} does not exist (from "
                             "here); give its checkpoint with tokenizer=PATH")
    tok = open_tokenizer(pcfg.tokenizer, data_path=pcfg.data_path, device=pcfg.device,
                         kernel_backend=pcfg.kernel_backend, digest=state["tokenizer_digest"])
    space = TokenSpace.for_config(tok.cfg)
    device = pick_device(pcfg.device)
    model = build_prior(pcfg, space, int(state["num_classes"])).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"prior checkpoint {str(path)!r}: its weights do not fit the network "
                         f"its config describes: {str(err).splitlines()[0]}") from None
    return Prior(pcfg, model.eval(), tok, space, device, state)


def parse_labels(text: str, num_classes: int) -> list[int]:
    """``"all"`` or ``"0,3,7"`` -> the label list, each checked against ``num_classes``."""
    if text.strip() == "all":
        return list(range(num_classes))
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--labels must be 'all' or comma-separated integers, got "
                         f"{text!r}") from None
    if not labels:
        raise ValueError("--labels is empty")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--labels must be in [0, {num_classes}) (the prior's classes), got "
                         f"{bad[0]}")
    return labels


def save_sample_grid(images: torch.Tensor, rows: int, path: str | os.PathLike) -> None:
    """PNG of ``images`` (row-major, ``rows`` rows: one per label); small images scaled up."""
    from ..evaluate import save_image_grid

    save_image_grid(images, max(1, images.shape[0] // rows), path)


@torch.no_grad()
def prior_loss(model, space: TokenSpace, tokenizer, images, labels: torch.Tensor,
               seed: int = 12345, batch_size: int = 256, autocast=None) -> float:
    """The flow-matching loss ``−E log p(z₁ | z_t, t, label)`` (nats per image, summed over
    positions) on ``images`` (pixels in [0, 1]) and their labels, with a fixed seed for the
    encoder's samples and the path."""
    import contextlib

    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for s in range(0, images.shape[0], batch_size):
        x = tokenizer.preprocess(images[s:s + batch_size].to(device))
        y = labels[s:s + batch_size].to(device)
        with autocast or contextlib.nullcontext():
            z1 = space.to_categories(tokenizer.model.encode_codes(x, generator=g))
            z_t, t = sample_path(z1, space, g)
            total += -float(model(z_t, t, y, z1).double().sum())
        n += x.shape[0]
    model.train(was)
    return total / max(n, 1)


@torch.no_grad()
def evaluate_prior(prior: Prior, feature_net=None, *, num: int, seed: int = 12345,
                   guidance: float | None = None, grid_path: str | os.PathLike | None = None,
                   generated: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> dict[str, float | None]:
    """The prior's test ``loss`` (nats per image; :func:`prior_loss`) and, with a
    :class:`dvae.prior.metrics.FeatureNet`, the
    generation metrics of ``num`` images (labels balanced over the classes; 0: as many as
    test images) against as many test images. ``generated`` (images, labels): score these
    instead of sampling (``dvae prior eval --npz``)."""
    from ..data import first_images
    from .metrics import generation_metrics

    tok = prior.tokenizer
    num = num or len(tok.test)
    test_x, test_y = first_images(tok.test, num)
    num = test_x.shape[0]
    loss = prior_loss(prior.model, prior.space, tok, test_x, test_y, autocast=prior.autocast())
    out: dict[str, float | None] = {
        "loss": loss, "loss_per_position": loss / prior.space.num_positions,
        "guidance": prior.cfg.guidance if guidance is None else guidance,
    }
    g = torch.Generator(prior.device).manual_seed(seed)
    if generated is None:
        labels = torch.arange(num) % prior.num_classes
        images, _ = prior.sample(labels, guidance=guidance, generator=g)
    else:
        images, labels = generated
    if grid_path is not None:
        rows = min(prior.num_classes, 10)
        per = prior.cfg.grid_per_label
        grid_labels = torch.arange(rows).repeat_interleave(per)
        grid, _ = prior.sample(grid_labels, guidance=guidance,
                               generator=torch.Generator(prior.device).manual_seed(seed + 1))
        save_sample_grid(grid, rows, grid_path)
    if feature_net is not None:
        train_x, _ = first_images(tok.train, num)
        gr = torch.Generator(prior.device).manual_seed(seed)
        recon = torch.cat([
            tok.model.reconstruct(tok.model.encode_codes(
                tok.preprocess(test_x[s:s + 256].to(prior.device)), generator=gr)).float().cpu()
            for s in range(0, num, 256)])
        out.update(generation_metrics(feature_net, images, labels, test_x, train_x, recon))
    return out
