"""Scopes: run code that mutates part of a clone's tree so that it acts on the clone alone.

``Scope(state, root, what)`` covers the subtree under ``root`` (a module the clone owns) for the
duration of a ``with`` block:

1. every module under ``root`` that the clone does not own is replaced by a shell copy
   (``cow_model.tree.shell_copy``): a module registered at several paths gets one shell, linked
   at all of them; modules the clone owns are used as they are;
2. every tensor held there that is not the clone's own is replaced by an alias (a new tensor
   object viewing the same storage), one alias per tensor, so ties stay ties;
3. the block runs under a :class:`~cow_model.guard.WriteGuard` protecting the storages of the
   shared tensors and the tensor objects of the base;
4. on success, shells and aliases that nothing changed are swapped back for the originals
   (the clone keeps sharing them), and the rest become the clone's own. Tensors the block
   created are the clone's own too; one that views a shared storage (``weight.data`` wrapped in
   a new parameter, as ``weight_norm`` does) is copied, so later writes to it cannot reach the base;
5. on an exception, the clone's tree is put back exactly as it was (container objects included,
   so hook handles keep working) and the exception propagates.

Cost: one shell per module and one alias per tensor under ``root``, whatever the block touches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .guard import Protected, WriteGuard, storage_id
from .tree import PLAIN_CONTAINERS, alias, link, same_state, same_tensor_view, shell_copy, tensor_slots

if TYPE_CHECKING:
    from .state import CloneState

Link = tuple[dict[str, Any], str, nn.Module]
"""Where a shell is linked: the parent's child dict, the name, the parent."""
Slot = tuple[dict[str, Any], str]


@dataclass
class _Shelled:
    shell: nn.Module
    original: nn.Module
    links: list[Link] = field(default_factory=list)


@dataclass
class _Aliased:
    alias: torch.Tensor
    source: torch.Tensor
    slots: list[Slot] = field(default_factory=list)


def snapshot(module: nn.Module) -> dict[str, Any]:
    """``module``'s attribute dict with each container copied, for :func:`restore`."""
    return {k: (v, v.copy() if type(v) in PLAIN_CONTAINERS else None) for k, v in module.__dict__.items()}


def restore(module: nn.Module, saved: dict[str, Any]) -> None:
    """Put ``module``'s attributes back as :func:`snapshot` saw them, refilling the same container objects."""
    state = module.__dict__
    for key in [k for k in state if k not in saved]:
        del state[key]
    for key, (value, contents) in saved.items():
        if contents is not None:
            value.clear()
            if isinstance(value, list):
                value.extend(contents)
            else:
                value.update(contents)
        state[key] = value


class Scope:
    """A transaction over the subtree under ``root`` (module doc). ``root`` must be owned by the clone."""

    def __init__(
        self, state: CloneState, root: nn.Module, what: str, undo: list[Callable[[], None]] | None = None
    ):
        self.state = state
        self.root = root
        self.what = what
        self.undo = undo if undo is not None else []
        self.shelled: dict[int, _Shelled] = {}
        self.aliased: dict[int, _Aliased] = {}
        self.covered: list[nn.Module] = []
        self._guard: WriteGuard | None = None
        self._protected: Protected | None = None

    # -- opening -------------------------------------------------------------------------------

    def __enter__(self) -> Scope:
        self.state.scopes.append(self)
        try:
            self._cover(self.root)
        except BaseException:
            self._rollback()
            raise
        self.protected()  # as the tree is before the block runs
        self._guard = WriteGuard(self.protected, self.state.describe, self.what)
        self._guard.__enter__()
        return self

    def _cover(self, root: nn.Module) -> None:
        owned = self.state.owned
        stack = [root]
        seen = {id(root)}
        while stack:
            module = stack.pop()
            self.covered.append(module)
            if id(module) in owned:
                self.undo.append(_restorer(module))
            self._alias_tensors(module)
            children = module._modules
            for name, child in list(children.items()):
                if child is None:
                    continue
                if id(child) not in owned:
                    record = self.shelled.get(id(child))
                    if record is None:
                        record = _Shelled(shell_copy(child), child)
                        self.shelled[id(child)] = record
                        owned[id(record.shell)] = record.shell
                    record.links.append((children, name, module))
                    link(children, name, record.shell, module)
                    child = record.shell
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)

    def _alias_tensors(self, module: nn.Module) -> None:
        mine, aliases = self.state.own_tensors, self.state.aliases
        for container, name, tensor in list(tensor_slots(module)):
            if id(tensor) in mine or id(tensor) in aliases:
                continue
            record = self.aliased.get(id(tensor))
            if record is None:
                record = _Aliased(alias(tensor), tensor)
                self.aliased[id(tensor)] = record
            record.slots.append((container, name))
            container[name] = record.alias

    def protected(self) -> Protected:
        """Storages and tensor objects the block must not write: those shared with the base."""
        if self._protected is None:
            storages: set[tuple[str, int]] = set()
            objects: set[int] = set()
            for record in self.aliased.values():
                objects.add(id(record.source))
                key = storage_id(record.source)
                if key is not None:
                    storages.add(key)
            storages |= self.state.shared_storages_of(self.covered)
            self._protected = (storages, objects)
        return self._protected

    # -- closing -------------------------------------------------------------------------------

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        assert self._guard is not None
        self._guard.__exit__(kind, error, tb)
        try:
            if error is None:
                self._commit()
            else:
                self._rollback()
        finally:
            self.state.scopes.pop()
            self.state.changed()

    def _rollback(self) -> None:
        for undo in reversed(self.undo):
            undo()
        for record in self.shelled.values():
            self.state.owned.pop(id(record.shell), None)

    def _commit(self) -> None:
        state = self.state
        for aliased in self.aliased.values():
            alias_ = aliased.alias
            still = [(c, n) for c, n in aliased.slots if c.get(n) is alias_]
            if same_tensor_view(alias_, aliased.source):
                for container, name in still:
                    container[name] = aliased.source
            elif still:
                state.adopt_tensor(alias_, aliased.source)
        for record in reversed(list(self.shelled.values())):
            shell = record.shell
            linked = [(c, n, p) for c, n, p in record.links if c.get(n) is shell]
            if linked and len(linked) == len(record.links) and same_state(shell, record.original):
                for container, name, parent in linked:
                    link(container, name, record.original, parent)
                del state.owned[id(shell)]
            else:
                state.adopt_shell(shell, record.original)
        self._adopt_new_tensors()

    def _adopt_new_tensors(self) -> None:
        """Tensors the block created become the clone's; one viewing shared bytes is copied first."""
        state = self.state
        known = {id(r.source) for r in self.aliased.values()}
        copies: dict[int, torch.Tensor] = {}
        for module in _owned_or_new(self.root, {id(r.original) for r in self.shelled.values()}):
            for container, name, tensor in list(tensor_slots(module)):
                if id(tensor) in known or id(tensor) in state.own_tensors or id(tensor) in state.aliases:
                    continue
                if storage_id(tensor) in self.protected()[0]:
                    if id(tensor) not in copies:
                        copies[id(tensor)] = _private_copy(tensor)
                    tensor = container[name] = copies[id(tensor)]
                state.own_tensors[id(tensor)] = tensor


def _owned_or_new(root: nn.Module, originals: set[int]) -> list[nn.Module]:
    """Modules under ``root`` other than the shared ``originals`` (owned, or installed by the block)."""
    found = []
    stack = [root]
    seen = {id(root)}
    while stack:
        module = stack.pop()
        found.append(module)
        for child in module._modules.values():
            if child is not None and id(child) not in seen and id(child) not in originals:
                seen.add(id(child))
                stack.append(child)
    return found


def _private_copy(tensor: torch.Tensor) -> torch.Tensor:
    copied = tensor.detach().clone()
    if isinstance(tensor, nn.Parameter):
        return torch.Tensor._make_subclass(type(tensor), copied, tensor.requires_grad)
    return copied


def _restorer(module: nn.Module) -> Callable[[], None]:
    saved = snapshot(module)
    return lambda: restore(module, saved)
