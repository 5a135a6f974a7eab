"""Token grids and mask resizing for latents of any size (property-based)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from instantid.masks import resize_mask, token_grid


def _halve(h, w, times):
    for _ in range(times):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 4))
def test_token_grid_inverts_the_unet_downsampling(height, width, times):
    h, w = _halve(height, width, times)
    # the grid is unique: each halving of a grid larger than 1x1 shrinks its area
    assert token_grid(h * w, [2, 4, height, width]) == (h, w)


@given(st.integers(2, 200), st.integers(2, 200))
def test_token_counts_of_no_level_are_refused(height, width):
    areas = {height * width}
    h, w = height, width
    while h * w > 1:
        h, w = _halve(h, w, 1)
        areas.add(h * w)
    missing = next(n for n in range(1, height * width + 2) if n not in areas)
    with pytest.raises(
        ValueError, match=f"a layer with {missing} query tokens does not match a latent of {height}x{width}"
    ):
        token_grid(missing, [1, 4, height, width])


@given(st.integers(1, 4), st.integers(1, 4), st.floats(0.0, 1.0))
def test_downsampled_mask_keeps_coverage(rows, cols, fill):
    # a mask whose left `fill` fraction is set, on a 64*rows x 64*cols image, onto an 8*rows x 8*cols grid
    mask = torch.zeros(64 * rows, 64 * cols)
    mask[:, : round(fill * mask.shape[1])] = 1.0
    grid = resize_mask(mask, 64 * rows * cols, [1, 4, 8 * rows, 8 * cols])
    assert grid.shape == (1, 64 * rows * cols)
    assert grid.min() >= 0 and grid.max() <= 1
    assert grid.mean().item() == pytest.approx(mask.mean().item(), abs=0.03)
