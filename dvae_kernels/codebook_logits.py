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

    Why what is left is well conditioned. Computing the distances first and then the softmax
    forms ‖h‖² - 2 h·c + ‖c‖²: when ‖h‖ is large against the distances between codes (an
    encoder output far from a tight codebook), the differences that decide the softmax are small
    remainders of large cancelling terms, and their rounding error is of order
    ε·‖h‖²/τ. Without the ‖h‖² term each logit carries an error of order
    ε·(2‖h‖·‖c_v‖ + ‖c_v‖²)/τ, the error of a plain linear layer with these parameters, and the
    kernels subtract the row maximum before exponentiating (no overflow however large the
    logits). The term that is removed is the largest one, and it was pure rounding noise.
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
