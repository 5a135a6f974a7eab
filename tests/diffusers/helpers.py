"""Helpers for the diffusers tests: inputs for the tiny UNet and a full mutation snapshot of a model."""

from __future__ import annotations

import torch


def face(seed: int) -> torch.Tensor:
    """A random 512-d 'face embedding' of insightface's scale (norm ~ 20)."""
    return torch.randn(1, 512, generator=torch.Generator().manual_seed(seed))


def unet_inputs(batch: int = 2, seed: int = 0, timestep: float = 500.0) -> tuple[tuple, dict]:
    """Positional and keyword arguments for one forward of the tiny SDXL UNet."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 7, 64, generator=g)
    added = {
        "text_embeds": torch.randn(batch, 32, generator=g),
        "time_ids": torch.randn(batch, 6, generator=g),
    }
    return (sample, torch.tensor(timestep), text), {"added_cond_kwargs": added}


def run(model, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs).sample


def snapshot(model: torch.nn.Module) -> dict:
    """Everything that shows a model was mutated: tensor values, storage pointers, version counters,
    module objects at each path, each module's child dict and processor."""
    tensors = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    return {
        "values": {name: t.detach().clone() for name, t in tensors.items()},
        "pointers": {name: t.data_ptr() for name, t in tensors.items()},
        "versions": {name: t._version for name, t in tensors.items()},
        "modules": {
            name: (m, dict(m._modules), m.__dict__.get("processor"), dict(m._forward_pre_hooks))
            for name, m in model.named_modules()
        },
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["pointers"] == before["pointers"]
    assert after["versions"] == before["versions"]
    assert after["values"].keys() == before["values"].keys()
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), name
    assert after["modules"].keys() == before["modules"].keys()
    for name, (module, children, processor, hooks) in before["modules"].items():
        a_module, a_children, a_processor, a_hooks = after["modules"][name]
        assert a_module is module, name
        assert a_children == children and list(a_children) == list(children), name
        assert a_processor is processor, name
        assert a_hooks == hooks, name
