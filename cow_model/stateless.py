"""``torch.func.functional_call`` on clones: the swapped tensors go into the clone's shells, never the base's modules.

torch's ``functional_call`` swaps the given tensors into the modules found under the given names for the
call's duration (``torch.nn.utils.stateless._reparametrize_module``). On a clone those modules are the
base's own until the clone copies them, so a forward of the base in another thread would run on the
swapped tensors. Importing ``cow_model`` wraps that function: called on a clone, it first path-copies
every module a given name (or a name tied to it) lives in, holds the clone's lock for the call, and
afterwards drops the shells it made (the clone is as it was). For any other module it is torch's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn.utils import stateless

from .clone import LazyClonedModel

_TORCH_REPARAMETRIZE = stateless._reparametrize_module


def _tied_names(clone: LazyClonedModel, names: set[str]) -> set[str]:
    """``names`` and every other name of a tensor held under one of them."""
    held: dict[int, list[str]] = {}
    for name, tensor in [
        *clone.named_parameters(remove_duplicate=False),
        *clone.named_buffers(remove_duplicate=False),
    ]:
        held.setdefault(id(tensor), []).append(name)
    tied = set(names)
    for group in held.values():
        if not tied.isdisjoint(group):
            tied.update(group)
    return tied


def _module_paths(clone: LazyClonedModel, names: set[str]) -> list[str]:
    """The dotted paths of the existing modules holding ``names`` (unknown ones are left to torch's errors)."""
    paths = []
    for path in sorted({name.rpartition(".")[0] for name in names}):
        module: Any = clone
        for part in path.split(".") if path else []:
            module = module._modules.get(part) if module is not None else None
        if module is not None and path:
            paths.append(path)
    return paths


@contextlib.contextmanager
def _shells_for(clone: LazyClonedModel, names: set[str]) -> Iterator[None]:
    state = clone._cow
    with state.lock:
        before = set(state.owned.keys())
        undo: list[Callable[[], None]] = []
        try:
            for path in _module_paths(clone, _tied_names(clone, names)):
                clone._cow_path_copy(path, path.split("."), undo)
            yield
        finally:
            for restore in reversed(undo):
                restore()
            for key in set(state.owned.keys()) - before:
                state.owned.pop(key, None)
                state.origins.pop(key, None)


@contextlib.contextmanager
def _reparametrize_module(
    module: torch.nn.Module, parameters_and_buffers: dict[str, torch.Tensor], *args: Any, **kwargs: Any
) -> Iterator[None]:
    """torch's ``_reparametrize_module``, acting on a clone's shells when ``module`` is a clone (module doc)."""
    if isinstance(module, LazyClonedModel) and not torch.compiler.is_compiling():
        with _shells_for(module, set(parameters_and_buffers)):
            with _TORCH_REPARAMETRIZE(module, parameters_and_buffers, *args, **kwargs):
                yield
        return
    with _TORCH_REPARAMETRIZE(module, parameters_and_buffers, *args, **kwargs):
        yield


stateless._reparametrize_module = _reparametrize_module
