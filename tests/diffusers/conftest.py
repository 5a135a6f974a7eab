"""Fixtures for the diffusers tests: a tiny random SDXL-architecture UNet and an adapter that fits it."""

from __future__ import annotations

import pytest

from instantid.testing.tiny_pipelines import tiny_instantid_weights, tiny_sdxl_unet


@pytest.fixture(scope="session")
def unet():
    """Shared by every test: tests must leave it as they found it (several check that)."""
    return tiny_sdxl_unet(seed=0)


@pytest.fixture(scope="session")
def adapter(unet):
    return tiny_instantid_weights(unet, seed=0)
