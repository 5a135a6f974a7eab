"""Where a ComfyUI UNet carries cross-attention, and which adapter layer serves each place.

ComfyUI keys an attn2 replace patch ``(block_name, block_number, transformer_index)``: the block
is ``("input", i)``, ``("middle", 0)`` or ``("output", i)`` and the transformer index counts the
transformer blocks inside that block's ``SpatialTransformer``. The InstantID adapter numbers its
cross-attention layers in diffusers' ``attn_processors`` order: down blocks, up blocks, then the
mid block, which is ComfyUI's input blocks, output blocks, then the middle block.

``cross_attention_sites`` derives that layout by walking the model itself (any UNet in ComfyUI's
``UNetModel`` layout: SD1.5, SD2, SDXL, ...), so nothing here hard-codes an architecture. It only
reads the model; nothing is copied or changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from instantid.comfy.errors import InstantIDNodeError

BlockKey = tuple[str, int, int]


class NoCrossAttentionError(InstantIDNodeError):
    """The model has no cross-attention layer that an identity could be attached to."""


@dataclass(frozen=True)
class CrossAttentionSite:
    """One cross-attention layer of a UNet.

    ``key`` is ComfyUI's attn2 patch key; ``adapter_layer`` the 0-based index of the adapter layer
    serving it (the adapter's state dict calls it ``module_key``: ``2 * adapter_layer + 1``);
    ``hidden_size`` the width of the layer's queries and output; ``context_dim`` the width of the
    text context its keys and values are projected from.
    """

    key: BlockKey
    adapter_layer: int
    hidden_size: int
    context_dim: int

    @property
    def module_key(self) -> str:
        """The adapter's own name for this layer (``"1"``, ``"3"``, ...)."""
        return str(2 * self.adapter_layer + 1)


def diffusion_model_of(model: Any) -> torch.nn.Module:
    """The UNet inside a ComfyUI ``ModelPatcher`` (``model.model.diffusion_model``).

    Raises ``NoCrossAttentionError`` when ``model`` holds no such module.
    """
    base = getattr(model, "model", None)
    unet = getattr(base, "diffusion_model", None)
    if not isinstance(unet, torch.nn.Module):
        raise NoCrossAttentionError(
            f"expected a ComfyUI MODEL (a ModelPatcher whose .model.diffusion_model is a UNet), "
            f"got {type(model).__name__}"
        )
    return unet


def _transformer_stacks(block: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The modules inside ``block`` that hold a ``transformer_blocks`` list (ComfyUI's SpatialTransformer)."""
    for module in block.modules():
        if isinstance(getattr(module, "transformer_blocks", None), torch.nn.ModuleList):
            yield module


def _sites_in(
    block_name: str, blocks: Iterable[tuple[int, torch.nn.Module]]
) -> Iterator[tuple[BlockKey, torch.nn.Module]]:
    for number, block in blocks:
        for stack in _transformer_stacks(block):
            transformers: torch.nn.ModuleList = stack.transformer_blocks  # type: ignore[assignment]
            for index, transformer in enumerate(transformers):
                attn2 = getattr(transformer, "attn2", None)
                if attn2 is not None:
                    yield (block_name, number, index), attn2


def _linear_shape(attn2: torch.nn.Module, name: str) -> tuple[int, int]:
    weight = getattr(attn2, name).weight
    return int(weight.shape[0]), int(weight.shape[1])


def cross_attention_sites(diffusion_model: torch.nn.Module) -> list[CrossAttentionSite]:
    """Every cross-attention layer of ``diffusion_model`` in the adapter's layer order.

    Walks ``input_blocks``, ``output_blocks`` and then ``middle_block`` for transformer stacks
    whose blocks carry an ``attn2``. Raises ``NoCrossAttentionError`` when there is none (the
    message names what was looked for), or when two layers would get the same ComfyUI key.
    """
    input_blocks = getattr(diffusion_model, "input_blocks", None) or []
    output_blocks = getattr(diffusion_model, "output_blocks", None) or []
    middle_block = getattr(diffusion_model, "middle_block", None)
    middle = [(0, middle_block)] if isinstance(middle_block, torch.nn.Module) else []
    found = [
        *_sites_in("input", enumerate(input_blocks)),
        *_sites_in("output", enumerate(output_blocks)),
        *_sites_in("middle", middle),
    ]
    if not found:
        raise NoCrossAttentionError(
            f"{type(diffusion_model).__name__} has no cross-attention layers: found no transformer "
            "block with an attn2 in its input_blocks, middle_block or output_blocks; InstantID needs a "
            "UNet with text cross-attention (SD1.5 or SDXL layout)"
        )
    sites = []
    seen: set[BlockKey] = set()
    for layer, (key, attn2) in enumerate(found):
        if key in seen:
            raise NoCrossAttentionError(f"two cross-attention layers share ComfyUI's patch key {key}")
        seen.add(key)
        hidden_size, _ = _linear_shape(attn2, "to_q")
        _, context_dim = _linear_shape(attn2, "to_k")
        sites.append(CrossAttentionSite(key, layer, hidden_size, context_dim))
    return sites


def describe_layout(sites: list[CrossAttentionSite]) -> str:
    """A short human-readable summary, e.g. ``input 4:2 5:2 ... | middle 0:10`` (block:depth)."""
    depth: dict[tuple[str, int], int] = {}
    for site in sites:
        block = site.key[:2]
        depth[block] = depth.get(block, 0) + 1
    parts = []
    for name in ("input", "middle", "output"):
        entries = [f"{number}:{count}" for (block_name, number), count in depth.items() if block_name == name]
        if entries:
            parts.append(f"{name} " + " ".join(entries))
    return " | ".join(parts)


def context_dim(module: torch.nn.Module) -> int | None:
    """The width of the text context that every cross-attention layer of ``module`` reads (a ComfyUI UNet
    or ControlNet in the ``input_blocks`` / ``middle_block`` layout), or ``None`` when that cannot be read:
    no such layer, layers of different widths, or projections without a weight matrix."""
    try:
        sites = cross_attention_sites(module)
    except (NoCrossAttentionError, AttributeError, IndexError):
        return None
    widths = {site.context_dim for site in sites}
    return widths.pop() if len(widths) == 1 else None
