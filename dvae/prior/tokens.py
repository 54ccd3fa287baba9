"""The categories a prior models for one tokenizer: its code sequence as ``P`` positions of at
most ``V`` categories each.

Every method but FSQ hands the prior its ``L`` codes directly (``P = L``, ``V`` the codebook
size). FSQ's code is a mixed-radix number over its levels (vector-quantize-pytorch's index:
``code = Σ_j c_j·b_j`` with ``b_j = Π_{i<j} level_i``); as in the authors' code the prior sees
one category per FSQ dimension instead, ``c_j = (code // b_j) % level_j``, the positions ordered
token-major (``"b (k d)"``: position ``l·D + j`` is dimension j of token l), ``P = L·D``,
``V = max(levels)``, and the logits of position ``l·D + j`` masked to its ``level_j`` valid
categories.
"""

from __future__ import annotations

import math

import torch


class TokenSpace:
    """Maps a tokenizer's codes ``[N, L]`` to the prior's categories ``[N, P]`` and back.

    Args:
        latent_len: L, codes per image.
        codebook_size: codes per position (ignored with ``fsq_levels``).
        fsq_levels: FSQ's levels: one category per dimension, as above.
    """

    def __init__(self, latent_len: int, codebook_size: int,
                 fsq_levels: list[int] | tuple[int, ...] | None = None):
        if latent_len < 1:
            raise ValueError(f"latent_len must be >= 1, got {latent_len}")
        self.latent_len = latent_len
        self.levels = tuple(int(v) for v in fsq_levels) if fsq_levels else None
        if self.levels is not None:
            if any(v < 2 for v in self.levels):
                raise ValueError(f"fsq_levels must all be >= 2, got {list(self.levels)}")
            self.dims = len(self.levels)
            self.num_positions = latent_len * self.dims
            self.num_categories = max(self.levels)
            self.codebook_size = math.prod(self.levels)
            basis = [1]
            for v in self.levels[:-1]:
                basis.append(basis[-1] * v)
            self._basis = torch.tensor(basis)
            self._levels = torch.tensor(self.levels)
        else:
            if codebook_size < 2:
                raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
            self.dims = 1
            self.num_positions = latent_len
            self.num_categories = codebook_size
            self.codebook_size = codebook_size

    @classmethod
    def for_config(cls, cfg) -> TokenSpace:
        """The space of a tokenizer trained with :class:`dvae.config.Config` ``cfg``."""
        levels = list(cfg.fsq_levels) if cfg.method == "fsq" else None
        return cls(cfg.latent_len, cfg.codebook_size, levels)

    @property
    def counts(self) -> torch.Tensor:
        """``[P]`` int64: the number of valid categories of each position."""
        if self.levels is None:
            return torch.full((self.num_positions,), self.num_categories)
        return self._levels.repeat(self.latent_len)

    def mask(self, device=None) -> torch.Tensor | None:
        """``[P, V]`` bool, True where a category is valid; None when all are (not FSQ)."""
        if self.levels is None:
            return None
        counts = self.counts.to(device)
        return torch.arange(self.num_categories, device=device)[None, :] < counts[:, None]

    def to_categories(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[N, L]`` in ``[0, codebook_size)`` -> categories ``[N, P]`` int64."""
        if codes.dim() != 2 or codes.shape[1] != self.latent_len:
            raise ValueError(f"codes must be [N, {self.latent_len}], got {tuple(codes.shape)}")
        codes = codes.long()
        if self.levels is None:
            return codes
        basis = self._basis.to(codes.device)
        levels = self._levels.to(codes.device)
        cats = (codes[..., None] // basis) % levels  # [N, L, D]
        return cats.reshape(codes.shape[0], self.num_positions)

    def to_codes(self, categories: torch.Tensor) -> torch.Tensor:
        """categories ``[N, P]`` (each within its position's count) -> codes ``[N, L]``."""
        if categories.dim() != 2 or categories.shape[1] != self.num_positions:
            raise ValueError(f"categories must be [N, {self.num_positions}], got "
                             f"{tuple(categories.shape)}")
        categories = categories.long()
        if self.levels is None:
            return categories
        cats = categories.view(-1, self.latent_len, self.dims)
        return (cats * self._basis.to(cats.device)).sum(-1)

    def uniform(self, n: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
        """``[n, P]`` categories drawn uniformly over each position's valid ones (the flow's
        source z₀)."""
        device = device if device is not None else (generator.device if generator else "cpu")
        u = torch.rand((n, self.num_positions), generator=generator, device=device)
        counts = self.counts.to(device)
        return torch.minimum((u * counts).long(), counts - 1)

    def describe(self) -> str:
        if self.levels is None:
            return f"{self.num_positions} positions of {self.num_categories} codes"
        return (f"{self.latent_len} tokens x {self.dims} FSQ dimensions = {self.num_positions} "
                f"positions of up to {self.num_categories} levels {list(self.levels)}")
