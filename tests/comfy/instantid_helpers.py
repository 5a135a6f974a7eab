"""Inputs for the node-pack tests: tiny InstantID adapters that fit the tiny ComfyUI models.

The published adapter's layer widths are those of the full-size UNet (640 / 1280 for SDXL); the
tiny models of ``tests.comfy.comfyui`` are narrower, so their adapter is built here with the real
structure (a Resampler from 512-d embeddings to 16 tokens of the real context width, one
``to_k_ip``/``to_v_ip`` pair per cross-attention layer in adapter order) and widths read from the
model. Random weights, depending only on the seed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from bench.adapter_files import RESAMPLER_SIZES
from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.resampler import Resampler
from instantid.weights import InstantIDWeights
from tests.comfy.comfyui import Arch, ComfyUI, tiny_model_patcher


def tiny_adapter(patcher: Any, arch: str, seed: int = 0, scale: float = 0.05) -> InstantIDWeights:
    """An ``InstantIDWeights`` (what the loader node returns) sized for ``patcher``'s cross-attention layers."""
    sites = cross_attention_sites(diffusion_model_of(patcher))
    context = sites[0].context_dim
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = Resampler(**RESAMPLER_SIZES["small"], output_dim=context).state_dict()
    image_proj = {
        key: torch.randn(meta.shape, generator=generator) * scale + (1.0 if key.endswith("weight") and meta.ndim == 1 else 0.0)
        for key, meta in shapes.items()
    }

    def draw(site_width: int) -> torch.Tensor:
        return torch.randn(site_width, context, generator=generator) * scale

    return InstantIDWeights(
        image_proj=image_proj,
        to_k_ip=tuple(draw(site.hidden_size) for site in sites),
        to_v_ip=tuple(draw(site.hidden_size) for site in sites),
        arch=arch,
        cross_attention_dim=context,
        hidden_sizes=tuple(site.hidden_size for site in sites),
    )


@functools.cache
def shared_patcher(comfy: ComfyUI, arch: Arch) -> Any:
    """One tiny ``arch`` ModelPatcher per process, for tests that never change it (they clone it)."""
    return tiny_model_patcher(comfy, arch)


@functools.cache
def shared_adapter(comfy: ComfyUI, arch: Arch) -> InstantIDWeights:
    """The tiny adapter for :func:`shared_patcher` (seed 0), built once per process."""
    return tiny_adapter(shared_patcher(comfy, arch), arch)


def face_embedding(seed: int, batch: int = 1) -> torch.Tensor:
    """A ``[batch, 512]`` embedding with an insightface-like norm (~20)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 512, generator=generator)
