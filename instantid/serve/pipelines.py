"""What a replica loads once: the base pipeline, the InstantID adapter, the face analysis.

Each follows its :class:`~instantid.serve.config.ServeSettings`: a ``from_pretrained`` path or a
factory for the pipeline, an adapter file or a factory for the adapter, an insightface root for
the face analysis (``None`` without one). The pipeline is moved to the settings' device and
dtype before any identity is applied (views share its components).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from instantid.serve.config import ServeSettings, resolve

__all__ = ["load_adapter", "load_face_analysis", "load_pipeline", "torch_dtype"]

logger = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_pipeline(settings: ServeSettings) -> Any:
    """The base pipeline on ``settings.device`` in ``settings.dtype`` (``ValueError`` when it has no UNet)."""
    dtype = torch_dtype(settings.dtype)
    if settings.pipeline_factory is not None:
        pipe = resolve(settings.pipeline_factory)()
    else:
        import diffusers

        kwargs: dict[str, Any] = {"torch_dtype": dtype}
        default_class = "diffusers:DiffusionPipeline"
        if settings.controlnet is not None:
            kwargs["controlnet"] = diffusers.ControlNetModel.from_pretrained(settings.controlnet, torch_dtype=dtype)
            default_class = "diffusers:StableDiffusionXLControlNetPipeline"
        pipeline_class: Any = resolve(settings.pipeline_class or default_class)
        pipe = pipeline_class.from_pretrained(settings.pipeline, **kwargs)
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"the base pipeline {type(pipe).__name__} has no UNet; InstantID needs SD1.5 or SDXL")
    pipe = pipe.to(settings.device)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    logger.info("base pipeline %s on %s (%s)", type(pipe).__name__, settings.device, settings.dtype)
    return pipe


def load_adapter(settings: ServeSettings, pipe: Any) -> Any:
    """The InstantID adapter: ``load_instantid(settings.adapter)`` or ``adapter_factory(pipe)``."""
    if settings.adapter_factory is not None:
        return resolve(settings.adapter_factory)(pipe)
    from instantid.weights import load_instantid

    return load_instantid(str(settings.adapter))


def load_face_analysis(settings: ServeSettings) -> Any | None:
    """insightface's face analysis from ``settings.face_models``, or ``None`` when none is configured."""
    if settings.face_models is None:
        return None
    from instantid.face import load_face_analysis as load

    return load(settings.face_models, provider=settings.face_provider)
