"""Models: the autoregressive encoder, the decoders, the pixel likelihoods, and their
assembly into the DAPS autoencoder (:class:`DAPSAutoencoder`)."""

from .autoencoder import DAPSAutoencoder
from .build import build_model
from .decoders import Bernoulli, Gaussian, MLPDecoder, ResNetDecoder
from .encoder import ARTransformerEncoder
from .patches import Patcher

__all__ = [
    "ARTransformerEncoder",
    "Bernoulli",
    "DAPSAutoencoder",
    "Gaussian",
    "MLPDecoder",
    "Patcher",
    "ResNetDecoder",
    "build_model",
]
