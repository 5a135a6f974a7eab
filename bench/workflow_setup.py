"""What ``python -m bench workflow`` runs on: random-weight model folders, private ComfyUI installs, API graphs.

* :func:`ensure_models`: a ComfyUI ``models`` folder for one architecture, written once and reused
  (``bench-out/models/<arch>``): a full-size checkpoint (SD1.5: UNet, CLIP-L, VAE; SDXL: UNet,
  CLIP-L + CLIP-G, VAE; random fp16 weights, ComfyUI's own classes built on the meta device for
  the shapes), the full-width IdentityNet ControlNet, a full-size InstantID adapter (the published
  Resampler), a LoRA and antelopev2-layout face models. Nothing is downloaded.
* :func:`make_install`: a private ComfyUI base directory (``instantid.testing.comfy_install``) with
  this repository in ``custom_nodes`` (or the original ComfyUI_InstantID from ``--stock PATH``),
  the bench's diagnostic folder (``bench/_comfy_plugin.py``), the models folder linked in, and
  the test images.
* :func:`graph`: the API graph of ``faces`` chained Apply InstantID nodes (alternating the two
  face photos and left / right masks) followed by ``clones`` model-cloning nodes (LoRA,
  RescaleCFG, FreeU, ModelSamplingDiscrete, in turn), KSampler, VAE decode and a preview.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from instantid.testing.adapter_files import write_random_adapter
from instantid.testing.comfy_fixture import TestImages, write_input_images
from instantid.testing.comfy_install import install_clone_semantics, install_pack, make_comfy_root
from instantid.testing.comfy_models import (
    FULL_CHANNELS,
    SD_VAE_CONFIG,
    write_controlnet,
    write_sd15_checkpoint,
)
from instantid.testing.comfyui import ComfyUI, model_config, random_like, write_lora_for
from instantid.testing.face_models import build_antelopev2_like

log = logging.getLogger(__name__)

Arch = Literal["sd15", "sdxl"]
PLUGIN_SOURCE = Path(__file__).with_name("_comfy_plugin.py")
PLUGIN_FOLDER = "instantid_bench"
INSTANTID_NODES = frozenset(
    {
        "InstantIDModelLoader",
        "InstantIDFaceAnalysis",
        "FaceKeypointsPreprocessor",
        "ApplyInstantID",
        "ApplyInstantIDAdvanced",
        "InstantIDAttentionPatch",
        "ApplyInstantIDControlNet",
    }
)
CLONE_NODES = ("LoraLoaderModelOnly", "RescaleCFG", "FreeU", "ModelSamplingDiscrete")
"""Downstream nodes that clone the model (``ModelPatcher.clone``), used in this order, cycling."""


@dataclass(frozen=True)
class BenchModels:
    """ComfyUI's names of the files in a models folder written by :func:`ensure_models`."""

    root: Path
    arch: Arch
    checkpoint: str
    controlnet: str
    adapter: str
    lora: str


def _names(arch: Arch) -> dict[str, str]:
    return {
        "checkpoint": f"{arch}-random.safetensors",
        "controlnet": f"instantid-identitynet-{arch}-random.safetensors",
        "adapter": f"ip-adapter-{arch}-random.safetensors",
        "lora": f"{arch}-random-lora.safetensors",
    }


def write_sdxl_checkpoint(comfy: ComfyUI, path: Path, *, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A random full-size SDXL-architecture checkpoint (fp16: UNet 2.57 B, CLIP-L + CLIP-G, VAE; ~6.9 GB).

    Returns the path and the meta-device ``UNetModel`` (for the LoRA's shapes).
    """
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    config = model_config(comfy, "sdxl", FULL_CHANNELS)
    config.unet_config["num_head_channels"] = 64  # the real one (shapes do not depend on it)
    with torch.device("meta"), torch.no_grad():
        model = config.get_model({}, "", device="meta")
        clip = config.clip_target().clip(device="meta", dtype=torch.float16)
        vae = AutoencoderKL(ddconfig=SD_VAE_CONFIG, embed_dim=4)
    shapes = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    keep = ("model.", "conditioner.", "first_stage_model.")
    shapes = {k: v for k, v in shapes.items() if k.startswith(keep)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = random_like(shapes, seed, torch.float16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path, model.diffusion_model


def ensure_models(comfy: ComfyUI, folder: Path, arch: Arch, *, fresh: bool = False) -> BenchModels:
    """The models folder for ``arch`` at ``folder``, written unless a complete one is there (``fresh``: rewrite)."""
    names = _names(arch)
    models = BenchModels(folder, arch, **names)
    marker = folder / "complete.json"
    if marker.is_file() and not fresh and json.loads(marker.read_text()) == names:
        return models
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    log.info("writing the random-weight %s models into %s (once; reused by later runs)", arch, folder)
    writer = write_sd15_checkpoint if arch == "sd15" else write_sdxl_checkpoint
    _, unet = writer(comfy, folder / "checkpoints" / models.checkpoint)
    (folder / "loras").mkdir(parents=True)
    write_lora_for(unet, folder / "loras" / models.lora)
    write_controlnet(comfy, folder / "controlnet" / models.controlnet, arch, model_channels=FULL_CHANNELS)
    (folder / "instantid").mkdir(parents=True)
    write_random_adapter(folder / "instantid" / models.adapter, arch, resampler="full")
    build_antelopev2_like(folder / "insightface")
    marker.write_text(json.dumps(names))
    log.info("wrote the %s models in %.0f s", arch, time.perf_counter() - started)
    return models


def make_install(
    base: Path, models: BenchModels, *, stock: Path | None = None, clone_semantics: str = "installed"
) -> tuple[Path, TestImages]:
    """A ComfyUI base directory at ``base`` with the pack (or ``stock``), the bench folder and ``models`` linked.

    ``clone_semantics`` (``instantid.testing.comfy_clone_semantics``'s names): ``"list-dict"`` adds the
    test-only folder that makes the server's ``clone()`` copy as ComfyUI does since 2026-02.
    """
    from instantid.testing.comfyui import comfyui_root

    root = make_comfy_root(comfyui_root(), base)
    custom_nodes = root / "custom_nodes"
    if stock is None:
        install_pack(custom_nodes)
    else:
        shutil.copytree(stock, custom_nodes / "ComfyUI_InstantID", ignore=shutil.ignore_patterns(".git"))
    install_clone_semantics(custom_nodes, clone_semantics)
    plugin = custom_nodes / PLUGIN_FOLDER
    plugin.mkdir()
    shutil.copy2(PLUGIN_SOURCE, plugin / "__init__.py")
    (root / "models").rmdir()
    (root / "models").symlink_to(models.root.resolve(), target_is_directory=True)
    return root, write_input_images(root / "input")


def graph(
    models: BenchModels,
    images: TestImages,
    *,
    faces: int,
    clones: int,
    text: str,
    size: int,
    steps: int,
    available: set[str] | None = None,
) -> dict[str, Any]:
    """The API graph described in the module docstring; node ids name their role (``face1``, ``clone2``...).

    ``available``: node types the server has (``/object_info``); cloning nodes it lacks are skipped
    over in the cycle. Loader ids and inputs do not depend on ``faces``/``clones``/``text``, so the
    server keeps them cached from one graph to the next.
    """
    g: dict[str, Any] = {
        "checkpoint": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.checkpoint}},
        "instantid": {"class_type": "InstantIDModelLoader", "inputs": {"instantid_file": models.adapter}},
        "faceanalysis": {"class_type": "InstantIDFaceAnalysis", "inputs": {"provider": "CPU"}},
        "controlnet": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": models.controlnet}},
        "image_a": {"class_type": "LoadImage", "inputs": {"image": images.face_a}},
        "image_b": {"class_type": "LoadImage", "inputs": {"image": images.face_b}},
        "mask_left": {"class_type": "LoadImageMask", "inputs": {"image": images.mask_left, "channel": "red"}},
        "mask_right": {
            "class_type": "LoadImageMask",
            "inputs": {"image": images.mask_right, "channel": "red"},
        },
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["checkpoint", 1]}},
        "negative": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "blurry, lowres", "clip": ["checkpoint", 1]},
        },
    }
    model: list[Any] = ["checkpoint", 0]
    positive: list[Any] = ["positive", 0]
    negative: list[Any] = ["negative", 0]
    for i in range(1, faces + 1):
        inputs: dict[str, Any] = {
            "instantid": ["instantid", 0],
            "insightface": ["faceanalysis", 0],
            "control_net": ["controlnet", 0],
            "image": ["image_a" if i % 2 else "image_b", 0],
            "model": model,
            "positive": positive,
            "negative": negative,
            "weight": 0.8,
            "start_at": 0.0,
            "end_at": 1.0,
        }
        if faces > 1:
            inputs["mask"] = ["mask_left" if i % 2 else "mask_right", 0]
        g[f"face{i}"] = {"class_type": "ApplyInstantID", "inputs": inputs}
        model, positive, negative = [f"face{i}", 0], [f"face{i}", 1], [f"face{i}", 2]
    kinds = [k for k in CLONE_NODES if available is None or k in available]
    for i in range(1, clones + 1):
        kind = kinds[(i - 1) % len(kinds)]
        inputs = {"model": model, **_clone_inputs(kind, models)}
        g[f"clone{i}"] = {"class_type": kind, "inputs": inputs}
        model = [f"clone{i}", 0]
    g["latent"] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": size, "height": size, "batch_size": 1},
    }
    g["sampler"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "positive": positive,
            "negative": negative,
            "latent_image": ["latent", 0],
            "seed": 0,
            "steps": steps,
            "cfg": 4.5,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
        },
    }
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["checkpoint", 2]}}
    g["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}
    return g


def _clone_inputs(kind: str, models: BenchModels) -> dict[str, Any]:
    if kind == "LoraLoaderModelOnly":
        return {"lora_name": models.lora, "strength_model": 0.5}
    if kind == "RescaleCFG":
        return {"multiplier": 0.7}
    if kind == "FreeU":
        return {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}
    if kind == "ModelSamplingDiscrete":
        return {"sampling": "eps", "zsnr": False}
    raise ValueError(f"unknown cloning node {kind!r}")
