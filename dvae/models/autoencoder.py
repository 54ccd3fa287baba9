"""The DAPS autoencoder: encoder q_θ(z|x), decoder p_φ(x|z), pixel likelihood, and log η.

``forward(x, tokens)`` is the differentiable part of a training step, in one call so that
DistributedDataParallel sees every parameter used in its forward: the decoder's log-likelihood
of each image under each sampled sequence (the rewards, and the decoder loss) and the encoder's
teacher-forced hidden states (for log q and the encoder loss). Sampling runs before it, without
gradient, through :meth:`DAPSAutoencoder.sample`.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .decoders import Bernoulli, Gaussian, MLPDecoder, ResNetDecoder
from .encoder import ARTransformerEncoder


class DAPSAutoencoder(nn.Module):
    """Args:
        encoder, decoder, likelihood: the three parts.
        eta_mode: ``"learned"`` (log η is a parameter, the paper's choice) or ``"solved"``
            (η is solved for each step; log η is then a buffer holding the last value).
        eta_init: η₀.
        pixel_shift, pixel_scale: per-channel ``x_model = (x01 - shift) / scale`` that maps
            pixels in [0, 1] to what the model sees (identity for Bernoulli).
    """

    def __init__(self, encoder: ARTransformerEncoder, decoder: nn.Module, likelihood: nn.Module,
                 *, eta_mode: str = "learned", eta_init: float = 100.0,
                 pixel_shift: torch.Tensor | None = None,
                 pixel_scale: torch.Tensor | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.eta_mode = eta_mode
        log_eta = torch.tensor(math.log(eta_init), dtype=torch.float32)
        if eta_mode == "learned":
            self.log_eta = nn.Parameter(log_eta)
        else:
            self.register_buffer("log_eta", log_eta)
        C = encoder.patcher.channels
        shift = torch.zeros(C) if pixel_shift is None else torch.as_tensor(pixel_shift).float()
        scale = torch.ones(C) if pixel_scale is None else torch.as_tensor(pixel_scale).float()
        self.register_buffer("pixel_shift", shift.view(C, 1, 1).clone())
        self.register_buffer("pixel_scale", scale.view(C, 1, 1).clone())

    @property
    def latent_len(self) -> int:
        return self.encoder.latent_len

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    def to_pixels(self, x_model: torch.Tensor) -> torch.Tensor:
        """Model space -> [0, 1] pixels (clamped)."""
        return (x_model.float() * self.pixel_scale + self.pixel_shift).clamp(0, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(x)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, num_samples: int, *,
               generator: torch.Generator | None = None, sampler=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C, H, W] -> tokens [N, K, L] int64, sampler log q per token [N, K, L]."""
        return self.encoder.sample(self.encoder.encode(x), num_samples, generator=generator,
                                   sampler=sampler)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> likelihood parameters [B, C*m, H, W]."""
        return self.decoder(tokens)

    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> the decoder's mean image in [0, 1] pixels, [B, C, H, W]."""
        return self.to_pixels(self.likelihood.mean(self.decoder(tokens)))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, phases=None
                ) -> dict[str, torch.Tensor]:
        """The differentiable part of a DAPS step.

        Args:
            x: ``[N, C, H, W]`` images in model space.
            tokens: ``[N, K, L]`` sampled sequences.
            phases: a :class:`dvae.profiling.Phases` to time "reward" and "teacher_forced".

        Returns:
            ``logpx [N, K]`` float32 (log p(x_i|z_ik), summed over pixels),
            ``hidden [N, K, L, d]`` (teacher-forced, before the output layer),
            ``log_eta`` (0-d).
        """
        N, K, L = tokens.shape
        phase = phases if phases is not None else (lambda name: contextlib.nullcontext())
        with phase("reward"):
            params = self.decoder(tokens.reshape(N * K, L), groups=K)
            logpx = self.likelihood.log_prob(params.view(N, K, *params.shape[1:]), x[:, None])
        with phase("teacher_forced"):
            hidden = self.encoder.teacher_forced(self.encoder.encode(x), tokens)
        return {"logpx": logpx, "hidden": hidden, "log_eta": self.log_eta}


def build_model(cfg, pixel_shift=None, pixel_scale=None) -> DAPSAutoencoder:
    """The autoencoder a :class:`dvae.config.Config` describes."""
    image_shape = (cfg.channels, cfg.image_size, cfg.image_size)
    encoder = ARTransformerEncoder(
        image_shape, cfg.latent_len, cfg.vocab_size, d_model=cfg.d_model,
        num_heads=cfg.num_heads, enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers,
        mlp_ratio=cfg.mlp_ratio, num_patches=cfg.patches)
    if cfg.likelihood == "bernoulli":
        likelihood: nn.Module = Bernoulli()
    else:
        likelihood = Gaussian(cfg.min_var, cfg.max_var)
    m = likelihood.params_per_channel
    if cfg.decoder == "mlp":
        decoder: nn.Module = MLPDecoder(image_shape, cfg.latent_len, cfg.vocab_size,
                                        cfg.d_model, list(cfg.mlp_hidden), m)
    else:
        decoder = ResNetDecoder(image_shape, cfg.latent_len, cfg.vocab_size, cfg.d_model,
                                cfg.resnet_hidden, cfg.resnet_blocks, m)
    # Under autocast: the layers that produce log q and the likelihood parameters in float32
    # (the reference's precision), or in bf16 like the rest (faster; Config.fp32_outputs).
    decoder.fp32_output = encoder.fp32_head = cfg.fp32_outputs
    return DAPSAutoencoder(encoder, decoder, likelihood, eta_mode=cfg.eta_mode,
                           eta_init=cfg.eta_init, pixel_shift=pixel_shift,
                           pixel_scale=pixel_scale)
