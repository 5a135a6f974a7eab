"""diffusers' and PEFT's in-place methods called on a clone act on the clone alone, or refuse.

Each test calls the method on a clone of the session's tiny SDXL UNet and checks that the base
is bit for bit as it was (tensors, dtypes, ``requires_grad``, module objects, processors, flags)
and that the clone shows the method's effect, or that ``SharedWeightsError`` names the method.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import cow_model.diffusers  # noqa: F401 - registers diffusers' and PEFT's methods as scoped
from cow_model import LazyClonedModel, SharedWeightsError
from tests.diffusers.helpers import run, unet_inputs


def full_state(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "tensors": {
            name: (id(t), t.dtype, t.requires_grad, t.data_ptr(), t.detach().clone())
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        },
        "modules": [(name, id(m), m.training) for name, m in model.named_modules()],
        "processors": dict(model.attn_processors),
        "flags": {
            name: {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))}
            for name, m in model.named_modules()
        },
    }


def assert_same(before: dict[str, Any], model: torch.nn.Module) -> None:
    after = full_state(model)
    assert after["modules"] == before["modules"]
    assert after["processors"] == before["processors"]
    assert after["flags"] == before["flags"]
    for name, (ident, dtype, grad, ptr, value) in before["tensors"].items():
        now = after["tensors"][name]
        assert now[:4] == (ident, dtype, grad, ptr), name
        assert torch.equal(now[4], value), name


@pytest.mark.parametrize(
    ("call", "effect"),
    [
        (
            lambda m: m.set_attention_slice("max"),
            lambda c: (
                c.down_blocks[1]
                .attentions[0]
                .transformer_blocks[0]
                .attn1.processor.__class__.__name__.startswith("Sliced")
            ),
        ),
        (
            lambda m: m.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
            lambda c: getattr(c.up_blocks[0], "b1", None) == 1.2,
        ),
        (
            lambda m: m.fuse_qkv_projections(),
            lambda c: c.down_blocks[1].attentions[0].transformer_blocks[0].attn1.fused_projections,
        ),
        (lambda m: m.enable_gradient_checkpointing(), lambda c: c.is_gradient_checkpointing),
        (
            lambda m: m.set_default_attn_processor(),
            lambda c: (
                type(
                    c.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
                ).__name__
                == "AttnProcessor"
            ),
        ),
    ],
    ids=[
        "set_attention_slice",
        "enable_freeu",
        "fuse_qkv_projections",
        "enable_gradient_checkpointing",
        "set_default_attn_processor",
    ],
)
def test_a_diffusers_method_changes_the_clone_alone(unet, call, effect) -> None:
    before = full_state(unet)
    clone = LazyClonedModel(unet)
    call(clone)
    assert effect(clone) and not effect(unet)
    args, kwargs = unet_inputs()
    run(clone, args, kwargs)
    assert_same(before, unet)


def test_layerwise_casting_casts_private_copies(unet) -> None:
    before = full_state(unet)
    clone = LazyClonedModel(unet)
    clone.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert clone.conv_in.weight.dtype == torch.float8_e4m3fn and clone.private_bytes > 0
    assert_same(before, unet)


def test_peft_adapters_belong_to_the_clone_and_fusing_into_shared_weights_is_refused(unet) -> None:
    peft = pytest.importorskip("peft")
    before = full_state(unet)
    clone = LazyClonedModel(unet)
    clone.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False))
    attn = clone.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert type(attn.to_q).__name__ == "Linear" and hasattr(attn.to_q, "lora_A")
    assert any(p.requires_grad for p in clone.parameters()) and all(
        p.requires_grad for p in unet.parameters()
    )
    args, kwargs = unet_inputs()
    assert not torch.equal(run(clone, args, kwargs), run(unet, args, kwargs))
    clone.set_adapters(["default"], weights=[0.5])
    with pytest.raises(SharedWeightsError, match=r"fuse_lora\(\) would write"):
        clone.fuse_lora()
    assert_same(before, unet)


def test_ip_adapter_processors_go_into_the_clone(unet, adapter) -> None:
    state_dict = {
        "image_proj": dict(adapter.image_proj),
        "ip_adapter": {
            f"{2 * i + 1}.{kind}.weight": weight
            for i, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip, strict=True))
            for kind, weight in (("to_k_ip", k), ("to_v_ip", v))
        },
    }
    before = full_state(unet)
    clone = LazyClonedModel(unet)
    clone._load_ip_adapter_weights([state_dict])
    assert any(type(p).__name__.startswith("IPAdapter") for p in clone.attn_processors.values())
    assert clone.encoder_hid_proj is not None and unet.encoder_hid_proj is None
    assert_same(before, unet)
