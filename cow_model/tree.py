"""Low-level helpers on ``torch.nn.Module`` trees: shell copies and tensor walks.

A *shell copy* of a module is a new object of the same class whose attribute dict is a
shallow copy of the original's, with every container in it (the parameter, buffer, child and
hook dicts, sets and lists) copied one level deep. Tensors and child modules stay shared, so a
shell costs a few dict copies and never a tensor copy; ``setattr``, ``register_*`` and child
replacement on the shell do not reach the original (``copy.copy`` would share those dicts).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

_CONTAINERS = (dict, set, list)
_PLAIN_CONTAINERS = frozenset({dict, OrderedDict, set, list})  # their .copy() keeps the type


def shell_copy(module: nn.Module) -> nn.Module:
    """A new module sharing ``module``'s tensors and children but owning its containers."""
    cls = module.__class__
    shell = cls.__new__(cls)
    state = module.__dict__.copy()
    for name, value in state.items():
        if type(value) in _PLAIN_CONTAINERS:
            state[name] = value.copy()
        elif isinstance(value, _CONTAINERS):
            state[name] = copy.copy(value)
    object.__setattr__(shell, "__dict__", state)
    return shell


def all_modules(root: nn.Module) -> list[nn.Module]:
    """Every distinct module under ``root`` (``root`` included), depth first, without building names."""
    seen = {id(root)}
    found = [root]
    stack = [root]
    while stack:
        for child in stack.pop()._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
                stack.append(child)
    return found


def all_tensors(root: nn.Module) -> dict[int, torch.Tensor]:
    """``id -> tensor`` for every distinct parameter and buffer under ``root``."""
    found: dict[int, torch.Tensor] = {}
    for module in all_modules(root):
        for tensors in (module._parameters, module._buffers):
            if tensors:
                for tensor in tensors.values():
                    if tensor is not None:
                        found[id(tensor)] = tensor
    return found


def named_tensors(root: nn.Module) -> dict[int, str]:
    """``id(tensor) -> first qualified name`` for every parameter and buffer under ``root``."""
    names: dict[int, str] = {}
    for prefix, module in root.named_modules(remove_duplicate=False):
        for kind in (module._parameters, module._buffers):
            for name, tensor in kind.items():
                if tensor is not None:
                    names.setdefault(id(tensor), f"{prefix}.{name}" if prefix else name)
    return names


def storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    """An identity for the storage behind ``tensor``; ``None`` for tensors without memory (meta)."""
    if tensor.device.type == "meta":
        return None
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def storage_bytes(root: nn.Module) -> dict[tuple[str, int], int]:
    """``storage_key -> nbytes`` for every storage that the tensors under ``root`` live in."""
    sizes: dict[tuple[str, int], int] = {}
    for tensor in all_tensors(root).values():
        key = storage_key(tensor)
        if key is not None:
            sizes[key] = tensor.untyped_storage().nbytes()
    return sizes


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter, or ``None`` for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None
