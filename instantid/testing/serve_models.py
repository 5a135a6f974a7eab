"""Factories for ``instantid.serve`` settings in tests and ``bench serve``: tiny random models, built offline.

``ServeSettings(pipeline_factory="instantid.testing.serve_models:tiny_pipeline",
adapter_factory="instantid.testing.serve_models:tiny_adapter", ...)`` makes every replica build
the same tiny SDXL ControlNet pipeline (``instantid.testing.tiny_pipelines``, seed 0: equal
weights on every replica, so one seed gives one image wherever it runs) and an adapter that
fits it. The tokenizer vocabulary goes to a fresh temporary folder per process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from instantid.testing.tiny_pipelines import tiny_instantid_weights, tiny_sdxl_controlnet_pipeline

__all__ = ["tiny_adapter", "tiny_pipeline"]


def tiny_pipeline() -> Any:
    """The tiny SDXL ControlNet pipeline of seed 0 (16 x 16 images)."""
    return tiny_sdxl_controlnet_pipeline(Path(tempfile.mkdtemp(prefix="instantid-serve-")), seed=0)


def tiny_adapter(pipe: Any) -> Any:
    """A random adapter of seed 0 that fits ``pipe``'s UNet (scale 0.5: the identity visibly changes the image)."""
    return tiny_instantid_weights(pipe.unet, seed=0, scale=0.5)
