"""Per-layer weights: each weight type's curve over ComfyUI's transformer index, dicts and tensors."""

import pytest
import torch

from instantid.layout import cross_attention_layers
from instantid.weight_schedules import WEIGHT_TYPES, layer_weights


def _by_transformer(weights, arch):
    """The (single) weight of each spatial transformer, in ComfyUI's running order."""
    values = {}
    for layer, w in zip(cross_attention_layers(arch), weights.tolist(), strict=True):
        assert values.setdefault(layer.transformer_index, w) == pytest.approx(w)
    return [values[t] for t in sorted(values)]


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_ramps(arch):
    num_layers = len(cross_attention_layers(arch))
    span = 11 if arch == "sdxl" else 16
    ease_in = _by_transformer(layer_weights(1.0, "ease in", num_layers), arch)
    ease_out = _by_transformer(layer_weights(1.0, "ease out", num_layers), arch)
    in_out = _by_transformer(layer_weights(1.0, "ease in-out", num_layers), arch)
    reverse = _by_transformer(layer_weights(1.0, "reverse in-out", num_layers), arch)
    assert len(ease_in) == span
    assert ease_in[0] == pytest.approx(1.0) and ease_in == sorted(ease_in, reverse=True)
    assert ease_in[-1] == pytest.approx(0.05 + 0.95 / span)
    assert ease_out[0] == pytest.approx(0.05) and ease_out == sorted(ease_out)
    # mirror images: the two ramps add up to 1.05 everywhere, and so do in-out and reverse in-out
    assert [a + b for a, b in zip(ease_in, ease_out, strict=True)] == pytest.approx([1.05] * span)
    assert [a + b for a, b in zip(in_out, reverse, strict=True)] == pytest.approx([1.05] * span)
    peak = max(range(span), key=in_out.__getitem__)
    assert abs(peak - span / 2) <= 0.5 and in_out[0] == pytest.approx(0.05)
    assert min(range(span), key=reverse.__getitem__) == peak and reverse[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("weight_type", "weak_blocks"),
    [
        ("linear", set()),
        ("weak input", {"input"}),
        ("weak middle", {"middle"}),
        ("weak output", {"output"}),
        ("strong middle", {"input", "output"}),
    ],
)
def test_block_types(weight_type, weak_blocks):
    weights = layer_weights(0.8, weight_type, 70)
    for layer, w in zip(cross_attention_layers("sdxl"), weights.tolist(), strict=True):
        assert w == pytest.approx(0.8 * (0.2 if layer.block in weak_blocks else 1.0)), (weight_type, layer)


def test_weight_scales_every_type():
    for weight_type in WEIGHT_TYPES:
        torch.testing.assert_close(
            layer_weights(2.5, weight_type, 16), 2.5 * layer_weights(1.0, weight_type, 16)
        )


def test_per_transformer_dict():
    weights = layer_weights({3: 2.0, 6: 0.5}, "linear", 70)
    layers = cross_attention_layers("sdxl")
    # transformer 3 is input block 8 (10 layers), transformer 6 is output block 1 (10 layers)
    assert {layers[i].comfy_key[:2] for i in weights.nonzero().flatten().tolist()} == {
        ("input", 8),
        ("output", 1),
    }
    assert sorted(set(weights.tolist())) == [0.0, 0.5, 2.0]
    with pytest.raises(ValueError, match=r"keys 0\.\.10 for sdxl .* got \[11\]"):
        layer_weights({11: 1.0}, "linear", 70)


def test_per_layer_tensor():
    values = torch.linspace(0, 1, 16)
    torch.testing.assert_close(layer_weights(values, "linear", 16), values)
    weak = layer_weights(values, "weak input", 16)
    assert weak[0] == pytest.approx(0.2 * values[0].item()) and weak[-1] == pytest.approx(values[-1].item())
    with pytest.raises(ValueError, match=r"must have shape \[16\], got \[70\]"):
        layer_weights(torch.ones(70), "linear", 16)


def test_errors():
    with pytest.raises(
        ValueError, match="unknown weight type 'style transfer'; expected one of linear, ease in"
    ):
        layer_weights(1.0, "style transfer", 70)
    with pytest.raises(
        ValueError,
        match=r"no base architecture has 17 cross-attention layers; expected 70 \(sdxl\), 16 \(sd15\)",
    ):
        layer_weights(1.0, "linear", 17)
