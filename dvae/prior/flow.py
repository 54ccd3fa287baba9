"""Discrete flow matching with a uniform source (the authors' ``image_label_df_model.py``):
the training path and the Euler sampler.

Path: ``z₀`` uniform over each position's valid categories, ``z₁`` the tokenizer's categories
of a training image, ``t ~ U(0, 1)`` per image, and ``z_t`` equal to ``z₁`` at each position
with probability ``t`` (an independent ``U(0, 1)`` below ``t``), else to ``z₀``.

Sampler: from ``z`` uniform at ``t = 0``, ``n = 1/dt`` Euler steps; at step ``i`` (``t = i·dt``)

    u = (p(z₁ | z_t, t, label) − onehot(z_t)) / (1 − t)
    z_{t+dt} ~ Categorical(onehot(z_t) + dt·u)

written here as the same distribution ``(1 − c)·onehot(z_t) + c·p`` with ``c = dt / (1 − t)
= 1/(n − i)``, which at the last step is ``p`` itself (no division by a vanishing ``1 − t``,
no negative weight from float rounding). The draws go through :func:`dvae_kernels.
sample_tokens` with the run's generator.

Deliberate differences from the authors' code, both with a reason:

* ``t`` is ``i·dt`` per step rather than a float32 running sum (the same numbers up to its
  rounding, which at the last step can make ``dt·u`` overshoot and a weight negative);
* for FSQ the sampler starts from the masked uniform source the prior is trained on; the
  authors' sampler starts from the unmasked one, feeding the network at early steps
  categories (levels beyond a dimension's own) it never saw in training.

Classifier-free guidance (not in the authors' code; ``guidance = 0`` is their sampler):
``logits = cond + w·(cond − uncond)``, the unconditional logits from the null label the
network learned through label dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import dvae_kernels

from .tokens import TokenSpace


def euler_steps(dt: float) -> int:
    """The number of Euler steps ``n = 1/dt``; ``dt`` must divide 1."""
    if not (isinstance(dt, (int, float)) and 0 < dt <= 1):
        raise ValueError(f"dt must be in (0, 1], got {dt!r}")
    n = round(1.0 / dt)
    if abs(n * dt - 1.0) > 1e-9:
        raise ValueError(f"dt must divide 1 (1/dt Euler steps from t=0 to 1), got {dt}")
    return n


def sample_path(z1: torch.Tensor, space: TokenSpace, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_t [N, P], t [N])`` for the categories ``z1 [N, P]``: three draws from
    ``generator`` in this order: ``z₀`` (:meth:`TokenSpace.uniform`), ``t`` ``[N]``, and the
    per-position ``U(0, 1)`` ``[N, P]`` compared with ``t``."""
    n = z1.shape[0]
    z0 = space.uniform(n, generator, z1.device)
    t = torch.rand(n, generator=generator, device=z1.device)
    keep = torch.rand(z1.shape, generator=generator, device=z1.device) < t[:, None]
    return torch.where(keep, z1, z0), t


def drop_labels(labels: torch.Tensor, probability: float, null_label: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label replaced by ``null_label`` with ``probability`` (classifier-free guidance's
    training-time dropout): one ``U(0, 1)`` per label from ``generator``."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def guided_logits(logits_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float,
                  null_label: int) -> torch.Tensor:
    """``logits_fn(z, t, labels)``, or with ``guidance = w != 0`` the classifier-free guided
    ``cond + w·(cond − uncond)`` (one call on the doubled batch). Masked entries (-inf) stay
    -inf."""
    if guidance == 0:
        return logits_fn(z, t, labels)
    both = logits_fn(torch.cat([z, z]), torch.cat([t, t]),
                     torch.cat([labels, torch.full_like(labels, null_label)]))
    cond, uncond = both.chunk(2)
    guided = cond + guidance * (cond - uncond)
    return torch.where(torch.isinf(cond), cond, guided)  # -inf - -inf is NaN, not -inf


def transition_logits(logits: torch.Tensor, z: torch.Tensor, step: int, steps: int
                      ) -> torch.Tensor:
    """Log-probabilities ``[B, P, V]`` of ``z_{t+dt}`` at Euler step ``step`` of ``steps``:
    ``log((1 − c)·onehot(z) + c·softmax(logits))``, ``c = 1/(steps − step)``."""
    c = 1.0 / (steps - step)
    probs = torch.softmax(logits.float(), dim=-1) * c
    stay = torch.full(z.shape + (1,), 1.0 - c, dtype=probs.dtype, device=probs.device)
    return probs.scatter_add_(-1, z[..., None], stay).log()  # no [.., V] one-hot built


@torch.no_grad()
def euler_sample(logits_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 labels: torch.Tensor, space: TokenSpace, *, dt: float = 0.025,
                 guidance: float = 0.0, null_label: int | None = None,
                 generator: torch.Generator | None = None, backend: str | None = None,
                 trajectory: list | None = None) -> torch.Tensor:
    """Categories ``[B, P]`` sampled for ``labels [B]``.

    Args:
        logits_fn: ``(z [B, P], t [B], labels [B]) -> logits [B, P, V]`` of ``p(z₁ | z_t)``
            (:meth:`FlowTransformer.logits`).
        labels: the requested labels.
        space: the prior's categories (the source is uniform over each position's).
        dt: the Euler step; ``1/dt`` steps.
        guidance: classifier-free guidance weight (0: none; needs ``null_label``).
        generator: the random stream (the source, then one draw per step).
        backend: ``dvae_kernels.sample_tokens``'s backend.
        trajectory: if a list, ``z`` before each step and the final ``z`` are appended.
    """
    steps = euler_steps(dt)
    if guidance and null_label is None:
        raise ValueError("guidance needs null_label (the network's unconditional label)")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite float, got {guidance}")
    device = labels.device
    z = space.uniform(labels.shape[0], generator, device)
    for i in range(steps):
        if trajectory is not None:
            trajectory.append(z)
        t = torch.full((labels.shape[0],), i * dt, device=device)
        logits = guided_logits(logits_fn, z, t, labels, guidance, null_label)
        z, _ = dvae_kernels.sample_tokens(transition_logits(logits, z, i, steps),
                                          generator=generator, backend=backend)
    if trajectory is not None:
        trajectory.append(z)
    return z
