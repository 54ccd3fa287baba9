"""Cutting images into a near-square grid of flat patches, and back (the reference's layout).

P patches form a ``gh x gw`` grid with gh the largest divisor of P not above sqrt(P). Without
an explicit patch size, a patch is ``ceil(H/gh) x ceil(W/gw)`` rounded up to even sides and the
image is zero-padded, centred, to the grid (MNIST, P=8: 2x4 patches of 14x8 on a 28x32 canvas).
"""

from __future__ import annotations

import math

import torch


def near_square_grid(num_patches: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == num_patches and rows the largest divisor <= sqrt."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    rows = max(r for r in range(1, math.isqrt(num_patches) + 1) if num_patches % r == 0)
    return rows, num_patches // rows


def _round_up_even(x: int) -> int:
    return x if x % 2 == 0 else x + 1


class Patcher:
    """``patchify``: [N, C, H, W] -> [N, P, ph*pw*C]; ``crop``: padded canvas -> [.., H, W]."""

    def __init__(self, height: int, width: int, channels: int, num_patches: int):
        self.height, self.width, self.channels = height, width, channels
        self.grid = near_square_grid(num_patches)
        gh, gw = self.grid
        ph, pw = math.ceil(height / gh), math.ceil(width / gw)
        if ph > 1:
            ph = _round_up_even(ph)
        if pw > 1:
            pw = _round_up_even(pw)
        self.patch_size = (ph, pw)
        self.canvas = (gh * ph, gw * pw)
        self.pad_top = (self.canvas[0] - height) // 2
        self.pad_left = (self.canvas[1] - width) // 2

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.channels

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        top, left = self.pad_top, self.pad_left
        bottom = self.canvas[0] - self.height - top
        right = self.canvas[1] - self.width - left
        if top == bottom == left == right == 0:
            return x
        return torch.nn.functional.pad(x, (left, right, top, bottom))

    def crop(self, canvas: torch.Tensor) -> torch.Tensor:
        return canvas[..., self.pad_top:self.pad_top + self.height,
                      self.pad_left:self.pad_left + self.width]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, self.height, self.width):
            raise ValueError(f"x must be [N, {self.channels}, {self.height}, {self.width}], got "
                             f"shape {tuple(x.shape)}")
        N = x.shape[0]
        (gh, gw), (ph, pw) = self.grid, self.patch_size
        x = self.pad(x).view(N, self.channels, gh, ph, gw, pw)
        # patch-major, then (row, col, channel) inside the patch
        return x.permute(0, 2, 4, 3, 5, 1).reshape(N, gh * gw, ph * pw * self.channels)
