"""Test-set evaluation of any method's autoencoder, and the reconstruction grid.

:func:`evaluate` follows the authors' protocol: one code sequence per image (one stochastic
sample at temperature 1 for a categorical encoder; the nearest codes for VQ-VAE and FSQ).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import metrics
from .config import EVAL_KEYS, Config
from .data import Preprocess, TensorImages
from .models.autoencoder import LatentAutoencoder


@dataclass
class Opened:
    """A trained autoencoder read back from its checkpoint (:func:`open_checkpoint`)."""

    cfg: Config
    model: LatentAutoencoder
    train: object  # the training set (pixels in [0, 1], with labels where the data has them)
    test: object
    preprocess: Preprocess
    device: torch.device
    state: dict


def open_checkpoint(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                    allowed=EVAL_KEYS) -> Opened:
    """The autoencoder of a ``dvae train`` checkpoint on its device, in eval mode, with its
    data and preprocessing. ``overrides`` (``key=value``) may change only ``allowed`` keys
    (where and how it runs, where its data is), never what its weights were trained with."""
    from .checkpoint import load
    from .config import changed_keys, parse_overrides
    from .data import load_datasets
    from .device import check_kernel_backend, pick_device
    from .models import build_model

    state = load(path)
    if state.get("kind") == "prior":
        raise ValueError(f"{str(path)!r} is a prior checkpoint (dvae prior train); this needs "
                         "the checkpoint of a dvae train run")
    values = dict(state["config"])
    asked = parse_overrides(overrides)
    refused = changed_keys(values, asked, allowed)
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot be changed on a checkpoint (its weights "
                         f"were trained with the saved value); keys that may: "
                         f"{', '.join(sorted(allowed))}")
    values.update(asked)
    cfg = Config(**values)
    device = pick_device(cfg.device)
    check_kernel_backend(cfg, device)
    train, test = load_datasets(cfg)
    model = build_model(cfg).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {str(path)!r}: its weights do not fit the model its "
                         f"config describes: {str(err).splitlines()[0]}") from None
    model.eval()
    # pixel statistics come from the checkpoint's buffers, not recomputed
    shift = model.pixel_shift.flatten().tolist()
    scale = model.pixel_scale.flatten().tolist()
    return Opened(cfg, model, train, test, Preprocess(cfg.likelihood, shift, scale), device,
                  state)


@torch.no_grad()
def evaluate(model: LatentAutoencoder, dataset, preprocess: Preprocess, cfg: Config,
             device: torch.device, *, max_images: int | None = None, seed: int = 12345,
             grid_path: str | os.PathLike | None = None, fid_net: nn.Module | None = None
             ) -> dict[str, float]:
    """Test-set metrics with one code sequence per image (the authors' protocol: one
    stochastic sample at temperature 1 for a categorical encoder; the nearest codes for
    VQ-VAE and FSQ): log p(x|z), PSNR, SSIM, codebook usage and perplexity for every method;
    the KL to the uniform prior and the β-ELBO (nats per image, β_end) where q is a
    distribution (not VQ-VAE, FSQ); rFID when ``fid_net`` (from :func:`dvae.fid.inception`)
    is given."""
    rfid = None
    if fid_net is not None:
        from .fid import RFID

        rfid = RFID(fid_net)

    was_training = model.training
    model.eval()
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    bs = max(1, min(cfg.batch_size, 256))
    g = torch.Generator(device=device).manual_seed(seed)
    sums = {"beta_elbo": 0.0, "log_px": 0.0, "kl": 0.0, "psnr": 0.0, "ssim": 0.0}
    has_kl = True
    all_codes = []
    first = None
    evaluated = unreadable = 0
    for start in range(0, n, bs):
        idx = torch.arange(start, min(start + bs, n))
        if isinstance(dataset, TensorImages):
            x01 = dataset.batch(idx)
        else:
            # An unreadable test file is left out, not replaced by its neighbour (that
            # would count one image twice); eval_unreadable reports how many.
            images = [dataset.try_load(int(i)) for i in idx]
            unreadable += sum(im is None for im in images)
            images = [im for im in images if im is not None]
            if not images:
                continue
            x01 = torch.stack(images)
        evaluated += x01.shape[0]
        x01 = x01.to(device)
        x = preprocess(x01)
        codes = model.encode_codes(x, generator=g)
        params = model.decode_codes(codes)
        logpx = model.likelihood.log_prob(params, x)
        kl = model.kl_uniform(x, codes, backend=cfg.kernel_backend)
        recon = model.to_pixels(model.likelihood.mean(params))
        target = preprocess.target_pixels(x01)
        if rfid is not None:
            rfid.update(target, recon)
        if kl is None:
            has_kl = False
        else:
            sums["beta_elbo"] += (logpx - cfg.beta_end * kl).sum().item()
            sums["kl"] += kl.sum().item()
        sums["log_px"] += logpx.sum().item()
        sums["psnr"] += metrics.psnr(recon, target).sum().item()
        sums["ssim"] += metrics.ssim(recon, target).sum().item()
        all_codes.append(codes.cpu())
        if first is None:
            first = (target[:cfg.grid_images].cpu(), recon[:cfg.grid_images].cpu())
    if evaluated == 0:
        raise ValueError(f"no test image could be read ({unreadable} unreadable files)")
    out: dict[str, float | None] = {k: v / evaluated for k, v in sums.items()}
    if not has_kl:  # VQ-VAE and FSQ: q is not a distribution, no KL and no β-ELBO
        out["beta_elbo"] = out["kl"] = None
    out.update(metrics.codebook_stats(torch.cat(all_codes), model.codebook_size))
    out["eval_images"] = evaluated
    if rfid is not None:
        out["rfid"] = rfid.compute()
    if unreadable:
        out["eval_unreadable"] = unreadable
    if grid_path is not None and first is not None:
        save_grid(first[0], first[1], grid_path)
    model.train(was_training)
    return out


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: str | os.PathLike) -> None:
    """PNG: originals in the top row, reconstructions below; small images scaled up."""
    save_image_grid(torch.cat([originals, recons]), originals.shape[0], path)


def save_image_grid(images: torch.Tensor, per_row: int, path: str | os.PathLike) -> None:
    """PNG of ``images`` ``[N, C, H, W]`` in [0, 1], ``per_row`` to a row; images smaller than
    64 pixels scaled up (nearest), grey ones shown as RGB."""
    from torchvision.utils import save_image

    H = images.shape[-1]
    factor = max(1, 64 // H)
    x = images.float().clamp(0, 1)
    if factor > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(x, str(path), nrow=per_row, padding=2, pad_value=1.0)
