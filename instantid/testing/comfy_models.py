"""Random-weight model files a ComfyUI server loads through its own loaders, and the models folder holding them.

ComfyUI's ``CheckpointLoaderSimple`` recognises a checkpoint by its UNet's widths (SD1.5:
``model_channels`` 320, context 768), so the checkpoint here is a full-size SD1.5-architecture one
(UNet, CLIP-L text encoder, VAE; ~1.07 B parameters, written in fp16: ~2.1 GB) with random weights
drawn from a seed; its IdentityNet ControlNet is full width too, since its outputs add to the
UNet's. Each part is built by ComfyUI's own classes on the meta device (no memory) and only its
shapes are read, so writing costs what drawing the numbers costs. ControlNets of a model family
ComfyUI does not recognise load as a generic one, which keeps the SDXL-layout ControlNet (the
wrong-architecture case) tiny.

:func:`write_models_folder` lays out a ComfyUI ``models`` folder: ``checkpoints``, ``controlnet``,
``loras``, ``instantid`` (adapters, and a ControlNet file under an adapter's name) and
``insightface/models/antelopev2`` (``instantid.testing.face_models``). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from instantid.testing.adapter_files import write_random_adapter
from instantid.testing.comfyui import ComfyUI, model_config, random_like, write_lora_for
from instantid.testing.face_models import build_antelopev2_like

log = logging.getLogger(__name__)

FULL_CHANNELS = 320
"""SD1.5's and SDXL's ``model_channels``: what ComfyUI's model detection matches on."""

SD_VAE_CONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
"""The SD1.5 / SDXL VAE as ComfyUI builds it for a checkpoint."""


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _meta_sd15(comfy: ComfyUI) -> tuple[Any, Any, Any]:
    """ComfyUI's SD1.5 model, CLIP-L text encoder and VAE, full size, on the meta device."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = model_config(comfy, "sd15", FULL_CHANNELS)
    with torch.device("meta"), torch.no_grad():
        model = config.get_model({}, "", device="meta")
        clip = config.clip_target().clip(device="meta", dtype=torch.float16)
        vae = AutoencoderKL(ddconfig=SD_VAE_CONFIG, embed_dim=4)
    return model, clip, vae


def write_sd15_checkpoint(comfy: ComfyUI, path: Path, *, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """Write a random SD1.5-architecture checkpoint (fp16 safetensors) that ``CheckpointLoaderSimple`` loads.

    Returns the path and the meta-device ``UNetModel`` (its shapes serve LoRA files).
    """
    model, clip, vae = _meta_sd15(comfy)
    shapes = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    shapes = {
        k: v for k, v in shapes.items() if k.startswith(("model.", "cond_stage_model.", "first_stage_model."))
    }
    _save(random_like(shapes, seed, torch.float16), path)
    return path, model.diffusion_model


def write_controlnet(comfy: ComfyUI, path: Path, arch: str, *, model_channels: int, seed: int = 1) -> Path:
    """Write a random ControlNet (fp16, ComfyUI's ``cldm`` key layout, RGB hint) of ``arch``'s block layout.

    ``model_channels=320`` gives the real widths (needed to drive a real-width UNet); a narrower one
    loads too (ComfyUI takes an unrecognised ControlNet as a generic one).
    """
    config = dict(model_config(comfy, arch, model_channels).unet_config)  # type: ignore[arg-type]
    config.pop("out_channels")
    if model_channels != FULL_CHANNELS:
        config |= {"num_heads": -1, "num_head_channels": 64}  # what ComfyUI's generic config gives
    with torch.device("meta"), torch.no_grad():
        control_model = comfy.cldm.ControlNet(hint_channels=3, device="meta", **config)
    return _save(random_like(control_model.state_dict(), seed, torch.float16), path)


@dataclass(frozen=True)
class ModelFiles:
    """What :func:`write_models_folder` wrote: ComfyUI's names for each file (as loader nodes take them)."""

    root: Path
    checkpoint: str = "sd15-random.safetensors"
    controlnet: str = "instantid-identitynet-sd15-random.safetensors"
    controlnet_sdxl: str = "instantid-identitynet-sdxl-layout-tiny.safetensors"
    adapter: str = "ip-adapter-sd15-random.safetensors"
    adapter_sdxl: str = "ip-adapter-sdxl-random.safetensors"
    controlnet_as_adapter: str = "controlnet-not-an-adapter.safetensors"
    lora: str = "sd15-random-lora.safetensors"

    @property
    def insightface(self) -> Path:
        return self.root / "insightface"


def write_models_folder(comfy: ComfyUI, root: Path, *, seed: int = 0) -> ModelFiles:
    """Write every file the server tests load into the ComfyUI ``models`` folder ``root``; about 20 s on 2 cores.

    SD1.5: checkpoint, IdentityNet ControlNet, adapter (small Resampler, full layer widths), LoRA.
    Wrong-architecture inputs: an SDXL adapter, a tiny SDXL-layout ControlNet, and that ControlNet
    under an adapter's name in ``instantid/`` (a hard link). antelopev2-layout face models.
    """
    files = ModelFiles(root)
    started = time.perf_counter()
    _, unet = write_sd15_checkpoint(comfy, root / "checkpoints" / files.checkpoint, seed=seed)
    write_lora_for(unet, _mkdir(root / "loras") / files.lora)
    write_controlnet(comfy, root / "controlnet" / files.controlnet, "sd15", model_channels=FULL_CHANNELS)
    sdxl_cn = write_controlnet(comfy, root / "controlnet" / files.controlnet_sdxl, "sdxl", model_channels=64)
    instantid = _mkdir(root / "instantid")
    write_random_adapter(instantid / files.adapter, "sd15", resampler="small", seed=seed)
    write_random_adapter(instantid / files.adapter_sdxl, "sdxl", resampler="small", scale=0.0)
    os.link(sdxl_cn, instantid / files.controlnet_as_adapter)
    build_antelopev2_like(files.insightface)
    log.info("wrote the test models into %s in %.1f s", root, time.perf_counter() - started)
    return files


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
