"""Adapter files written once per session (random weights, the published layouts)."""

from pathlib import Path

import pytest
import torch

from instantid.testing.adapter_files import random_adapter_state, write_adapter, write_random_adapter
from instantid.weights import InstantIDWeights, load_instantid


@pytest.fixture(scope="session")
def small_adapter_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(image_proj, ip_adapter)`` of an SD1.5 adapter: full-size layers, small Resampler, float16."""
    return random_adapter_state("sd15", resampler="small", seed=1)


@pytest.fixture(scope="session")
def small_adapter_files(tmp_path_factory, small_adapter_state) -> dict[str, Path]:
    """``small_adapter_state`` written in both formats."""
    folder = tmp_path_factory.mktemp("small_adapter")
    return {
        fmt: write_adapter(folder / f"ip-adapter.{fmt}", *small_adapter_state, fmt)
        for fmt in ("safetensors", "bin")
    }


@pytest.fixture(scope="session")
def full_sd15_weights(tmp_path_factory) -> InstantIDWeights:
    """An SD1.5 adapter with the full-size Resampler (1280 wide, 20 heads), float32, from a .bin file."""
    path = tmp_path_factory.mktemp("full_adapter") / "ip-adapter.bin"
    return load_instantid(write_random_adapter(path, arch="sd15", fmt="bin", dtype=torch.float32, seed=2))


@pytest.fixture(scope="session")
def small_weights_fp32(small_adapter_files) -> InstantIDWeights:
    return load_instantid(small_adapter_files["safetensors"], dtype=torch.float32)
