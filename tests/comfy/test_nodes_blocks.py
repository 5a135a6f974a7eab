"""The cross-attention layout derived from real ComfyUI UNets (tiny SD1.5 / SDXL architectures)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from instantid.comfy.blocks import (
    NoCrossAttentionError,
    cross_attention_sites,
    describe_layout,
    diffusion_model_of,
)
from instantid.layout import cross_attention_layers
from instantid.testing import comfyui
from tests.comfy.instantid_helpers import no_cross_attention_patcher


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sites_match_the_adapter_layer_table(comfy: comfyui.ComfyUI, arch: comfyui.Arch) -> None:
    """The derived keys, in adapter order, equal the published adapter's layer table (an independent list)."""
    patcher = comfyui.tiny_model_patcher(comfy, arch)
    sites = cross_attention_sites(diffusion_model_of(patcher))
    expected = [layer.comfy_key for layer in cross_attention_layers(arch)]
    assert [site.key for site in sites] == expected
    assert [site.adapter_layer for site in sites] == list(range(len(expected)))
    assert [site.module_key for site in sites[:3]] == ["1", "3", "5"]
    assert {site.context_dim for site in sites} == {comfyui.CONTEXT_DIM[arch]}


def test_sdxl_layout_and_hidden_sizes(comfy: comfyui.ComfyUI) -> None:
    patcher = comfyui.tiny_model_patcher(comfy, "sdxl")
    sites = cross_attention_sites(diffusion_model_of(patcher))
    assert len(sites) == 70
    assert describe_layout(sites) == (
        "input 4:2 5:2 7:10 8:10 | middle 0:10 | output 0:10 1:10 2:10 3:2 4:2 5:2"
    )
    channels = comfyui.TINY_CHANNELS
    # down block 1 / up block 1 run at 2x the base width, the rest at 4x (640 / 1280 in the real SDXL)
    widths = {site.key[:2]: site.hidden_size for site in sites}
    assert widths[("input", 4)] == 2 * channels and widths[("output", 5)] == 2 * channels
    assert widths[("input", 7)] == 4 * channels and widths[("middle", 0)] == 4 * channels


def test_sd15_middle_block_is_keyed_middle_0(comfy: comfyui.ComfyUI) -> None:
    sites = cross_attention_sites(diffusion_model_of(comfyui.tiny_model_patcher(comfy, "sd15")))
    assert len(sites) == 16
    assert sites[-1].key == ("middle", 0, 0)
    assert sites[-1].adapter_layer == 15


def test_model_without_cross_attention_is_refused(comfy: comfyui.ComfyUI) -> None:
    patcher = no_cross_attention_patcher(comfy)
    with pytest.raises(NoCrossAttentionError, match="no cross-attention layers"):
        cross_attention_sites(diffusion_model_of(patcher))


def test_something_that_is_not_a_model_is_refused() -> None:
    with pytest.raises(NoCrossAttentionError, match="expected a ComfyUI MODEL"):
        diffusion_model_of(object())


def test_the_walk_reads_but_never_changes_the_model(
    comfy: comfyui.ComfyUI, tiny_sd15_patcher: Callable[..., Any]
) -> None:
    patcher = tiny_sd15_patcher()
    unet = diffusion_model_of(patcher)
    before = {name: (t.data_ptr(), t._version) for name, t in unet.state_dict().items()}
    cross_attention_sites(unet)
    assert {name: (t.data_ptr(), t._version) for name, t in unet.state_dict().items()} == before
