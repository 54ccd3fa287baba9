"""Decoders p_φ(x|z) of the paper and their pixel likelihoods.

* :class:`MLPDecoder` (MNIST): Embed(V, d) per token, concatenated, Dense/ReLU layers, a head.
* :class:`ResNetDecoder` (CIFAR-10, ImageNet-256): Embed(V, d) -> token grid -> conv 3x3 ->
  residual blocks -> transposed-conv 2x upsamplings -> the patch canvas, cropped to the image.

A decoder maps tokens ``[B, L]`` to likelihood parameters ``[B, C*m, H, W]`` where ``m`` is 1
(Bernoulli logits) or 2 (Gaussian mean and log-variance). :class:`Bernoulli` and
:class:`Gaussian` turn parameters and pixels into ``log p(x|z)`` summed over pixels.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import init
from .patches import Patcher


def _float(t: torch.Tensor) -> torch.Tensor:
    """float32 for the likelihood (under autocast too); a float64 model stays float64."""
    return t if t.dtype == torch.float64 else t.float()


class Bernoulli(nn.Module):
    """Binarised pixels: ``log p(x|z) = Σ x·log σ(a) + (1-x)·log(1-σ(a))``."""

    params_per_channel = 1

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params [..., C, H, W] (logits), x broadcastable to it -> [...] float32."""
        params = _float(params)
        x = x.to(params.dtype).expand_as(params)
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none").sum((-3, -2, -1))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params.float())


class Gaussian(nn.Module):
    """Diagonal Gaussian with a learned log-variance clipped to ``[log min_var, log max_var]``."""

    params_per_channel = 2

    def __init__(self, min_var: float = 0.01, max_var: float = 1.0):
        super().__init__()
        self.log_min = math.log(min_var)
        self.log_max = math.log(max_var)

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = _float(params).chunk(2, dim=-3)
        return mean, logvar.clamp(self.log_min, self.log_max)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params [..., 2C, H, W], x broadcastable to [..., C, H, W] -> [...] float32."""
        mean, logvar = self.split(params)
        sq = (x.to(mean.dtype) - mean).square()
        lp = -0.5 * (math.log(2 * math.pi) + logvar + sq * torch.exp(-logvar))
        return lp.sum((-3, -2, -1))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self.split(params)[0]


def _output_precision(fp32: bool, h: torch.Tensor):
    """The decoder's output layer (the likelihood parameters) in float32 under autocast when
    ``fp32`` (the reference's precision), else in the autocast dtype like the layers before."""
    import contextlib

    if fp32 and torch.is_autocast_enabled(h.device.type):
        return torch.autocast(h.device.type, enabled=False)
    return contextlib.nullcontext()


class MLPDecoder(nn.Module):
    """tokens [B, L] -> Embed -> flatten [B, L*d] -> (Dense, ReLU)* -> Dense -> [B, C*m, H, W]."""

    def __init__(self, image_shape: tuple[int, int, int], latent_len: int, vocab_size: int | None,
                 d_model: int, hidden: list[int], params_per_channel: int,
                 input_dim: int | None = None):
        super().__init__()
        C, H, W = image_shape
        self.out_shape = (C * params_per_channel, H, W)
        # no embedding table when the latent arrives as vectors (VQ-VAE, FSQ: vocab_size None)
        self.embed = nn.Embedding(vocab_size, d_model) if vocab_size else None
        layers: list[nn.Module] = []
        width = latent_len * (input_dim or d_model)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        # Separate heads per parameter kind (mean, log-variance), as in the reference.
        self.heads = nn.ModuleList(
            [nn.Linear(width, C * H * W) for _ in range(params_per_channel)])
        self.channels = C
        self.fp32_output = True  # set by build_model from Config.fp32_outputs
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init.lecun_normal_(m)
        if self.embed is not None:
            init.embedding_(self.embed)

    def forward(self, tokens: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """tokens [B, L] -> [B, C*m, H, W] (``groups`` is unused: no batch statistics)."""
        return self.decode_embedded(self.embed(tokens), groups)

    def decode_embedded(self, e: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Token vectors [B, L, input_dim] (embeddings, relaxed one-hots times the table, or
        quantised vectors) -> [B, C*m, H, W]."""
        B = e.shape[0]
        h = self.body(e.reshape(B, -1))
        C, _, H, W = self.channels, *self.out_shape
        with _output_precision(self.fp32_output, h):
            h = (h if h.dtype == torch.float64 else h.float()) if self.fp32_output else h
            return torch.cat([head(h).view(B, C, H, W) for head in self.heads], dim=1)


class SampleBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken per sample index k, over the N images of
    a batch laid out ``[N, K]`` (flattened to N·K rows, image-major), as the reference's
    decoder computes them (it maps the decoder over the K samples). ``groups`` = K is set by
    the decoder for each call; with ``groups=1`` this is plain BatchNorm. The running averages
    (used in evaluation) move by the mean over k of the per-k statistics, with the reference's
    flax momentum 0.99 (torch's ``momentum=0.01``)."""

    def __init__(self, ch: int):
        super().__init__(ch, momentum=0.01)
        self.groups = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.groups
        if not self.training or K == 1:
            return super().forward(x)
        # [N·K, C, H, W] image-major is [N, K·C, H, W]: BatchNorm over K·C channels takes the
        # statistics of each (k, c) over the N images and H·W pixels, in one native kernel
        B, C, H, W = x.shape
        running_mean = self.running_mean.repeat(K)
        running_var = self.running_var.repeat(K)
        y = F.batch_norm(x.reshape(B // K, K * C, H, W), running_mean, running_var,
                         self.weight.repeat(K), self.bias.repeat(K), True, self.momentum,
                         self.eps)
        with torch.no_grad():  # each copy moved toward its k's statistics: average them
            self.running_mean.copy_(running_mean.view(K, C).mean(0))
            self.running_var.copy_(running_var.view(K, C).mean(0))
            self.num_batches_tracked += 1
        return y.view(B, C, H, W)


@contextlib.contextmanager
def batchnorm_momentum(module: nn.Module, momentum, count: bool = True):
    """Within the block every :class:`SampleBatchNorm2d` of ``module`` moves its running
    averages with ``momentum(m)`` instead of its own ``m`` (batch statistics unchanged);
    ``count=False`` leaves ``num_batches_tracked`` as it was."""
    saved = []
    for m in module.modules():
        if isinstance(m, SampleBatchNorm2d):
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = momentum(m.momentum)
    try:
        yield
    finally:
        for m, mom, tracked in saved:
            m.momentum = mom
            if not count:
                m.num_batches_tracked.copy_(tracked)


def batchnorm_share(module: nn.Module, share: float, first: bool):
    """Decode N·K samples in two calls (``first``: the one of ``share`` = K₁/K of the samples,
    then the other) and move the running averages exactly as one call over all K would. Each
    call's per-k statistics are those of the single call (they are per sample index); the
    averages move by ``m·(K₁/K)`` then ``m·(K₂/K)``, the first rescaled to
    ``m·(K₁/K) / (1 − m·(K₂/K))`` so that the two steps compose to ``(1 − m)·r + m·mean_k s_k``.
    The first call leaves ``num_batches_tracked`` unchanged."""
    if first:
        return batchnorm_momentum(module, lambda m: m * share / (1.0 - m * (1.0 - share)),
                                  count=False)
    return batchnorm_momentum(module, lambda m: m * share)


def batchnorm_frozen(module: nn.Module):
    """A second call over samples whose statistics already moved the running averages this
    step: batch statistics as usual, the averages (and the count) left alone."""
    return batchnorm_momentum(module, lambda m: 0.0, count=False)


class ResidualBlock(nn.Module):
    """x + BN(conv1x1(ReLU(BN(conv3x3(ReLU(x))))))"""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1 = SampleBatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 1)
        self.bn2 = SampleBatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(F.relu(x)))
        return x + self.bn2(self.conv2(F.relu(y)))


class ResNetDecoder(nn.Module):
    """tokens [B, L] -> Embed -> grid [B, d, gh, gw] -> conv 3x3 -> residual blocks -> ReLU
    -> log2(canvas/gh) transposed convs (4x4, stride 2; BN+ReLU between) -> crop."""

    def __init__(self, image_shape: tuple[int, int, int], latent_len: int, vocab_size: int | None,
                 d_model: int, hidden: int, num_blocks: int, params_per_channel: int):
        super().__init__()
        C, H, W = image_shape
        self.patcher = Patcher(H, W, C, latent_len)
        gh, gw = self.patcher.grid
        ch_, cw_ = self.patcher.canvas
        ratio = ch_ // gh
        if gh != gw or ch_ != cw_ or ch_ % gh or ratio & (ratio - 1) or ratio < 2:
            raise ValueError(
                f"the ResNet decoder needs a square token grid that upsamples by a power of two "
                f"to a square canvas; L={latent_len} gives a {gh}x{gw} grid and a "
                f"{ch_}x{cw_} canvas for {H}x{W} images")
        # no embedding table when the latent arrives as vectors (VQ-VAE, FSQ: vocab_size None)
        self.embed = nn.Embedding(vocab_size, d_model) if vocab_size else None
        self.grid = (gh, gw)
        self.stem = nn.Conv2d(d_model, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden) for _ in range(num_blocks)])
        final = C * params_per_channel
        ups: list[nn.Module] = []
        ch = hidden
        n_up = int(math.log2(ratio))
        for i in range(n_up):
            out = final if i == n_up - 1 else max(ch // 2, final)
            ups.append(nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1))
            if i < n_up - 1:
                ups += [SampleBatchNorm2d(out), nn.ReLU()]
            ch = out
        self.up = nn.Sequential(*ups)
        self.fp32_output = True  # set by build_model from Config.fp32_outputs
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                init.lecun_normal_(m)
        if self.embed is not None:
            init.embedding_(self.embed)

    def forward(self, tokens: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """tokens [B, L] -> [B, C*m, H, W]; ``groups`` = K when B = N·K rows hold K samples
        per image (image-major): batch statistics are then per sample index."""
        return self.decode_embedded(self.embed(tokens), groups)

    def decode_embedded(self, e: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Token vectors [B, L, d] -> [B, C*m, H, W] (see :meth:`forward`)."""
        for m in self.modules():
            if isinstance(m, SampleBatchNorm2d):
                m.groups = groups
        B = e.shape[0]
        gh, gw = self.grid
        e = e.reshape(B, gh, gw, -1).permute(0, 3, 1, 2)
        h = F.relu(self.blocks(self.stem(e)))
        for layer in self.up[:-1]:
            h = layer(h)
        with _output_precision(self.fp32_output, h):
            h = (h if h.dtype == torch.float64 else h.float()) if self.fp32_output else h
            return self.patcher.crop(self.up[-1](h))
