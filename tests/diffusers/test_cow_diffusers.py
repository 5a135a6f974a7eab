"""cow_model.diffusers: attention processors set on a clone only, with diffusers' own processors."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from cow_model import LazyClonedModel
from cow_model.diffusers import (
    attention_paths,
    clone_with_attn_processor,
    cross_attention_keys,
    set_attn_processor,
)
from tests.diffusers.helpers import assert_unchanged, run, snapshot, unet_inputs


def ip_processors(unet, scale: float = 0.7, seed: int = 0) -> dict:
    """diffusers' own IP-Adapter processors (nn.Modules with to_k_ip/to_v_ip weights) for every attn2."""
    modules = dict(unet.named_modules())
    generator = torch.Generator().manual_seed(seed)
    processors = {}
    for key in cross_attention_keys(unet):
        attn = modules[attention_paths(unet)[key]]
        processor = IPAdapterAttnProcessor2_0(
            attn.to_k.out_features, attn.to_k.in_features, num_tokens=(4,), scale=scale
        )
        with torch.no_grad():
            for linear in [*processor.to_k_ip, *processor.to_v_ip]:
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.1)
        processors[key] = processor
    return processors


def test_attention_keys_follow_attn_processors_order(unet):
    assert list(attention_paths(unet)) == list(unet.attn_processors)
    keys = cross_attention_keys(unet)
    assert keys == [k for k in unet.attn_processors if ".attn2." in k]
    assert len(keys) == 22


def test_module_processors_go_on_the_clone_only(unet):
    before = snapshot(unet)
    processors = ip_processors(unet)
    clone = clone_with_attn_processor(unet, processors)

    assert isinstance(clone, LazyClonedModel) and isinstance(clone, type(unet))
    assert_unchanged(unet, before)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert {k: p for k, p in clone.attn_processors.items() if k in processors} == processors
    # nn.Module processors became children named "processor" of the clone's private attn2 copies
    path = attention_paths(unet)[next(iter(processors))]
    assert clone.get_submodule(path).processor is processors[next(iter(processors))]
    assert "processor" in clone.get_submodule(path)._modules
    assert "processor" not in unet.get_submodule(path)._modules
    # the clone shares every base weight; its only own tensors are the processors' weights
    base_ptrs = {t.data_ptr() for t in unet.state_dict().values()}
    own = [t for name, t in clone.state_dict().items() if ".processor." not in name]
    assert all(t.data_ptr() in base_ptrs for t in own)


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`")
def test_clone_output_equals_diffusers_in_place_processors(unet):
    processors = ip_processors(unet, seed=1)
    clone = clone_with_attn_processor(unet, processors)
    reference = copy.deepcopy(unet)
    reference.set_attn_processor({**reference.attn_processors, **copy.deepcopy(processors)})

    args, kwargs = unet_inputs()
    ip_tokens = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3))
    context = torch.cat([args[2], ip_tokens], dim=1)  # IP-Adapter's legacy layout: text then image tokens
    args = (args[0], args[1], context)
    expected = run(reference, args, kwargs)
    assert torch.equal(run(clone, args, kwargs), expected)
    # and the identity tokens matter (the base, reading the same 11 tokens as text, differs)
    assert not torch.allclose(run(unet, args, kwargs), expected)


def test_one_processor_goes_on_every_attention_module(unet):
    before = snapshot(unet)
    processor = AttnProcessor()
    clone = clone_with_attn_processor(unet, processor)
    assert all(p is processor for p in clone.attn_processors.values())
    assert_unchanged(unet, before)
    args, kwargs = unet_inputs()
    torch.testing.assert_close(run(clone, args, kwargs), run(unet, args, kwargs), rtol=1e-4, atol=1e-5)


def test_a_clone_of_a_clone_keeps_both_levels(unet):
    first = clone_with_attn_processor(unet, AttnProcessor())
    key = cross_attention_keys(unet)[0]
    second = LazyClonedModel(first)
    marker = AttnProcessor2_0()
    set_attn_processor(second, {key: marker})
    assert second.attn_processors[key] is marker
    assert isinstance(first.attn_processors[key], AttnProcessor)
    assert isinstance(unet.attn_processors[key], AttnProcessor2_0) and unet.attn_processors[key] is not marker


def test_unknown_key_raises_before_anything_changes(unet):
    clone = LazyClonedModel(unet)
    good = cross_attention_keys(unet)[0]
    with pytest.raises(
        KeyError, match=r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.processor"
    ):
        set_attn_processor(
            clone,
            {
                good: AttnProcessor(),
                "down_blocks.1.attentions.0.transformer_blocks.0.attn9.processor": AttnProcessor(),
            },
        )
    assert clone.private_paths == [""]
    assert clone.attn_processors == unet.attn_processors


def test_a_model_that_is_not_a_clone_is_refused(unet):
    with pytest.raises(TypeError, match="LazyClonedModel"):
        set_attn_processor(unet, AttnProcessor())


def test_a_model_without_attention_is_refused():
    with pytest.raises(ValueError, match="no attention modules"):
        clone_with_attn_processor(torch.nn.Sequential(torch.nn.Linear(2, 2)), AttnProcessor())


def test_diffusers_own_in_place_calls_on_a_clone_stay_in_the_clone(unet):
    before = snapshot(unet)
    clone = LazyClonedModel(unet)
    key = cross_attention_keys(unet)[0]
    processor = AttnProcessor()
    with pytest.raises(ValueError, match="number of processors 1 does not match"):  # diffusers' own check
        clone.set_attn_processor({key: processor})
    assert clone.private_paths == [""]
    clone.set_attn_processor({**clone.attn_processors, key: processor})
    assert clone.attn_processors[key] is processor
    clone.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in clone.attn_processors.values())
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert_unchanged(unet, before)
