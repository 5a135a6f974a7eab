"""Attention masks resized to a layer's token grid, for latents of any size and aspect ratio.

A UNet layer sees the latent ``[B, C, H, W]`` downsampled k times by stride-2 convolutions with
padding 1, each of which maps a side ``s`` to ``ceil(s / 2)``; its queries are that grid
flattened row-major. :func:`token_grid` finds the ``(h, w)`` whose product is the layer's token
count, so odd sizes and extreme aspect ratios map exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def token_grid(num_tokens: int, original_shape: Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` of the layer grid with ``num_tokens`` queries for a latent of ``original_shape`` (``[..., H, W]``).

    Raises ``ValueError`` when no number of halvings of ``H x W`` gives ``num_tokens``.
    """
    height, width = int(original_shape[-2]), int(original_shape[-1])
    h, w = height, width
    while h * w > num_tokens and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != num_tokens:
        raise ValueError(
            f"a layer with {num_tokens} query tokens does not match a latent of {height}x{width}: "
            "expected the latent size halved (rounding up) some number of times"
        )
    return h, w


def resize_mask(mask: Tensor, num_tokens: int, original_shape: Sequence[int]) -> Tensor:
    """``mask`` (``[H, W]`` or ``[M, H, W]``, values in 0..1) as ``[M, num_tokens]`` on the layer's token grid.

    Resized with antialiased bilinear filtering, so a downsampled mask keeps each cell's coverage.
    Raises ``ValueError`` for a mask of another rank or a grid that does not match (see :func:`token_grid`).
    """
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"expected a mask of shape [H, W] or [M, H, W], got {list(mask.shape)}")
    h, w = token_grid(num_tokens, original_shape)
    resized = F.interpolate(mask.unsqueeze(1).float(), size=(h, w), mode="bilinear", antialias=True)
    return resized.reshape(mask.shape[0], h * w)


class LayerMasks:
    """One mask and its resized versions, computed once per (token count, latent size, device, dtype).

    Hand this to :func:`instantid.attention.identity_attention` instead of a bare tensor when the
    same mask serves many layers and steps: each layer grid is resized (and moved to the
    queries' device) once instead of on every call. Immutable as far as callers can tell:
    ``copy``/``deepcopy`` return the same object, and ``__cow_shared__`` lets ``cow_copy`` share it.
    Raises ``ValueError`` at construction for a mask of another rank.
    """

    __cow_shared__ = True

    def __init__(self, mask: Tensor) -> None:
        if mask.ndim not in (2, 3):
            raise ValueError(f"expected a mask of shape [H, W] or [M, H, W], got {list(mask.shape)}")
        self.mask = mask
        self._grids: dict[tuple[int, int, int, str, str], Tensor] = {}

    def __copy__(self) -> LayerMasks:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> LayerMasks:
        return self

    def for_layer(self, num_tokens: int, original_shape: Sequence[int], like: Tensor) -> Tensor:
        """``[M, num_tokens]`` on ``like``'s device in its dtype (see :func:`resize_mask`)."""
        key = (
            num_tokens,
            int(original_shape[-2]),
            int(original_shape[-1]),
            str(like.device),
            str(like.dtype),
        )
        grid = self._grids.get(key)
        if grid is None:
            grid = resize_mask(self.mask, num_tokens, original_shape).to(device=like.device, dtype=like.dtype)
            self._grids[key] = grid
        return grid
