"""Shared by the contract tests: a small model, and everything about a base a clone must not change."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)),
        nn.Linear(8, 2),
    ).eval()


def state(model: nn.Module) -> dict[str, Any]:
    """Everything about a model a clone must not change."""
    return {
        "tensors": {
            name: (id(t), t.dtype, t.device, t.requires_grad, t.data_ptr(), t.detach().clone(), t.grad)
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        },
        "modules": [
            (name, id(m), type(m), m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for name, m in model.named_modules(remove_duplicate=False)
        ],
        "attrs": {
            name: sorted(k for k in vars(m) if not k.startswith("_")) for name, m in model.named_modules()
        },
    }


def assert_same(before: dict[str, Any], model: nn.Module) -> None:
    after = state(model)
    assert before["modules"] == after["modules"]
    assert before["attrs"] == after["attrs"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (ident, dtype, device, grad, ptr, value, g) in before["tensors"].items():
        now = after["tensors"][name]
        assert now[:5] == (ident, dtype, device, grad, ptr), name
        assert torch.equal(now[5], value), name
        assert now[6] is g, name


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
