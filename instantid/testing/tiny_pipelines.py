"""Tiny random diffusers models and pipelines with SDXL's architecture, built offline.

Everything here is built from configs (no hub, no download): SDXL's block structure shrunk to
channels (32, 64, 64), random weights from a seed, two CLIP text encoders through
``transformers`` with tiny configs, and CLIP tokenizers built from a vocabulary file written to a
folder the caller gives. Tests and benchmarks import it; it is not a scenario (no ``main``).

- ``tiny_sdxl_unet(seed)``: a ``UNet2DConditionModel`` with SDXL's layout (no attention in the
  first down block, 2 transformer layers in the deeper blocks and the middle block,
  ``text_time`` added conditioning): 22 cross-attention layers, see ``TINY_SDXL_UNET``.
- ``tiny_sdxl_controlnet(seed)``: a ``ControlNetModel`` matching that UNet.
- ``tiny_sdxl_controlnet_pipeline(folder, seed)``: a ``StableDiffusionXLControlNetPipeline``
  of those parts that generates 16x16 images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

TEXT_WIDTH = 32
"""Hidden size of each tiny text encoder; the UNet's cross-attention dim is twice this (as SDXL's 768 + 1280)."""
IMAGE_SIZE = 16
"""Pixel size of the tiny pipeline's images (the tiny VAE downsamples by 2)."""

TINY_SDXL_UNET: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 2,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 2],
    "attention_head_dim": [2, 4, 4],
    "norm_num_groups": 8,
    "cross_attention_dim": 2 * TEXT_WIDTH,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": TEXT_WIDTH + 6 * 8,
}
"""SDXL's ``UNet2DConditionModel`` config with every width shrunk (22 cross-attention layers)."""

TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": IMAGE_SIZE,
}


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Give every floating tensor of ``module`` deterministic random values (in place, on a new model).

    Layers keep PyTorch's default initialisation drawn from ``seed``; tensors that the model
    initialises to zero (ControlNet's zero convolutions, the VAE's ...) get N(0, 0.05) noise so
    that every part of the model influences the output.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return module.eval()


def _seeded(seed: int, build: Any) -> Any:
    """Run ``build()`` with the global RNG seeded, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_sdxl_unet(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A random ``UNet2DConditionModel`` of ``TINY_SDXL_UNET`` in ``dtype`` (eval mode)."""
    from diffusers import UNet2DConditionModel

    unet = _randomize(_seeded(seed, lambda: UNet2DConditionModel(**TINY_SDXL_UNET)), seed)
    return unet if dtype == torch.float32 else unet.to(dtype)


def tiny_sdxl_controlnet(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A random ``ControlNetModel`` shaped for ``tiny_sdxl_unet`` (conditioning image at pixel size)."""
    from diffusers import ControlNetModel

    keys = (
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block",
        "transformer_layers_per_block", "attention_head_dim", "norm_num_groups", "cross_attention_dim",
        "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
    )  # fmt: skip
    config = {key: TINY_SDXL_UNET[key] for key in keys}
    controlnet = _seeded(seed, lambda: ControlNetModel(conditioning_embedding_out_channels=(8, 16), **config))
    controlnet = _randomize(controlnet, seed)
    return controlnet if dtype == torch.float32 else controlnet.to(dtype)


def _byte_unicode_alphabet() -> list[str]:
    """The 256 characters CLIP's byte-level BPE maps bytes to (printable bytes first, as GPT-2)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Write a character-level CLIP ``vocab.json`` and an empty ``merges.txt`` into ``folder``.

    Returns their paths. The vocabulary holds every byte character, alone and with the
    end-of-word marker, plus CLIP's two special tokens (514 entries).
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_unicode_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({token: index for index, token in enumerate(tokens)}), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_path, merges_path


def tiny_clip_tokenizer(folder: Path) -> Any:
    """A ``CLIPTokenizer`` on the tiny vocabulary written to ``folder`` (77 tokens per prompt)."""
    import inspect

    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_tiny_clip_vocab(folder)
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    return CLIPTokenizer(vocab_file=str(vocab_path), merges_file=str(merges_path), model_max_length=77)


def tiny_text_encoders(seed: int = 0) -> tuple[Any, Any]:
    """``(CLIPTextModel, CLIPTextModelWithProjection)``: SDXL's two text encoders, tiny and random."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=520,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    first = _seeded(seed + 10, lambda: CLIPTextModel(config))
    second = _seeded(seed + 11, lambda: CLIPTextModelWithProjection(config))
    return first.eval(), second.eval()


def tiny_sdxl_controlnet_pipeline(folder: Path, seed: int = 0) -> Any:
    """A ``StableDiffusionXLControlNetPipeline`` of tiny random SDXL-architecture parts (fp32, CPU).

    ``folder`` receives the tokenizer vocabulary. The pipeline generates ``IMAGE_SIZE`` pixel
    images from a ``IMAGE_SIZE`` control image; no watermarker, Euler scheduler with SDXL's
    settings.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    text_encoder, text_encoder_2 = tiny_text_encoders(seed)
    vae = _randomize(_seeded(seed + 20, lambda: AutoencoderKL(**TINY_VAE)), seed + 20)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(folder / "tokenizer"),
        tokenizer_2=tiny_clip_tokenizer(folder / "tokenizer_2"),
        unet=tiny_sdxl_unet(seed),
        controlnet=tiny_sdxl_controlnet(seed + 30),
        scheduler=scheduler,
        add_watermarker=False,
    )


def tiny_instantid_weights(unet: nn.Module, seed: int = 0, scale: float = 0.1) -> Any:
    """A random ``InstantIDWeights`` that fits ``unet``'s cross-attention layers (e.g. ``tiny_sdxl_unet``).

    The Resampler is the small one of ``instantid.testing.adapter_files`` (width 128, 2 heads) with output
    width = the UNet's cross-attention width; ``to_k_ip``/``to_v_ip`` are N(0, scale). Built in
    memory (``load_instantid`` validates files against the published SD1.5/SDXL layouts only);
    ``arch`` is ``"tiny"``.
    """
    from cow_model.diffusers import attention_paths, cross_attention_keys
    from instantid.resampler import Resampler
    from instantid.testing.adapter_files import RESAMPLER_SIZES
    from instantid.weights import InstantIDWeights

    modules = dict(unet.named_modules())
    paths = attention_paths(unet)
    layers = [modules[paths[key]] for key in cross_attention_keys(unet)]
    cross_dim = layers[0].to_k.in_features
    resampler = _seeded(seed + 40, lambda: Resampler(**RESAMPLER_SIZES["small"], output_dim=cross_dim))
    generator = torch.Generator().manual_seed(seed + 41)

    def draw(layer: Any) -> torch.Tensor:
        return torch.randn((layer.to_k.out_features, cross_dim), generator=generator) * scale

    return InstantIDWeights(
        image_proj={key: value.detach() for key, value in resampler.state_dict().items()},
        to_k_ip=tuple(draw(layer) for layer in layers),
        to_v_ip=tuple(draw(layer) for layer in layers),
        arch="tiny",
        cross_attention_dim=cross_dim,
        hidden_sizes=tuple(layer.to_k.out_features for layer in layers),
    )
