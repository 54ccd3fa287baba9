"""dvae: discrete-latent autoencoders (image tokenizers) trained with DAPS, "Discrete
Autoencoding via Policy Search" (Drolet et al., ICLR 2026), on the dvae_kernels ops.

    dvae train                          # scikit-learn digits, a few minutes on a CPU
    dvae train --config mnist data_path=/path/to/mnist.npz
    dvae eval --checkpoint runs/digits/checkpoint.pt
    dvae reconstruct --checkpoint runs/digits/checkpoint.pt --out recon.png

Modules: :mod:`dvae.models` (encoder, decoders, likelihoods), :mod:`dvae.daps` (the objective),
:mod:`dvae.train_step` (one step), :mod:`dvae.trainer` (the loop), :mod:`dvae.bench_api`.
"""

__all__ = ["PRESETS", "Config", "load_config"]


def __getattr__(name: str):
    # Lazy, so that `dvae.cli` can start (and name the missing package in one line) where
    # the training extra is not installed: dvae.config needs pyyaml.
    if name in __all__:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'dvae' has no attribute {name!r}")
