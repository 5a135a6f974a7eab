"""Inputs for the node-pack tests: tiny InstantID adapters that fit the tiny ComfyUI models.

The published adapter's layer widths are those of the full-size UNet (640 / 1280 for SDXL); the
tiny models of ``instantid.testing.comfyui`` are narrower, so their adapter is built here with the real
structure (a Resampler from 512-d embeddings to 16 tokens of the real context width, one
``to_k_ip``/``to_v_ip`` pair per cross-attention layer in adapter order) and widths read from the
model. Random weights, depending only on the seed.
"""

from __future__ import annotations

import functools
import importlib
import types
from pathlib import Path
from typing import Any

import torch

from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.comfy.patch import attn2_patches
from instantid.face import load_face_analysis
from instantid.resampler import Resampler
from instantid.testing.adapter_files import RESAMPLER_SIZES
from instantid.testing.comfyui import Arch, ComfyUI, tiny_model_patcher, tiny_unet_config
from instantid.testing.face_images import faceless_crop, tagged_crop, to_comfy_image
from instantid.testing.face_models import build_antelopev2_like
from instantid.weights import InstantIDWeights


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


def identity_terms(model: Any) -> dict[Any, list[tuple[Any, ...]]]:
    """Every layer's identity terms: K, V, weight, mask and sigma window (all that a term's output depends on)."""
    return {
        key: [
            (term.kv.k, term.kv.v, term.weight, getattr(term.mask, "mask", term.mask), kwargs)
            for term, kwargs in zip(patch.callback, patch.kwargs, strict=True)
        ]
        for key, patch in sorted(attn2_patches(model.model_options).items())
    }


def same_terms(a: dict[Any, list[tuple[Any, ...]]], b: dict[Any, list[tuple[Any, ...]]]) -> bool:
    def same(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
        return bool(x == y)

    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k])
        and all(same(x, y) for ta, tb in zip(a[k], b[k], strict=True) for x, y in zip(ta, tb, strict=True))
        for k in a
    )


def face_embedding(seed: int, batch: int = 1) -> torch.Tensor:
    """A ``[batch, 512]`` embedding with an insightface-like norm (~20)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 512, generator=generator)


def face_image(left: int, top: int, size: int = 320, tag: int = 24) -> torch.Tensor:
    """A ComfyUI IMAGE ``[1, size, size, 3]`` with one face the test detector finds (``face_images.tagged_crop``)."""
    return to_comfy_image(tagged_crop(left, top, size, tag))


def faceless_image(size: int = 320) -> torch.Tensor:
    """A ComfyUI IMAGE of a crop of ``t1.jpg`` without a tag: the test detector finds no face in it."""
    return to_comfy_image(faceless_crop(size))


@functools.cache
def small_face_analysis(root: Path) -> Any:
    """insightface's FaceAnalysis on the small antelopev2-layout models written under ``root``."""
    return load_face_analysis(build_antelopev2_like(root), provider="CPU")


def pack_nodes(comfy: ComfyUI) -> types.ModuleType:
    """``instantid.comfy.nodes``, imported once ComfyUI is (it imports ComfyUI's ``folder_paths``)."""
    return importlib.import_module("instantid.comfy.nodes")


def no_cross_attention_patcher(comfy: ComfyUI) -> Any:
    """A tiny SD1.5-shaped ComfyUI model whose blocks hold no transformer at all."""
    unet_config = tiny_unet_config("sd15") | {
        "transformer_depth": [0] * 8,
        "transformer_depth_middle": -1,
        "transformer_depth_output": [0] * 12,
    }
    model = comfy.supported_models.SD15(unet_config).get_model({}, "")
    return comfy.ModelPatcher(model, load_device="cpu", offload_device="cpu")
