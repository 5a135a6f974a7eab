"""Fixtures for the diffusers tests: a tiny random SDXL-architecture UNet and an adapter that fits it."""

from __future__ import annotations

import pytest

from instantid.testing.tiny_pipelines import (
    tiny_instantid_weights,
    tiny_sdxl_controlnet_pipeline,
    tiny_sdxl_unet,
)


@pytest.fixture(scope="session")
def unet():
    """Shared by every test: tests must leave it as they found it (several check that)."""
    return tiny_sdxl_unet(seed=0)


@pytest.fixture(scope="session")
def adapter(unet):
    return tiny_instantid_weights(unet, seed=0)


@pytest.fixture(scope="session")
def pipe(tmp_path_factory):
    """A tiny SDXL ControlNet pipeline shared by the pipeline tests: they must leave it as they found it."""
    pipeline = tiny_sdxl_controlnet_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def tiny_adapter(pipe):
    return tiny_instantid_weights(pipe.unet, seed=3)
