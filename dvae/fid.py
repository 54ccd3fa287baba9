"""FID with pytorch-fid's network: reconstruction FID (rFID, the paper's Table 1 ImageNet
metric) here, generation FID in :mod:`dvae.prior.metrics`.

rFID is the Fréchet distance between Inception-v3 pool features (2048-d) of the test images
and of their reconstructions. The network is pytorch-fid's (the maintained port of the
TensorFlow FID Inception, weights ``pt_inception-2015-12-05-6726825d.pth``); images in [0, 1]
are resized to 299×299 bilinearly and scaled to [-1, 1] by it, grey images repeated to three
channels. The distance is :func:`frechet_distance` (float64, symmetric eigendecompositions).

dvae never downloads the weights. They are read from ``fid_weights=PATH`` or, by default, from
torch's hub cache (``$TORCH_HOME/hub/checkpoints/``, where pytorch-fid itself would cache them);
when absent, one clear error says which file to put where. Features are summed in float64 as
they stream in (mean and covariance, no feature list is kept).
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURES = 2048


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def inception(weights: str | os.PathLike | None = None,
              device: torch.device | str = "cpu") -> nn.Module:
    """pytorch-fid's FID Inception-v3 (pool3 features), its weights read from ``weights`` or
    the torch hub cache, never downloaded. Raises ValueError naming the missing file."""
    try:
        from pytorch_fid import inception as pfi
    except ImportError:
        raise ValueError("rFID needs the pytorch-fid package: pip install pytorch-fid "
                         "(it is in dvae[train])") from None
    path = Path(weights) if weights else default_weights_path()
    if not path.is_file():
        raise ValueError(f"rFID needs the FID Inception weights {WEIGHTS_FILE}; put the file at "
                         f"{default_weights_path()} or pass fid_weights=PATH (dvae never "
                         f"downloads it; {str(path)!r} does not exist)")

    def local_only(url, *args, **kwargs):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many kinds for a damaged file
            raise ValueError(f"fid_weights {str(path)!r} cannot be read: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                             ) from None

    with mock.patch.object(pfi, "load_state_dict_from_url", local_only):
        try:
            net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURES]],
                                  resize_input=True, normalize_input=True,
                                  requires_grad=False, use_fid_inception=True)
        except RuntimeError as err:  # load_state_dict: keys or shapes do not fit
            raise ValueError(f"fid_weights {str(path)!r} are not the FID Inception weights: "
                             f"{str(err).splitlines()[0]}") from None
    return net.eval().to(device)


class FeatureStats:
    """Running float64 sums of features: mean and (unbiased) covariance at the end."""

    def __init__(self, dim: int = FEATURES):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64).reshape(features.shape[0], -1)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.n}")
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean.numpy(), cov.numpy()


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets,
    ``‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½)``, in float64. The trace of the square root is
    ``Σ √λ`` over the eigenvalues of the symmetric ``Σa^½ Σb Σa^½`` (the same eigenvalues
    as ``Σa Σb``), so a singular covariance (features that are always 0, as after a ReLU)
    needs no regularising offset: pytorch-fid's ``scipy.linalg.sqrtm`` route gives the same
    value where it is accurate."""
    (mu1, s1), (mu2, s2) = a.mean_cov(), b.mean_cov()
    s1, s2 = torch.from_numpy(s1), torch.from_numpy(s2)

    def psd_sqrt(m: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    r1 = psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = float(((mu1 - mu2) ** 2).sum())
    return diff + float(torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


class RFID:
    """Accumulates Inception features of originals and reconstructions, batch by batch.

    ``update(originals, reconstructions)`` takes ``[B, C, H, W]`` pixels in [0, 1] (C = 1 or
    3); ``compute()`` returns the rFID."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.device = next(net.parameters()).device
        self.real, self.fake = FeatureStats(), FeatureStats()

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with torch.autocast(self.device.type, enabled=False):
            return self.net(x)[0].flatten(1)

    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        self.real.add(self._features(originals))
        self.fake.add(self._features(reconstructions))

    def compute(self) -> float:
        return frechet_distance(self.real, self.fake)
