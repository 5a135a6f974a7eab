"""Issue 14, item 3 for diffusers: hook registries rebuilt for shells, XLA attention toggles scoped.

Each test builds its own tiny SDXL UNet (layerwise casting changes the model it is enabled on) and
checks the base bit for bit (``tests.diffusers.helpers.snapshot``) plus every module's registry,
hooks and instance ``forward``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import cow_model.diffusers  # noqa: F401 - registers diffusers' methods and its hook registry
from cow_model import LazyClonedModel
from instantid.testing.tiny_pipelines import tiny_sdxl_unet
from tests.diffusers.helpers import assert_unchanged, run, snapshot, unet_inputs


def hooks_of(model: torch.nn.Module) -> dict[str, Any]:
    """Per module: its registry object, the registry's hooks and chain, and its instance ``forward``."""
    found = {}
    for name, module in model.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        found[name] = (
            registry,
            dict(registry.hooks) if registry is not None else None,
            list(registry._fn_refs) if registry is not None else None,
            registry._module_ref if registry is not None else None,
            module.__dict__.get("forward"),
        )
    return found


def assert_same_hooks(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = hooks_of(model)
    assert after.keys() == before.keys()
    for name, (registry, hooks, refs, ref, forward) in before.items():
        a_registry, a_hooks, a_refs, a_ref, a_forward = after[name]
        assert a_registry is registry and a_hooks == hooks and a_refs == refs and a_ref is ref, name
        assert a_forward is forward, name


@pytest.fixture(scope="module")
def cast_base() -> torch.nn.Module:
    """A tiny UNet with layerwise casting (fp8 storage); the tests leave it as they found it."""
    base = tiny_sdxl_unet(seed=3)
    base.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return base


def start(base: torch.nn.Module) -> tuple[tuple, dict, torch.Tensor, dict, dict, LazyClonedModel]:
    """Inputs, the base's output, its snapshot and hooks, and a fresh clone of it."""
    args, kwargs = unet_inputs()
    return args, kwargs, run(base, args, kwargs), snapshot(base), hooks_of(base), LazyClonedModel(base)


def test_group_offload_on_a_clone_of_a_layerwise_cast_base_leaves_the_base(cast_base: torch.nn.Module) -> None:
    base = cast_base
    args, kwargs, expected, before, hooks, clone = start(base)
    clone.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    assert torch.equal(run(clone, args, kwargs), expected)
    assert_unchanged(base, before)
    assert_same_hooks(base, hooks)
    offloaded = [
        n
        for n, m in clone.named_modules()
        if "_diffusers_hook" in vars(m) and "group_offloading" in m._diffusers_hook.hooks
    ]
    assert offloaded
    assert all(clone.get_submodule(n)._diffusers_hook._module_ref is clone.get_submodule(n) for n in offloaded)


def test_a_patch_on_a_layerwise_cast_base_runs_on_the_clones_shell(cast_base: torch.nn.Module) -> None:
    base = cast_base
    args, kwargs, expected, before, hooks, clone = start(base)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"  # a Linear with a casting hook
    clone.patch_block(path, lambda linear: [linear.register_forward_hook(lambda m, i, out: out * 0)] and None)
    shell = clone.get_submodule(path)
    assert shell is not base.get_submodule(path)
    assert shell._diffusers_hook._module_ref is shell
    assert shell.forward.args[0] is shell  # the hook chain wraps the shell's own forward
    assert shell.weight is base.get_submodule(path).weight and shell.weight.dtype == torch.float8_e4m3fn
    assert not torch.equal(run(clone, args, kwargs), expected)  # the patched processor runs
    assert torch.equal(run(base, args, kwargs), expected)
    # the forward ran the base's own leaf modules, whose casting hooks rebind their weights' storage
    # (as any forward of the base does): values, objects, dtypes and hooks stay the base's
    after = snapshot(base)
    before["pointers"], before["versions"] = after["pointers"], after["versions"]
    assert_unchanged(base, before)
    assert_same_hooks(base, hooks)


def test_xla_flash_attention_toggles_on_a_clone_leave_the_base_processors(unet: torch.nn.Module) -> None:
    before, hooks = snapshot(unet), hooks_of(unet)
    processors = dict(unet.attn_processors)
    clone = LazyClonedModel(unet)
    clone.disable_xla_flash_attention()
    clone.set_use_xla_flash_attention(False)
    assert_unchanged(unet, before)
    assert_same_hooks(unet, hooks)
    assert all(unet.attn_processors[k] is p for k, p in processors.items())


def test_a_root_patch_that_changes_nothing_keeps_sharing_the_config(unet: torch.nn.Module) -> None:
    internal, processors = unet._internal_dict, dict(unet.attn_processors)
    clone = LazyClonedModel(unet)
    clone.patch_block("", lambda root: None)  # the scope copies the FrozenDict config and the processors...
    assert clone._internal_dict is internal  # ...and, unchanged, they go back to the base's objects
    assert all(clone.attn_processors[k] is p for k, p in processors.items())
