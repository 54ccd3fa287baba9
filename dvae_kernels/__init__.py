"""dvae_kernels: fused kernels for discrete-latent models trained by policy search (DAPS).

Ops (DESIGN.md §3), each with ``torch`` and ``triton`` backends (``cpu``/``cuda`` when the
C++/CUDA extension is built) and registered with ``torch.library``:

* :func:`token_logprobs` - per-token log-probabilities (and entropies) of sampled tokens.
* :func:`weighted_token_nll` - -Σ w·log p, the encoder's weighted maximum-likelihood loss.
* :func:`daps_weights` - the non-parametric target's importance weights and their ESS.
* :func:`solve_eta` - the trust-region temperature that sets the mean ESS, on device.

``python -m dvae_kernels.info`` reports versions, devices and each backend's availability.
"""

from ._dispatch import BACKENDS, BackendError
from .daps_weights import daps_weights
from .solve_eta import solve_eta
from .token_logprobs import token_logprobs
from .weighted_token_nll import WeightedTokenNLL, weighted_token_nll

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "WeightedTokenNLL",
    "daps_weights",
    "solve_eta",
    "token_logprobs",
    "weighted_token_nll",
]

from . import _native  # noqa: F401,E402  (registers the cpu/cuda backends into the ops)
