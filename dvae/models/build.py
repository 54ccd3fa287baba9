"""The autoencoder a configuration describes: one encoder, one decoder, one likelihood, and
the objective's autoencoder class for its ``method``."""

from __future__ import annotations

from torch import nn

from .autoencoder import DAPSAutoencoder, LatentAutoencoder
from .baselines import QuantisedAutoencoder, RelaxedAutoencoder
from .decoders import Bernoulli, Gaussian, MLPDecoder, ResNetDecoder
from .encoder import ARTransformerEncoder
from .factorised import FactorisedEncoder


def build_model(cfg, pixel_shift=None, pixel_scale=None) -> LatentAutoencoder:
    """The autoencoder a :class:`dvae.config.Config` describes, for its ``method``."""
    image_shape = (cfg.channels, cfg.image_size, cfg.image_size)
    quantised = cfg.method in ("vq", "fsq")
    # VQ-VAE and FSQ hand the decoder vectors, not token ids: no embedding table there
    vocab = None if quantised else cfg.vocab_size
    if cfg.factorised:
        encoder: nn.Module = FactorisedEncoder(
            image_shape, cfg.latent_len, vocab, d_model=cfg.d_model, num_heads=cfg.num_heads,
            layers=cfg.na_layers, mlp_ratio=cfg.na_mlp_ratio)
    else:
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
        width = cfg.fsq_adapter_width if cfg.method == "fsq" else None
        decoder: nn.Module = MLPDecoder(image_shape, cfg.latent_len, vocab, cfg.d_model,
                                        list(cfg.mlp_hidden), m, input_dim=width)
    else:
        decoder = ResNetDecoder(image_shape, cfg.latent_len, vocab, cfg.d_model,
                                cfg.resnet_hidden, cfg.resnet_blocks, m)
    # Under autocast: the layers that produce log q and the likelihood parameters in float32
    # (the reference's precision), or in bf16 like the rest (faster; Config.fp32_outputs).
    decoder.fp32_output = cfg.fp32_outputs
    encoder.fp32_head = cfg.fp32_outputs
    if cfg.method in ("daps", "daps_na"):
        return DAPSAutoencoder(encoder, decoder, likelihood, eta_mode=cfg.eta_mode,
                               # eta_init=solve: set from the first batch (dvae.daps)
                               eta_init=100.0 if cfg.eta_init == "solve" else cfg.eta_init,
                               pixel_shift=pixel_shift,
                               pixel_scale=pixel_scale)
    if quantised:
        return QuantisedAutoencoder(cfg, encoder, decoder, likelihood,
                                    pixel_shift=pixel_shift, pixel_scale=pixel_scale)
    return RelaxedAutoencoder(encoder, decoder, likelihood,
                              estimator="grmck" if cfg.method.startswith("grmck") else "gumbel",
                              mc_samples=cfg.grmck_k, pixel_shift=pixel_shift,
                              pixel_scale=pixel_scale)
