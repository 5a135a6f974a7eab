"""The layer layout against a real diffusers UNet (built on the meta device) and ComfyUI's block numbering."""

import pytest
import torch

from instantid.layout import ARCHS, arch_for_num_layers, cross_attention_layers
from instantid.testing.shapes import UNET_CONFIGS


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_matches_diffusers_attn_processor_order(arch):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS[arch])
    processors = list(unet.attn_processors)  # the order the adapter was saved in
    attn2 = [name.removesuffix(".processor") for name in processors[1::2]]
    layers = cross_attention_layers(arch)
    assert [layer.diffusers_path for layer in layers] == attn2
    assert all(name.endswith("attn1.processor") for name in processors[0::2])
    for layer in layers:
        module = unet.get_submodule(layer.diffusers_path)
        assert module.to_q.out_features == layer.hidden_size
        assert module.to_k.in_features == ARCHS[arch]["cross_attention_dim"]
    assert len(layers) == ARCHS[arch]["num_layers"]
    assert arch_for_num_layers(len(layers)) == arch


def test_sdxl_comfy_blocks():
    layers = cross_attention_layers("sdxl")
    blocks = {}
    for layer in layers:
        blocks.setdefault(layer.comfy_key[:2], []).append(layer)
    depth = {key: len(group) for key, group in blocks.items()}
    assert depth == {
        ("input", 4): 2,
        ("input", 5): 2,
        ("input", 7): 10,
        ("input", 8): 10,
        ("middle", 0): 10,
        ("output", 0): 10,
        ("output", 1): 10,
        ("output", 2): 10,
        ("output", 3): 2,
        ("output", 4): 2,
        ("output", 5): 2,
    }
    # ComfyUI counts spatial transformers in running order: input blocks, middle, output blocks
    order = sorted(blocks, key=lambda key: blocks[key][0].transformer_index)
    assert order == [("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0)] + [
        ("output", i) for i in range(6)
    ]
    assert [layer.comfy_key for layer in blocks[("input", 7)]] == [("input", 7, i) for i in range(10)]
    assert [layer.index for layer in layers] == list(range(70))


def test_unknown_arch():
    with pytest.raises(
        ValueError, match=r"unknown base architecture 'sd3'; expected one of \['sd15', 'sdxl'\]"
    ):
        cross_attention_layers("sd3")
