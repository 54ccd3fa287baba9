"""dvae: discrete-latent autoencoders (image tokenizers) trained with DAPS, "Discrete
Autoencoding via Policy Search" (Drolet et al., ICLR 2026), on the dvae_kernels ops.

    dvae train                          # scikit-learn digits, a few minutes on a CPU
    dvae train --config mnist data_path=/path/to/mnist.npz
    dvae eval --checkpoint runs/digits/checkpoint.pt
    dvae reconstruct --checkpoint runs/digits/checkpoint.pt --out recon.png

Modules: :mod:`dvae.models` (encoder, decoders, likelihoods), :mod:`dvae.daps` (the objective),
:mod:`dvae.train_step` (one step), :mod:`dvae.trainer` (the loop), :mod:`dvae.bench_api`.
"""

from .config import PRESETS, Config, load_config

__all__ = ["PRESETS", "Config", "load_config"]
