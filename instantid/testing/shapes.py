"""UNet shapes used by the benchmarks and tests, built offline from their configs (no weights needed).

``UNET_CONFIGS`` holds the published ``UNet2DConditionModel`` configs of SD1.5 and SDXL (the
architecture only). ``build_unet`` builds one on the meta device and then allocates it, which
takes well under a second instead of the ~18 s of a random initialisation for SDXL.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch

SD15: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}

SDXL: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

UNET_CONFIGS: dict[str, dict[str, Any]] = {"sd15": SD15, "sdxl": SDXL}


def build_unet(
    shape: str = "sd15",
    dtype: torch.dtype = torch.float16,
    init: Literal["zeros", "random"] = "zeros",
    seed: int = 0,
) -> Any:
    """A diffusers ``UNet2DConditionModel`` of ``shape`` ("sd15" or "sdxl") in ``dtype`` on the CPU.

    ``init="zeros"`` fills every tensor with zeros (fast; for structure and memory work);
    ``init="random"`` draws N(0, 0.02) weights from ``seed`` (for forward passes).
    Raises ``KeyError`` naming the known shapes for an unknown one.
    """
    from diffusers import UNet2DConditionModel

    if shape not in UNET_CONFIGS:
        raise KeyError(f"unknown UNet shape {shape!r}; expected one of {sorted(UNET_CONFIGS)}")
    with torch.device("meta"):
        module = cast(torch.nn.Module, UNet2DConditionModel(**UNET_CONFIGS[shape]))  # mypy sees no Module in it
    unet = torch.nn.Module.to(torch.nn.Module.to_empty(module, device="cpu"), dtype)  # bypasses diffusers' casting warning
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in unet.state_dict().values():
            if init == "random" and tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
            else:
                tensor.zero_()
    return unet.eval()
