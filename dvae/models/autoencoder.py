"""The autoencoders: encoder q_θ(z|x), decoder p_φ(x|z), pixel likelihood; for DAPS also
log η.

:class:`LatentAutoencoder` holds what every method shares (the decoder, the likelihood, the
pixel scaling) and the evaluation interface (:meth:`~LatentAutoencoder.encode_codes`,
:meth:`~LatentAutoencoder.decode_codes`, :meth:`~LatentAutoencoder.kl_uniform`).
:class:`CategoricalAutoencoder` adds a categorical encoder, autoregressive or factorised.

``DAPSAutoencoder.forward(x, tokens)`` is the differentiable part of a training step, in one
call so that DistributedDataParallel sees every parameter used in its forward: the decoder's
log-likelihood of each image under each sampled sequence (the rewards, and the decoder loss)
and the encoder's teacher-forced hidden states (for log q and the encoder loss). Sampling runs
before it, without gradient, through :meth:`DAPSAutoencoder.sample`. The baselines' models are
in :mod:`dvae.models.baselines`.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .decoders import batchnorm_frozen, batchnorm_share
from .encoder import ARTransformerEncoder
from .factorised import FactorisedEncoder


def no_phase(name: str):
    return contextlib.nullcontext()


class LatentAutoencoder(nn.Module):
    """The encoder, the decoder, the likelihood and the pixel scaling
    ``x_model = (x01 - shift) / scale``
    (identity for Bernoulli); subclasses add an encoder and the evaluation interface."""

    codebook_size: int

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: nn.Module,
                 channels: int, pixel_shift: torch.Tensor | None = None,
                 pixel_scale: torch.Tensor | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        C = channels
        shift = torch.zeros(C) if pixel_shift is None else torch.as_tensor(pixel_shift).float()
        scale = torch.ones(C) if pixel_scale is None else torch.as_tensor(pixel_scale).float()
        self.register_buffer("pixel_shift", shift.view(C, 1, 1).clone())
        self.register_buffer("pixel_scale", scale.view(C, 1, 1).clone())

    def to_pixels(self, x_model: torch.Tensor) -> torch.Tensor:
        """Model space -> [0, 1] pixels (clamped)."""
        return (x_model.float() * self.pixel_scale + self.pixel_shift).clamp(0, 1)

    def encode_codes(self, x: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        """Images -> one code sequence each, ``[N, L]`` int64 in [0, codebook_size): a
        sample at temperature 1 for a categorical encoder, the nearest code otherwise."""
        raise NotImplementedError

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, L] -> likelihood parameters [B, C*m, H, W]."""
        raise NotImplementedError

    def kl_uniform(self, x: torch.Tensor, codes: torch.Tensor,
                   backend: str | None = None) -> torch.Tensor | None:
        """``KL(q(z|x) ‖ uniform)`` per image along ``codes`` [N, L] (summed over positions),
        or None where q is not a distribution (VQ-VAE, FSQ)."""
        return None

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, L] -> the decoder's mean image in [0, 1] pixels, [B, C, H, W]."""
        return self.to_pixels(self.likelihood.mean(self.decode_codes(codes)))


class CategoricalAutoencoder(LatentAutoencoder):
    """A categorical encoder (:class:`ARTransformerEncoder` or :class:`FactorisedEncoder`,
    which offer the same sampling interface) before the shared decoder."""

    def __init__(self, encoder: ARTransformerEncoder | FactorisedEncoder, decoder: nn.Module,
                 likelihood: nn.Module, *, pixel_shift: torch.Tensor | None = None,
                 pixel_scale: torch.Tensor | None = None):
        super().__init__(encoder, decoder, likelihood, encoder.patcher.channels, pixel_shift,
                         pixel_scale)

    @property
    def latent_len(self) -> int:
        return self.encoder.latent_len

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def codebook_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def factorised(self) -> bool:
        return isinstance(self.encoder, FactorisedEncoder)

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

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        return self.sample(x, 1, generator=generator)[0][:, 0]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes)

    @torch.no_grad()
    def kl_uniform(self, x: torch.Tensor, codes: torch.Tensor,
                   backend: str | None = None) -> torch.Tensor:
        """Σ_l (log V − H_l), the entropies of q along the sampled prefix (teacher-forced)."""
        import dvae_kernels

        tokens = codes[:, None]
        hidden = self.encoder.teacher_forced(self.encoder.encode(x), tokens)
        _, entropy = dvae_kernels.linear_token_logprobs(
            hidden.float(), self.encoder.head.weight.float(), tokens,
            self.encoder.head.bias.float(), return_entropy=True, ignore_index=None,
            backend=backend)
        return (math.log(self.vocab_size) - entropy[:, 0].float()).sum(-1)


class DAPSAutoencoder(CategoricalAutoencoder):
    """Args:
        encoder, decoder, likelihood: the three parts.
        eta_mode: ``"learned"`` (log η is a parameter, the paper's choice) or ``"solved"``
            (η is solved for each step; log η is then a buffer holding the last value).
        eta_init: η₀.
        pixel_shift, pixel_scale: per-channel ``x_model = (x01 - shift) / scale`` that maps
            pixels in [0, 1] to what the model sees (identity for Bernoulli).
    """

    def __init__(self, encoder: ARTransformerEncoder | FactorisedEncoder, decoder: nn.Module,
                 likelihood: nn.Module, *, eta_mode: str = "learned", eta_init: float = 100.0,
                 pixel_shift: torch.Tensor | None = None,
                 pixel_scale: torch.Tensor | None = None):
        super().__init__(encoder, decoder, likelihood, pixel_shift=pixel_shift,
                         pixel_scale=pixel_scale)
        self.eta_mode = eta_mode
        log_eta = torch.tensor(math.log(eta_init), dtype=torch.float32)
        if eta_mode == "learned":
            self.log_eta = nn.Parameter(log_eta)
        else:
            self.register_buffer("log_eta", log_eta)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, phases=None,
                order: torch.Tensor | None = None, decoder_samples: int | None = None,
                encoder_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The differentiable part of a DAPS step.

        Args:
            x: ``[N, C, H, W]`` images in model space.
            tokens: ``[N, K, L]`` sampled sequences.
            phases: a :class:`dvae.profiling.Phases` to time "reward" and "teacher_forced".
            order, decoder_samples: a permutation ``[K]`` of the sample indices and K′: the
                samples ``order[:K′]`` (of every image) keep their likelihood's graph for the
                decoder's loss; the other K − K′ are decoded without one (their rewards
                only). None: all K keep it (the paper's step).
            encoder_rows: ``[N, K″]`` sample indices (drawn from the DAPS weights): the
                teacher-forced pass runs on those sequences only, and the rewards were scored
                before (:meth:`score`, which moved the batch-norm running averages): the
                decoder then runs on the K′ samples alone and ``logpx`` is None.

        Returns:
            ``logpx [N, K]`` float32 (log p(x_i|z_ik), summed over pixels),
            ``decoder_logpx [N, K′]`` (the differentiable ones; ``logpx`` itself when K′ = K),
            ``hidden [N, K, L, d]`` (teacher-forced, before the output layer),
            ``log_eta`` (0-d).
        """
        N, K, L = tokens.shape
        phase = phases if phases is not None else no_phase
        with phase("reward"):
            if encoder_rows is not None:
                train = order[:decoder_samples] if order is not None else slice(None)
                with batchnorm_frozen(self.decoder):
                    decoder_logpx = self._logpx(x, tokens[:, train])
                logpx = None
            elif order is None or decoder_samples is None or decoder_samples >= K:
                logpx = self._logpx(x, tokens)
                decoder_logpx = logpx
            else:
                kt = decoder_samples
                rest, train = order[kt:], order[:kt]
                # Batch statistics are per sample index, so two calls see those of one call
                # (batchnorm_share keeps the running averages exact too)
                with torch.no_grad(), batchnorm_share(self.decoder, (K - kt) / K, True):
                    logpx_rest = self._logpx(x, tokens[:, rest])
                with batchnorm_share(self.decoder, kt / K, False):
                    decoder_logpx = self._logpx(x, tokens[:, train])
                logpx = torch.cat([decoder_logpx, logpx_rest], 1)[:, torch.argsort(order)]
        with phase("teacher_forced"):
            if encoder_rows is not None:
                tokens = tokens.gather(1, encoder_rows[..., None].expand(-1, -1, L))
            hidden = self.encoder.teacher_forced(self.encoder.encode(x), tokens)
        return {"logpx": logpx, "decoder_logpx": decoder_logpx, "hidden": hidden,
                "log_eta": self.log_eta}

    @torch.no_grad()
    def score(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` rewards log p(x_i|z_ik) without a graph (one decoder call over all K,
        which moves the batch-norm running averages as the paper's step does)."""
        logpx = self._logpx(x, tokens)
        return logpx if logpx.dtype == torch.float64 else logpx.float()

    def _logpx(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, k]`` log p(x_i|z_ij) of ``tokens [N, k, L]`` (batch statistics per j)."""
        N, k, L = tokens.shape
        params = self.decoder(tokens.reshape(N * k, L), groups=k)
        return self.likelihood.log_prob(params.view(N, k, *params.shape[1:]), x[:, None])
