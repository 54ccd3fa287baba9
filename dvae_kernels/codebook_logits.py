"""codebook_logits: the linear layer whose softmax is the codebook-distance distribution.

    log softmax(-‖h - c_v‖² / τ)_v  ==  log softmax(h @ weight.T + bias)_v
    with  weight = 2·codebook / τ  [V, D],  bias = -‖c_v‖² / τ  [V]

so stochastic vector quantisation and dVAE encoders whose logits are negative squared
distances to a codebook get fused log-probabilities, entropies, sampling and weighted
likelihoods (the ``linear_*`` ops, :class:`~dvae_kernels.nn.FusedCategoricalHead`) without the
``[N, V]`` distance matrix.
"""

from __future__ import annotations

import torch

from . import _validate


def codebook_logits(codebook: torch.Tensor, tau=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [V, D], bias [V])`` such that ``F.linear(h, weight, bias)`` differs from
    ``-‖h - c_v‖² / τ`` only by a per-row constant, so both give the same softmax.

    Args:
        codebook: ``[V, D]`` float32, bfloat16, float16 or float64, one code vector per row.
        tau: the temperature τ > 0, a float or a 0-d tensor (may require a gradient).

    Returns:
        ``weight = 2·codebook / τ`` and ``bias = -‖c_v‖²/τ`` in the codebook's dtype (the
        squared norms are summed in float32, or float64 for a float64 codebook).
        Differentiable in ``codebook`` and ``tau``: gradients reach the codebook through the
        fused ops.

    Equivalent PyTorch (materialised)::

        logits = -torch.cdist(h, codebook) ** 2 / tau          # [N, V]
        logp = torch.log_softmax(logits, -1)

    Why ‖h‖² cancels. ``-‖h - c‖²/τ = (-‖h‖² + 2 h·c - ‖c‖²)/τ``; the first term is the same
    for every code v of a row, and softmax is invariant to adding a constant to a row, so it
    drops out of log-probabilities, entropies and samples exactly (not approximately).

    Why what is left is well conditioned. A materialised distance, whether formed as
    ‖h‖² - 2 h·c + ‖c‖² (``torch.cdist``'s matmul path) or as Σ (h - c)², is a number of size
    ‖h - c‖², so it carries a rounding error of order ε·‖h - c‖²/τ; when the encoder output is
    far from a tight codebook that is ε·‖h‖²/τ, while the softmax depends only on the
    differences between codes, which are much smaller. Without the ‖h‖² term each logit is
    2 h·c_v/τ - ‖c_v‖²/τ with an error of order ε·(2‖h‖·‖c_v‖ + ‖c_v‖²)/τ: a factor of about
    ‖h‖/‖c‖ smaller. The kernels then subtract the row maximum before exponentiating (no
    overflow however large the logits). tests/test_nn.py measures it in float32 at ‖h‖ ≈ 570,
    ‖c‖ ≈ 5.7: the fused path's error against float64 is more than ten times smaller than
    ``torch.cdist``'s.
    """
    _validate.check_float("codebook", codebook)
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be [V, D], got {_validate.describe(codebook)}")
    t = _validate.scalar("tau", tau, codebook.device, minimum=0.0, strict=True)
    acc = torch.float64 if codebook.dtype == torch.float64 else torch.float32
    # A float τ stays a Python float (a float32 0-d tensor would round 0.1 before dividing).
    inv_tau = 1.0 / (t.to(acc) if isinstance(tau, torch.Tensor) else float(tau))
    sq_norm = codebook.to(acc).square().sum(-1)
    weight = (codebook.to(acc) * (2.0 * inv_tau)).to(codebook.dtype)
    bias = (-sq_norm * inv_tau).to(codebook.dtype)
    return weight, bias
