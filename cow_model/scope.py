"""Scopes: run code that mutates part of a clone's tree so that it acts on the clone alone.

``with Scope(state, root, what):`` covers the subtree under ``root`` (a module the clone owns)
copy-on-access, the way persistent data structures open a transient for a batch of changes:

1. ``root``'s child, parameter and buffer dicts answer reads with private stand-ins: a child the
   clone does not own becomes a shell copy (``cow_model.tree.shell_copy``), itself covered the
   same way; a tensor the clone does not own becomes an alias (a new tensor object viewing the
   same bytes). One stand-in per object, so a module at several paths and tied tensors stay tied.
   Only what the block reaches is copied: its cost follows what it touches, not the tree.
   Each covered module also gets copies of the attributes a write could reach through (nested
   dicts and lists, plain objects such as attention processors: ``tree.private_plain_state``,
   ``cow_copy`` semantics), since attribute reads cannot be intercepted.
2. The block runs under a :class:`~cow_model.guard.WriteGuard` protecting the storages shared
   with the base and the base's own tensor objects.
3. On success, stand-ins nothing changed are swapped back for the originals (the clone keeps
   sharing them) and the rest become the clone's own; so do copied plain attributes the block
   left equal to the original (compared structurally, ``tree.unchanged``). Tensors the block created are the clone's
   too; one viewing shared bytes (``weight.data`` wrapped in a new parameter, as ``weight_norm``
   does) is copied first, so later writes to it cannot reach the base.
4. On an exception, the clone's tree is put back as it was (the same container objects, so hook
   handles keep working), and so are the clone's own tensors the block reached or wrote: their
   ``.data`` and ``requires_grad`` (saved when the block first read them) and their bytes (saved
   by the guard before the first write to each of the clone's own storages). The exception propagates.

Nothing of the machinery stays reachable from the tree or makes a cycle: on-access dicts copy,
deep-copy and pickle as plain dicts of their stand-ins (``copy.deepcopy(module)``, fusion and PEFT's
``modules_to_save`` work inside a scope), other threads read them as plain dicts (no stand-ins made
for them), and closing a scope puts new plain dicts in place rather than rewriting the ones a
concurrent reader may be iterating.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .guard import Protected, WriteGuard
from .tree import (
    PLAIN_CONTAINERS,
    alias,
    link,
    private_plain_state,
    same_state,
    same_tensor_view,
    shell_copy,
    storage_id,
    unchanged,
)

if TYPE_CHECKING:
    from .state import CloneState

_KINDS = ("_modules", "_parameters", "_buffers")


class _OnAccess(dict[str, Any]):
    """A module's child, parameter or buffer dict inside a scope: reads get private stand-ins."""

    __slots__ = ("kind", "owner", "resolved", "scope")

    def __init__(self, scope: Scope, owner: nn.Module, kind: str, items: dict[str, Any]) -> None:
        super().__init__(items)
        self.scope = scope
        self.owner = owner
        self.kind = kind
        self.resolved: set[str] = set()

    def _resolve(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        if key not in self.resolved and self.scope.thread == threading.get_ident():
            self.resolved.add(key)
            if value is not None:
                value = self.scope.stand_in(value, self, key)
                dict.__setitem__(self, key, value)
        return value

    def __getitem__(self, key: str) -> Any:
        return self._resolve(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self._resolve(key) if dict.__contains__(self, key) else default

    def __iter__(self) -> Iterator[str]:  # a Python __iter__ keeps dict(d), d.copy() ... off C fast paths
        return iter(list(dict.keys(self)))

    def values(self) -> list[Any]:  # type: ignore[override]
        return [self._resolve(key) for key in list(dict.keys(self))]

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return [(key, self._resolve(key)) for key in list(dict.keys(self))]

    def copy(self) -> dict[str, Any]:
        return dict(self.items())

    def pop(self, key: str, *default: Any) -> Any:
        if dict.__contains__(self, key):
            self._resolve(key)
        self.resolved.discard(key)
        return dict.pop(self, key, *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return self._resolve(key)
        self[key] = default
        return default

    def __setitem__(self, key: str, value: Any) -> None:
        self.resolved.add(key)
        dict.__setitem__(self, key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def raw(self) -> dict[str, Any]:
        return dict(dict.items(self))

    def __copy__(self) -> dict[str, Any]:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(self.copy(), memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (dict, (self.copy(),))


class Scope:
    """A copy-on-access transaction over the subtree under ``root`` (module doc); ``root`` must be owned."""

    def __init__(
        self,
        state: CloneState,
        root: nn.Module,
        what: str,
        undo: list[Callable[[], None]] | None = None,
        *,
        origin: nn.Module | None = None,
    ) -> None:
        self.state = state
        self.root = root
        self.what = what
        self.undo = undo if undo is not None else []
        self.origin = origin  # what ``root`` was copied from for this scope (a rollback drops ``root``)
        self.shells: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(original) -> (shell, original)
        self.aliases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(source) -> (alias, source)
        self.covered: list[tuple[nn.Module, dict[str, dict[str, Any]]]] = []
        self.links: dict[int, list[tuple[nn.Module, str]]] = {}  # id(shell) -> (parent, name) it is read at
        self.thread = threading.get_ident()
        self.saved_tensors: dict[
            int, tuple[torch.Tensor, torch.Tensor, bool]
        ] = {}  # the clone's own, as read
        self.saved_bytes: dict[
            tuple[str, int], tuple[Any, Any]
        ] = {}  # the clone's own storages, before a write
        self._own_storages: set[tuple[str, int]] | None = None
        self.plain: list[tuple[nn.Module, list[tuple[str, Any, Any]]]] = []  # copied plain attributes
        self.memo: dict[int, Any] = {}  # one copy per plain object in the whole scope
        self._guard: WriteGuard | None = None

    # -- covering ------------------------------------------------------------------------------

    def __enter__(self) -> Scope:
        self.state.lock.acquire()
        self.state.scopes.append(self)
        self.state.base_changed()  # what the base holds is read again for every scope
        try:
            self._cover(self.root, snapshot=self.origin is None)
            self._guard = WriteGuard(self.protected, self.state.describe, self.what, self._before_write)
            self._guard.__enter__()
        except BaseException:
            self._rollback()
            self._guard = None
            self.state.scopes.pop()
            self.state.lock.release()
            raise
        return self

    def _cover(self, module: nn.Module, snapshot: bool) -> None:
        """Give ``module`` on-access dicts, remembering its own dicts to put back."""
        if snapshot:
            self.undo.append(_restorer(module))
        made = private_plain_state(module, self.memo)
        if made:
            self.plain.append((module, made))
        state = module.__dict__
        originals = {kind: state[kind] for kind in _KINDS}
        for kind, held in originals.items():
            state[kind] = _OnAccess(self, module, kind, held)
        self.covered.append((module, originals))

    def stand_in(self, value: Any, where: _OnAccess, key: str) -> Any:
        """The private stand-in for ``value`` read from ``where`` (module doc, step 1)."""
        state = self.state
        if where.kind == "_modules":
            if id(value) in state.owned:
                if not any(module is value for module, _ in self.covered):
                    self._cover(value, snapshot=True)
                return value
            made = self.shells.get(id(value))
            if made is None:
                shell = shell_copy(value)
                made = self.shells[id(value)] = (shell, value)
                state.owned[id(shell)] = shell
                self._cover(shell, snapshot=False)
            self.links.setdefault(id(made[0]), []).append((where.owner, key))
            return made[0]
        if id(value) in state.own_tensors or id(value) in state.aliases:
            if id(value) not in self.saved_tensors:
                self.saved_tensors[id(value)] = (value, value.data, value.requires_grad)
            return value
        pair = self.aliases.get(id(value))
        if pair is None:
            pair = self.aliases[id(value)] = (alias(value), value)
        return pair[0]

    def protected(self) -> Protected:
        """Storages and tensor objects the block must not write: the base's (``CloneState.shared``)."""
        return self.state.shared().protected

    def _before_write(self, tensor: torch.Tensor, key: tuple[str, int] | None) -> None:
        """Save the bytes of one of the clone's own storages before the block first writes it."""
        if key is None or key in self.saved_bytes:
            return
        if self._own_storages is None:
            self._own_storages = {storage_id(t) for t in self.state.own_tensors.values()} - {None}  # type: ignore[assignment]
        if key in self._own_storages:  # type: ignore[operator]
            storage = tensor.untyped_storage()
            self.saved_bytes[key] = (storage, storage.clone())

    # -- closing -------------------------------------------------------------------------------

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        assert self._guard is not None
        self._guard.__exit__(kind, error, tb)
        self._guard = None  # it refers back to the scope: no cycle outlives the block
        try:
            if error is None:
                self._commit()
            else:
                self._rollback()
        finally:
            self.state.scopes.pop()
            self.state.lock.release()

    def _uncover(self) -> None:
        """Plain dicts back in every covered module (a module's own dict objects where it had them)."""
        for module, originals in self.covered:
            state = module.__dict__
            for kind in _KINDS:
                current = state[kind]
                if not isinstance(current, _OnAccess):
                    continue  # the block replaced the whole dict: keep what it put there
                held = originals[kind]
                items = current.raw()
                state[kind] = type(held)(items) if type(held) in PLAIN_CONTAINERS else items

    def _rollback(self) -> None:
        for module, originals in self.covered:
            for kind in _KINDS:
                if isinstance(module.__dict__[kind], _OnAccess):
                    module.__dict__[kind] = originals[kind]
        for undo in reversed(self.undo):
            undo()
        for shell, _ in self.shells.values():
            self.state.owned.pop(id(shell), None)
        with torch.no_grad():
            for storage, saved in self.saved_bytes.values():
                storage.copy_(saved)
            for tensor, data, requires_grad in self.saved_tensors.values():
                tensor.data = data
                if tensor.requires_grad != requires_grad:
                    tensor.requires_grad_(requires_grad)

    def _share_unchanged_plain_state(self) -> None:
        """Plain attributes the block did not change go back to the objects the module shared."""
        for module, made in self.plain:
            held = module.__dict__
            for name, copied, original in made:
                if held.get(name) is copied and unchanged(copied, original):
                    held[name] = original

    def _commit(self) -> None:
        state = self.state
        self._share_unchanged_plain_state()
        resolved = [
            (module, kind, key)
            for module, _ in self.covered
            for kind in _KINDS
            if isinstance(module.__dict__[kind], _OnAccess)
            for key in module.__dict__[kind].resolved
        ]
        self._uncover()
        swap: dict[int, Any] = {
            id(made): source for made, source in self.aliases.values() if same_tensor_view(made, source)
        }
        kept = {id(made): source for made, source in self.aliases.values() if id(made) not in swap}
        for module, kind, key in resolved:
            held = module.__dict__[kind]
            if kind != "_modules" and id(held.get(key)) in swap:
                held[key] = swap[id(held[key])]
        for shell, original in reversed(list(self.shells.values())):
            if same_state(shell, original):
                del state.owned[id(shell)]
                for owner, key in self.links.get(id(shell), ()):
                    if owner.__dict__["_modules"].get(key) is shell:
                        link(owner.__dict__["_modules"], key, original, owner)
            else:
                state.adopt_shell(shell, original)
        known = {id(source) for _, source in self.aliases.values()} | {id(o) for _, o in self.shells.values()}
        copies: dict[int, torch.Tensor] = {}
        for module, kind, key in resolved:
            value = module.__dict__[kind].get(key)
            if value is None or id(value) in known:
                continue
            if kind == "_modules":
                if id(value) not in state.owned:
                    self._adopt_module(value, known, copies)
            elif id(value) in kept and not value.requires_grad:
                state.adopt_tensor(value, kept[id(value)], self._base_slot(module, kind, key))
            else:
                self._adopt_tensor(module.__dict__[kind], key, value, copies)

    def _base_slot(self, module: nn.Module, kind: str, key: str) -> tuple[nn.Module, str, str] | None:
        """Where the base holds the tensor ``module`` held at ``kind``/``key`` before the clone replaced it."""
        for shell, original in self.shells.values():
            if shell is module:
                return (original, kind, key)
        origin = self.state.origins.get(id(module))
        return (origin.original, kind, key) if origin is not None else None

    def _adopt_tensor(
        self, held: dict[str, Any], key: str, tensor: torch.Tensor, copies: dict[int, Any]
    ) -> None:
        """A tensor the block put in the clone becomes the clone's (module doc, step 3).

        The base's own tensor objects stay shared wherever the block put them; a new tensor object
        viewing the base's bytes (``weight.data`` wrapped in a parameter, an alias made trainable)
        is copied first, so that training or converting it cannot write the base.
        """
        state = self.state
        if id(tensor) in state.aliases and tensor.requires_grad:
            state.privatise(tensor)  # an alias made trainable: training must not write the base
        if id(tensor) in state.own_tensors or id(tensor) in state.aliases:
            return
        shared = state.shared()
        if id(tensor) in shared.objects:
            return
        if storage_id(tensor) in shared.storages:
            if id(tensor) not in copies:
                copies[id(tensor)] = _private_copy(tensor)
            tensor = held[key] = copies[id(tensor)]
        state.own_tensors[id(tensor)] = tensor

    def adopt(self, module: nn.Module) -> None:
        """After the block: ``module``, which it installed outside the covered dicts (a patch's return value), becomes the clone's."""
        known = {id(source) for _, source in self.aliases.values()} | {id(o) for _, o in self.shells.values()}
        if id(module) not in self.state.owned:
            self._adopt_module(module, known, {})

    def _adopt_module(self, module: nn.Module, known: set[int], copies: dict[int, Any]) -> None:
        """A module the block installed becomes the clone's, with the tensors it holds."""
        base_modules = self.state.shared().modules
        stack = [module]
        while stack:
            current = stack.pop()
            if id(current) in base_modules:
                continue  # a module of the base the block placed here: still shared
            self.state.owned[id(current)] = current
            for kind in ("_parameters", "_buffers"):
                held = current.__dict__[kind]
                for key, tensor in list(held.items()):
                    if tensor is not None and id(tensor) not in known:
                        self._adopt_tensor(held, key, tensor, copies)
            for child in current._modules.values():
                if child is not None and id(child) not in known and id(child) not in self.state.owned:
                    stack.append(child)


def _private_copy(tensor: torch.Tensor) -> torch.Tensor:
    copied = tensor.detach().clone()
    if isinstance(tensor, nn.Parameter):
        return torch.Tensor._make_subclass(type(tensor), copied, tensor.requires_grad)
    return copied


def _restorer(module: nn.Module) -> Callable[[], None]:
    saved = {k: (v, v.copy() if type(v) in PLAIN_CONTAINERS else None) for k, v in module.__dict__.items()}

    def restore() -> None:
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

    return restore
