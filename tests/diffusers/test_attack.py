"""Ways a user reached the base through a clone of a diffusers model, found by attacking it.

Each test builds its own tiny SDXL UNet, calls a diffusers, PEFT or accelerate API on a clone,
and asserts the contract: the base is unchanged (tensors, devices, module objects, attributes,
processors) and the clone behaves like a deep copy given the same call, or ``SharedWeightsError``.
Library functions that edit a model they are handed (``peft.inject_adapter_in_model``,
``accelerate.cpu_offload``, ...) run on a clone inside ``clone.patch_block("", fn)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import cow_model.diffusers  # noqa: F401 - registers diffusers' and PEFT's methods as scoped
from cow_model import LazyClonedModel
from instantid.testing.tiny_pipelines import tiny_sdxl_unet
from tests.diffusers.helpers import run, unet_inputs


def full_state(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "tensors": {
            name: (id(t), t.dtype, t.device, t.requires_grad, t.data_ptr(), t.detach().clone())
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        },
        "modules": [(name, id(m), type(m), m.training) for name, m in model.named_modules()],
        "attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "processors": dict(model.attn_processors),
    }


def assert_same(before: dict[str, Any], model: torch.nn.Module) -> None:
    after = full_state(model)
    assert after["modules"] == before["modules"]
    assert after["attrs"] == before["attrs"]
    assert after["processors"] == before["processors"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (ident, dtype, device, grad, ptr, value) in before["tensors"].items():
        now = after["tensors"][name]
        assert now[:5] == (ident, dtype, device, grad, ptr), name
        assert torch.equal(now[5], value), name


@pytest.fixture
def base() -> torch.nn.Module:
    return tiny_sdxl_unet(seed=0)


def test_compile_repeated_blocks_compiles_the_clones_blocks_only(base) -> None:
    before = full_state(base)
    clone = LazyClonedModel(base)
    clone.compile_repeated_blocks()
    assert_same(before, base)


def test_enable_group_offload_hooks_the_clone_only(base) -> None:
    before = full_state(base)
    clone = LazyClonedModel(base)
    clone.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    assert_same(before, base)
    args, kwargs = unet_inputs()
    assert torch.equal(run(clone, args, kwargs), run(base, args, kwargs))


def test_inject_adapter_in_model_inside_patch_block_root_leaves_the_base(base) -> None:
    peft = pytest.importorskip("peft")
    before = full_state(base)
    clone = LazyClonedModel(base)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False)
    clone.patch_block("", lambda m: peft.inject_adapter_in_model(config, m) and None)
    assert hasattr(clone.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q, "lora_A")
    args, kwargs = unet_inputs()
    assert not torch.equal(run(clone, args, kwargs), run(base, args, kwargs))
    assert_same(before, base)


def test_accelerate_cpu_offload_inside_patch_block_root_leaves_the_base_on_its_device(base) -> None:
    accelerate = pytest.importorskip("accelerate")
    before = full_state(base)
    args, kwargs = unet_inputs()
    expected = run(base, args, kwargs)
    clone = LazyClonedModel(base)
    clone.patch_block("", lambda m: accelerate.cpu_offload(m, execution_device=torch.device("cpu")) and None)
    assert torch.equal(run(clone, args, kwargs), expected)
    assert all(t.device.type == "cpu" for t in base.parameters())
    assert_same(before, base)


def test_type_of_a_clone_loads_pretrained_as_the_model_class(base, tmp_path: Path) -> None:
    clone = LazyClonedModel(base)
    clone.save_pretrained(tmp_path)
    loaded = type(clone).from_pretrained(tmp_path)
    assert type(loaded) is type(base)
    args, kwargs = unet_inputs()
    assert torch.equal(run(loaded, args, kwargs), run(base, args, kwargs))
