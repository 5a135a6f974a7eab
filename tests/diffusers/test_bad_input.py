"""Bad input to apply_instantid: each a clear error, and nothing changed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from instantid import load_instantid
from instantid.diffusers import apply_instantid
from instantid.testing.adapter_files import random_adapter_state, write_adapter
from instantid.testing.shapes import UNET_CONFIGS
from tests.diffusers.helpers import assert_unchanged, face, snapshot


def test_unet_without_cross_attention(adapter):
    plain = UNet2DModel(
        sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="has no cross-attention layers"):
        apply_instantid(plain, adapter, face(0))


@pytest.fixture(scope="module")
def sd15_adapter(tmp_path_factory):
    """A real SD1.5-layout adapter file (constant tensors, small Resampler) through the real loader."""
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    path = write_adapter(
        tmp_path_factory.mktemp("adapter") / "sd15.safetensors", image_proj, ip_adapter, "safetensors"
    )
    return load_instantid(path)


def test_sd15_adapter_on_sdxl_unet(sd15_adapter):
    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**UNET_CONFIGS["sdxl"])
    with pytest.raises(
        ValueError, match=r"16 cross-attention layers \(an sd15 adapter\).*has 70 \(an sdxl UNet\)"
    ):
        apply_instantid(sdxl, sd15_adapter, face(0))


def test_adapter_layer_count_mismatch_with_a_tiny_unet(unet, sd15_adapter):
    before = snapshot(unet)
    with pytest.raises(ValueError, match=r"16 cross-attention layers.*this UNet has 22"):
        apply_instantid(unet, sd15_adapter, face(0))
    assert_unchanged(unet, before)


def test_adapter_layer_width_mismatch(unet, adapter):
    wrong = dataclasses.replace(adapter, hidden_sizes=(*adapter.hidden_sizes[:-1], 32))
    with pytest.raises(ValueError, match=r"adapter layer 21 projects 64-d tokens to width 32.*mid_block"):
        apply_instantid(unet, wrong, face(0))


@pytest.mark.parametrize("shape", [(256,), (1, 768), (2, 3, 1024), (1, 1, 1, 512)])
def test_face_embedding_of_the_wrong_size(unet, adapter, shape):
    with pytest.raises(ValueError, match=r"\[B, 512\].*got \[" + ", ".join(map(str, shape))):
        apply_instantid(unet, adapter, torch.randn(shape))


def test_nan_and_zero_embeddings(unet, adapter):
    with pytest.raises(ValueError, match="NaN"):
        apply_instantid(unet, adapter, torch.full((1, 512), float("nan")))
    with pytest.raises(ValueError, match="all zeros"):
        apply_instantid(unet, adapter, torch.zeros(512))


def test_face_image_without_analysis_and_unknown_types(unet, adapter):
    with pytest.raises(ValueError, match="no face analysis"):
        apply_instantid(unet, adapter, np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="cannot read a face from a str"):
        apply_instantid(unet, adapter, "face.png")
    with pytest.raises(TypeError, match="pipeline or UNet; got a dict"):
        apply_instantid({"unet": unet}, adapter, face(0))


def test_bad_weights_and_windows(unet, adapter):
    with pytest.raises(ValueError, match="22 values, got 3"):
        apply_instantid(unet, adapter, face(0), weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"weight types .* SD1\.5 and SDXL"):
        apply_instantid(unet, adapter, face(0), weight_type="ease in")
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        apply_instantid(unet, adapter, face(0), start=0.7, end=0.3)
    with pytest.raises(ValueError, match="embeds scaling"):
        apply_instantid(unet, adapter, face(0), embeds_scaling="K only")
