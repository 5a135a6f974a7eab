"""The identity processor against diffusers' IPAdapterAttnProcessor2_0, weights, windows and layouts."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from instantid.attention import face_tokens
from instantid.diffusers import apply_instantid, prepare_identity
from instantid.diffusers.processor import TimestepGate, fixed_layout
from instantid.layout import ARCHS, cross_attention_layers
from instantid.testing.shapes import UNET_CONFIGS
from instantid.weight_schedules import layer_weights
from instantid.weights import InstantIDWeights
from tests.diffusers.helpers import face, run, unet_inputs

pytestmark = pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`")


def ip_adapter_unet(unet, adapter, weights: list[float]):
    """A deep copy of ``unet`` with diffusers' IP-Adapter processors holding the adapter's to_k_ip/to_v_ip."""
    reference = copy.deepcopy(unet)
    processors = dict(reference.attn_processors)
    keys = [k for k in processors if ".attn2." in k]
    for key, w_k, w_v, weight in zip(keys, adapter.to_k_ip, adapter.to_v_ip, weights, strict=True):
        processor = IPAdapterAttnProcessor2_0(w_k.shape[0], w_k.shape[1], num_tokens=(16,), scale=weight)
        processor.to_k_ip[0].weight.data = w_k.clone()
        processor.to_v_ip[0].weight.data = w_v.clone()
        processors[key] = processor
    reference.set_attn_processor(processors)
    return reference


@pytest.mark.parametrize("cfg", [True, False])
def test_equals_diffusers_ip_adapter_processor(unet, adapter, cfg):
    embedding = face(1)
    clone = apply_instantid(unet, adapter, embedding, weight=0.7, cfg=cfg)
    cond, uncond = face_tokens(adapter, embedding)
    tokens = (
        torch.cat([uncond, cond]) if cfg else torch.cat([cond, cond])
    )  # batch of 2: [neg, pos] or two pos
    reference = ip_adapter_unet(unet, adapter, [0.7] * adapter.num_layers)

    args, kwargs = unet_inputs(batch=2)
    expected = run(reference, (args[0], args[1], torch.cat([args[2], tokens], dim=1)), kwargs)
    actual = run(clone, args, kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (actual - run(unet, args, kwargs)).abs().max() > 1e-2  # the identity changes the output


def test_per_layer_weights_equal_per_layer_scales(unet, adapter):
    weights = torch.linspace(0.0, 1.5, adapter.num_layers)
    clone = apply_instantid(unet, adapter, face(2), weight=weights, cfg=False)
    cond, _ = face_tokens(adapter, face(2))
    reference = ip_adapter_unet(unet, adapter, weights.tolist())
    args, kwargs = unet_inputs(batch=1)
    expected = run(reference, (args[0], args[1], torch.cat([args[2], cond], dim=1)), kwargs)
    torch.testing.assert_close(run(clone, args, kwargs), expected, rtol=1e-5, atol=1e-5)


def test_weight_zero_is_the_base_model_bitwise(unet, adapter):
    clone = apply_instantid(unet, adapter, face(3), weight=0.0)
    args, kwargs = unet_inputs()
    assert torch.equal(run(clone, args, kwargs), run(unet, args, kwargs))


@pytest.mark.parametrize(
    ("start", "end", "timestep", "applies"),
    [
        (0.0, 0.5, 999.0, True),  # first step: fraction 0
        (0.0, 0.5, 300.0, False),  # fraction 0.7
        (0.5, 1.0, 300.0, True),
        (0.2, 0.8, 0.0, False),  # last step: fraction 1
    ],
)
def test_start_end_window(unet, adapter, start, end, timestep, applies):
    gated = apply_instantid(unet, adapter, face(4), start=start, end=end)
    always = apply_instantid(unet, adapter, face(4))
    args, kwargs = unet_inputs(timestep=timestep)
    expected = run(always if applies else unet, args, kwargs)
    assert torch.equal(run(gated, args, kwargs), expected)


def test_gate_window_validation_and_unseen_step():
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        TimestepGate(0.8, 0.2)
    with pytest.raises(RuntimeError, match="saw no timestep"):
        TimestepGate(0.1, 0.9).active()


def test_gate_is_per_thread(unet, adapter):
    """Two threads running the same gated clone at different steps each get their own window decision."""
    import threading

    gated = apply_instantid(unet, adapter, face(5), start=0.0, end=0.5)
    always = apply_instantid(unet, adapter, face(5))
    early, late = unet_inputs(timestep=900.0), unet_inputs(timestep=100.0)
    expected = {"early": run(always, *early), "late": run(unet, *late)}
    results: dict = {}
    barrier = threading.Barrier(2)

    def work(name, inputs):
        barrier.wait()
        results[name] = [run(gated, *inputs) for _ in range(3)]

    threads = [threading.Thread(target=work, args=a) for a in (("early", early), ("late", late))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, outs in results.items():
        assert all(torch.equal(o, expected[name]) for o in outs), name


def sdxl_shaped_adapter() -> InstantIDWeights:
    """An SDXL-layout adapter whose tensors cost no memory (zero-stride views of one zero)."""
    from instantid.resampler import Resampler
    from instantid.testing.adapter_files import RESAMPLER_SIZES

    layers = cross_attention_layers("sdxl")
    dim = ARCHS["sdxl"]["cross_attention_dim"]
    resampler = Resampler(**RESAMPLER_SIZES["small"], output_dim=dim)
    zero = torch.zeros(())
    return InstantIDWeights(
        image_proj={k: v.detach() for k, v in resampler.state_dict().items()},
        to_k_ip=tuple(zero.expand(layer.hidden_size, dim) for layer in layers),
        to_v_ip=tuple(zero.expand(layer.hidden_size, dim) for layer in layers),
        arch="sdxl",
        cross_attention_dim=dim,
        hidden_sizes=tuple(layer.hidden_size for layer in layers),
    )


def test_sdxl_layers_and_weight_types_map_to_the_right_modules():
    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**UNET_CONFIGS["sdxl"])
    identity = prepare_identity(
        sdxl, sdxl_shaped_adapter(), face(6), layout=fixed_layout(True), weight=0.9, weight_type="ease in-out"
    )
    layers = cross_attention_layers("sdxl")
    assert list(identity.processors) == [f"{layer.diffusers_path}.processor" for layer in layers]
    expected = layer_weights(0.9, "ease in-out", 70).tolist()
    assert [p.weight for p in identity.processors.values()] == pytest.approx(expected)
    modules = dict(sdxl.named_modules())
    for layer, processor in zip(layers, identity.processors.values(), strict=True):
        assert (
            processor.kv.k.shape[-1] == modules[layer.diffusers_path].to_q.out_features == layer.hidden_size
        )
