"""Where each of the adapter's cross-attention layers sits in the UNet, in ComfyUI's and diffusers' terms.

The adapter stores one ``to_k_ip``/``to_v_ip`` pair per cross-attention (attn2) layer, in the
order of a diffusers UNet's ``attn_processors``: down blocks, then up blocks, then the middle
block. ComfyUI runs the same layers in another order (input blocks, middle, output blocks) and
names them by ``(block_name, block_number, transformer_index_in_block)``; its
``transformer_options["transformer_index"]`` counts the spatial transformers in that running
order (11 for SDXL, 16 for SD1.5), which is what the IPAdapter weight types are shaped over.

Plain data: no ComfyUI or diffusers import.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

ARCHS: dict[str, dict[str, int]] = {
    "sdxl": {"num_layers": 70, "cross_attention_dim": 2048, "num_transformers": 11},
    "sd15": {"num_layers": 16, "cross_attention_dim": 768, "num_transformers": 16},
}
"""The base architectures an InstantID adapter can target."""


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One attn2 layer. ``index`` is its position in the adapter (file key ``2 * index + 1``)."""

    index: int
    block: str  # "input", "middle" or "output" (ComfyUI's block names)
    block_number: int  # ComfyUI's index of the input/output block (0 for the middle block)
    block_index: int  # index of the transformer block inside its spatial transformer
    transformer_index: int  # ComfyUI's running count of spatial transformers
    hidden_size: int  # out features of to_k_ip / to_v_ip (the layer's query width)
    diffusers_path: str  # dotted path of the attn2 module in a diffusers UNet2DConditionModel

    @property
    def comfy_key(self) -> tuple[str, int, int]:
        """The key ComfyUI files an attn2 replace patch under: ``(block, block_number, block_index)``."""
        return (self.block, self.block_number, self.block_index)


# One entry per spatial transformer, in diffusers order (down, up, mid):
# (comfy block, comfy block number, diffusers attentions module, depth, hidden size)
_TRANSFORMERS: dict[str, tuple[tuple[str, int, str, int, int], ...]] = {
    "sdxl": (
        ("input", 4, "down_blocks.1.attentions.0", 2, 640),
        ("input", 5, "down_blocks.1.attentions.1", 2, 640),
        ("input", 7, "down_blocks.2.attentions.0", 10, 1280),
        ("input", 8, "down_blocks.2.attentions.1", 10, 1280),
        ("output", 0, "up_blocks.0.attentions.0", 10, 1280),
        ("output", 1, "up_blocks.0.attentions.1", 10, 1280),
        ("output", 2, "up_blocks.0.attentions.2", 10, 1280),
        ("output", 3, "up_blocks.1.attentions.0", 2, 640),
        ("output", 4, "up_blocks.1.attentions.1", 2, 640),
        ("output", 5, "up_blocks.1.attentions.2", 2, 640),
        ("middle", 0, "mid_block.attentions.0", 10, 1280),
    ),
    "sd15": (
        ("input", 1, "down_blocks.0.attentions.0", 1, 320),
        ("input", 2, "down_blocks.0.attentions.1", 1, 320),
        ("input", 4, "down_blocks.1.attentions.0", 1, 640),
        ("input", 5, "down_blocks.1.attentions.1", 1, 640),
        ("input", 7, "down_blocks.2.attentions.0", 1, 1280),
        ("input", 8, "down_blocks.2.attentions.1", 1, 1280),
        ("output", 3, "up_blocks.1.attentions.0", 1, 1280),
        ("output", 4, "up_blocks.1.attentions.1", 1, 1280),
        ("output", 5, "up_blocks.1.attentions.2", 1, 1280),
        ("output", 6, "up_blocks.2.attentions.0", 1, 640),
        ("output", 7, "up_blocks.2.attentions.1", 1, 640),
        ("output", 8, "up_blocks.2.attentions.2", 1, 640),
        ("output", 9, "up_blocks.3.attentions.0", 1, 320),
        ("output", 10, "up_blocks.3.attentions.1", 1, 320),
        ("output", 11, "up_blocks.3.attentions.2", 1, 320),
        ("middle", 0, "mid_block.attentions.0", 1, 1280),
    ),
}

_RUN_ORDER = {"input": 0, "middle": 1, "output": 2}


@cache
def cross_attention_layers(arch: str) -> tuple[CrossAttentionLayer, ...]:
    """The adapter's layers for ``arch`` ("sdxl" or "sd15"), in adapter order.

    Raises ``ValueError`` naming the known architectures for any other.
    """
    if arch not in _TRANSFORMERS:
        raise ValueError(f"unknown base architecture {arch!r}; expected one of {sorted(_TRANSFORMERS)}")
    transformers = _TRANSFORMERS[arch]
    run_order = sorted(
        range(len(transformers)), key=lambda i: (_RUN_ORDER[transformers[i][0]], transformers[i][1])
    )
    transformer_index = {position: t_idx for t_idx, position in enumerate(run_order)}
    layers: list[CrossAttentionLayer] = []
    for position, (block, number, path, depth, hidden) in enumerate(transformers):
        for block_index in range(depth):
            layers.append(
                CrossAttentionLayer(
                    index=len(layers),
                    block=block,
                    block_number=number,
                    block_index=block_index,
                    transformer_index=transformer_index[position],
                    hidden_size=hidden,
                    diffusers_path=f"{path}.transformer_blocks.{block_index}.attn2",
                )
            )
    return tuple(layers)


def arch_for_num_layers(num_layers: int) -> str:
    """The architecture whose adapter has ``num_layers`` layers; ``ValueError`` for a count no arch has."""
    for arch, facts in ARCHS.items():
        if facts["num_layers"] == num_layers:
            return arch
    known = ", ".join(f"{facts['num_layers']} ({arch})" for arch, facts in ARCHS.items())
    raise ValueError(f"no base architecture has {num_layers} cross-attention layers; expected {known}")


ARCH_NAMES: dict[str, str] = {"sd15": "SD1.5", "sdxl": "SDXL"}
"""How messages name each architecture of ``ARCHS``."""


def arch_for_context_dim(width: int) -> str | None:
    """The architecture whose text context (cross-attention input) is ``width`` wide, or ``None``."""
    return next((arch for arch, facts in ARCHS.items() if facts["cross_attention_dim"] == width), None)


def describe_context_dim(width: int) -> str:
    """``width`` with the architecture it belongs to, for messages: ``"768-d (SD1.5)"``, ``"2048-d (SDXL)"``,
    ``"1024-d (neither SD1.5 nor SDXL)"``."""
    arch = arch_for_context_dim(width)
    return f"{width}-d ({ARCH_NAMES[arch] if arch else 'neither SD1.5 nor SDXL'})"
