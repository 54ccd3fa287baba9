"""dvae_kernels: fused kernels for discrete-latent models trained by policy search (DAPS).

Ops (DESIGN.md §3), each with ``torch`` and ``triton`` backends (``cpu``/``cuda`` when the
C++/CUDA extension is built) and registered with ``torch.library``:

* :func:`token_logprobs` - per-token log-probabilities (and entropies) of sampled tokens.
* :func:`weighted_token_nll` - -Σ w·log p, the encoder's weighted maximum-likelihood loss.
* :func:`daps_weights` - the non-parametric target's importance weights and their ESS.
* :func:`solve_eta` - the trust-region temperature that sets the mean ESS, on device.
* :func:`linear_token_logprobs`, :func:`linear_weighted_token_nll` - the same straight from
  hidden states and the output layer, never materialising the [..., V] logits.
* :func:`sample_tokens`, :func:`linear_sample_tokens` - one-pass Gumbel-max sampling with a
  counter-based random stream (same samples on every backend for a seed).

``python -m dvae_kernels.info`` reports versions, devices and each backend's availability.
"""

from ._dispatch import BACKENDS, BackendError
from ._validate import no_value_checks
from .daps_weights import daps_weights
from .linear_sample_tokens import linear_sample_tokens
from .linear_token_logprobs import linear_token_logprobs
from .linear_weighted_token_nll import LinearWeightedTokenNLL, linear_weighted_token_nll
from .sample_tokens import sample_tokens
from .solve_eta import solve_eta
from .token_logprobs import token_logprobs
from .weighted_token_nll import WeightedTokenNLL, weighted_token_nll

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "LinearWeightedTokenNLL",
    "WeightedTokenNLL",
    "daps_weights",
    "linear_sample_tokens",
    "linear_token_logprobs",
    "linear_weighted_token_nll",
    "no_value_checks",
    "sample_tokens",
    "solve_eta",
    "token_logprobs",
    "weighted_token_nll",
]

from . import _native  # noqa: F401,E402  (registers the cpu/cuda backends into the ops)
