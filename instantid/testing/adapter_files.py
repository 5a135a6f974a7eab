"""Write random InstantID adapter files in the published layouts (for benches and tests; no real weights).

``write_random_adapter`` writes a complete adapter: ``arch="sdxl"`` (70 layers, 2048-d, ~420 M
parameters: ~1.7 GB in float32) or ``"sd15"`` (16 layers, 768-d); ``resampler="small"`` shrinks
the Resampler to width 128 (depth 4, 2 heads) for fast tests while keeping the layer tensors
full size. ``random_adapter_state`` returns the two groups so a test can break them before
``write_adapter`` writes them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from instantid.layout import ARCHS, cross_attention_layers
from instantid.resampler import Resampler

Format = Literal["safetensors", "bin"]

RESAMPLER_SIZES: dict[str, dict[str, int]] = {
    "full": {"dim": 1280, "depth": 4, "heads": 20, "ff_mult": 4},
    "small": {"dim": 128, "depth": 4, "heads": 2, "ff_mult": 4},
}


def random_adapter_state(
    arch: str = "sdxl",
    *,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    scale: float = 0.02,
    resampler: Literal["full", "small"] = "full",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(image_proj, ip_adapter)`` state dicts (keys without the group prefix) drawn from ``seed``.

    Weights are N(0, scale); LayerNorm weights are 1 + N(0, scale), so the Resampler's output is O(1).
    ``scale=0`` gives constant tensors (zeros, LayerNorm weights 1) without drawing.
    """
    generator = torch.Generator().manual_seed(seed)
    cross_dim = ARCHS[arch]["cross_attention_dim"]
    with torch.device("meta"):
        shapes = Resampler(**RESAMPLER_SIZES[resampler], output_dim=cross_dim).state_dict()

    def draw(shape: torch.Size | tuple[int, ...], mean: float = 0.0) -> Tensor:
        if scale == 0:  # constant tensors: fast, for tests that need only the shapes
            return torch.full(shape, mean, dtype=dtype)
        return (torch.randn(shape, generator=generator) * scale + mean).to(dtype)

    image_proj = {}
    for key, meta in shapes.items():
        is_norm_weight = key.endswith("weight") and meta.ndim == 1
        image_proj[key] = draw(meta.shape, 1.0 if is_norm_weight else 0.0)
    ip_adapter = {}
    for layer in cross_attention_layers(arch):
        for kv in "kv":
            ip_adapter[f"{2 * layer.index + 1}.to_{kv}_ip.weight"] = draw((layer.hidden_size, cross_dim))
    return image_proj, ip_adapter


def write_adapter(
    path: str | os.PathLike[str], image_proj: dict[str, Tensor], ip_adapter: dict[str, Tensor], fmt: Format
) -> Path:
    """Write the two groups as ``fmt``: a nested torch pickle (``bin``) or prefixed safetensors."""
    path = Path(path)
    if fmt == "bin":
        torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
        flat.update({f"ip_adapter.{k}": v for k, v in ip_adapter.items()})
        save_file({k: v.contiguous() for k, v in flat.items()}, path)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected 'safetensors' or 'bin'")
    return path


def write_random_adapter(
    path: str | os.PathLike[str],
    arch: str = "sdxl",
    fmt: Format = "safetensors",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    scale: float = 0.02,
    resampler: Literal["full", "small"] = "full",
) -> Path:
    """Write a random adapter of ``arch`` to ``path`` in ``fmt``; returns the path."""
    image_proj, ip_adapter = random_adapter_state(
        arch, dtype=dtype, seed=seed, scale=scale, resampler=resampler
    )
    return write_adapter(path, image_proj, ip_adapter, fmt)
