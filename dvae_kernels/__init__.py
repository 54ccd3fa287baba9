"""dvae_kernels: fused kernels for discrete-latent models trained by policy search (DAPS).

Ops (docs/conventions.md), each with ``torch`` and ``triton`` backends (``cpu``/``cuda`` when the
C++/CUDA extension is built) and registered with ``torch.library``:

* :func:`token_logprobs` - per-token log-probabilities (and entropies) of sampled tokens.
* :func:`weighted_token_nll` - -Σ w·log p, the encoder's weighted maximum-likelihood loss.
* :func:`daps_weights` - the non-parametric target's importance weights and their ESS.
* :func:`solve_eta` - the trust-region temperature that sets the mean ESS, on device.
* :func:`linear_token_logprobs`, :func:`linear_weighted_token_nll` - the same straight from
  hidden states and the output layer, never materialising the [..., V] logits.
* :func:`sample_tokens`, :func:`linear_sample_tokens` - one-pass Gumbel-max sampling with a
  counter-based random stream (same samples on every backend for a seed).

Drop-in paths for other models (built on the linear ops):

* :class:`~dvae_kernels.nn.FusedCategoricalHead` - ``nn.Linear(D, V)``-compatible output head
  with ``log_prob``, ``entropy``, ``sample`` and ``weighted_nll``; loss modules in
  :mod:`dvae_kernels.nn`.
* :func:`codebook_logits` - the (weight, bias) whose softmax is the codebook-distance
  distribution ``softmax(-‖h - c‖²/τ)`` (stochastic VQ, dVAE tokenizers).
* :func:`causal_lm_token_logprobs` - shifted, padding-masked token log-probabilities and
  entropies of a causal LM (PPO/GRPO), from its hidden states and LM head.
* :mod:`dvae_kernels.policy` - fused policy losses for LLM RL from hidden states and the LM
  head: ``grpo_loss``, ``ppo_loss`` and ``daps_policy_loss`` (the DAPS update on K
  completions per prompt).

Transformer-decoding kernels (the autoregressive sampler's, where launches cost more than the
work; no backward of their own, the torch backend serves differentiable calls):

* :func:`decode_attention` - write one position into a KV cache and attend to the slots so
  far, the position read from device memory (CUDA-graph safe).
* :func:`add_layer_norm`, :func:`embed_add_layer_norm`, :func:`linear_add_layer_norm` - a
  residual add (after an embedding lookup or a projection) with the LayerNorm after it.
* :func:`attention` - scaled dot-product attention with a C++ CPU kernel for small heads.

``python -m dvae_kernels.info`` prints versions, devices and an op × backend × device table.
"""

from . import policy  # noqa: E402  (grpo_loss, ppo_loss, daps_policy_loss)
from ._dispatch import BACKENDS, BackendError
from ._validate import no_value_checks
from .add_layer_norm import add_layer_norm, embed_add_layer_norm
from .attention import attention
from .causal_lm_token_logprobs import causal_lm_token_logprobs
from .codebook_logits import codebook_logits
from .daps_weights import daps_weights
from .decode_attention import decode_attention
from .linear_add_layer_norm import linear_add_layer_norm
from .linear_sample_tokens import linear_sample_tokens
from .linear_token_logprobs import linear_token_logprobs
from .linear_weighted_token_nll import LinearWeightedTokenNLL, linear_weighted_token_nll
from .nn import FusedCategoricalHead, LinearCrossEntropyLoss
from .sample_tokens import sample_tokens
from .solve_eta import solve_eta
from .token_logprobs import token_logprobs
from .weighted_token_nll import WeightedTokenNLL, weighted_token_nll

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "add_layer_norm",
    "attention",
    "decode_attention",
    "embed_add_layer_norm",
    "linear_add_layer_norm",
    "BackendError",
    "FusedCategoricalHead",
    "LinearCrossEntropyLoss",
    "LinearWeightedTokenNLL",
    "WeightedTokenNLL",
    "causal_lm_token_logprobs",
    "codebook_logits",
    "daps_weights",
    "linear_sample_tokens",
    "linear_token_logprobs",
    "linear_weighted_token_nll",
    "no_value_checks",
    "policy",
    "sample_tokens",
    "solve_eta",
    "token_logprobs",
    "weighted_token_nll",
]


