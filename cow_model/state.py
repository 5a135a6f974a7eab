"""``CloneState``: what a clone owns, decided once by its own actions.

A clone owns the modules it created (shell copies, modules a patch installed) and the tensors
whose bytes it made (loaded, converted, copied or patched in). It also holds *aliases*: tensor
objects of its own that view the base's bytes (made when a scoped method changed a shared tensor's
``requires_grad`` or attributes). An alias is a stand-in, never owned: it records the base tensor
it stands for and follows it (below), and it gets private bytes, in place (the same object, so an
optimizer holding it keeps working), as soon as it is trainable, whoever flipped the flag: at the
end of a scope, or at the clone's next call. A child clone copies the bytes its parent owns and
records its own aliases of what its parent's aliases stand for. Everything else in its tree is
shared with the base, and stays shared whatever the parent or the base does later: ownership
never comes from comparing with a live tree.

Following the base: a shell keeps the parameter and buffer objects it inherited. When the base
replaces one (``base.double()`` converts buffers into new tensors; parameters into new ones on
some conversions), :meth:`CloneState.follow` puts the base's new object into the shell, and
re-points aliases at their source's new bytes, so the clone never runs a mixed tree of stale
and converted shared tensors. The clone's own tensors are its own business (convert them with
the clone's ``to()``).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .guard import Protected
from .tree import named_tensors, raw_modules, raw_tensors, storage_id, tensor_slots

if TYPE_CHECKING:
    from .scope import Scope


@dataclass
class Shared:
    """Storages (``storage_id``), tensor objects and modules (``id``) of a clone's base."""

    storages: set[tuple[str, int]]
    objects: set[int]
    modules: set[int]

    @property
    def protected(self) -> Protected:
        return (self.storages, self.objects)


@dataclass
class _Origin:
    """The base module a shell was copied from, and the tensor objects the shell inherited from it."""

    original: nn.Module
    inherited: dict[str, dict[str, torch.Tensor]]


@dataclass
class _AliasOf:
    """An alias the clone owns and the base tensor whose bytes it views (``None``: never follows)."""

    alias: weakref.ref[torch.Tensor]
    source: torch.Tensor
    viewing: tuple[Any, ...]
    slot: tuple[nn.Module, str, str] | None = None
    """Where the base holds ``source`` (module, ``_parameters``/``_buffers``, name): a new object there is followed."""


def _view_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (storage_id(tensor), tensor.dtype, tensor.device, tensor.shape)


class CloneState:
    """Bookkeeping of one clone: owned modules, owned tensors, aliases, origins (module doc)."""

    def __init__(self, root: nn.Module, base: nn.Module, check_writes: bool) -> None:
        self.root = weakref.ref(root)
        self.base = base
        self.check_writes = check_writes
        self.owned: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
        self.own_tensors: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.aliases: dict[int, _AliasOf] = {}
        self.origins: dict[int, _Origin] = {}
        self.scopes: list[Scope] = []
        self._shared: Shared | None = None
        self.lock = threading.RLock()
        self.lazy: list[str] | None = None
        """Paths of the base's lazy modules still uninitialized in the clone (``None``: not looked for yet)."""

    # -- ownership -----------------------------------------------------------------------------

    def adopt_shell(self, shell: nn.Module, original: nn.Module) -> None:
        """Record ``shell`` (a copy of ``original``) as the clone's, following ``original``'s tensors."""
        self.owned[id(shell)] = shell
        inherited = {}
        for kind in ("_parameters", "_buffers"):
            mine, theirs = shell.__dict__[kind], original.__dict__[kind]
            same = {name: t for name, t in mine.items() if t is not None and theirs.get(name) is t}
            if same:
                inherited[kind] = same
        if inherited:
            self.origins[id(shell)] = _Origin(original, inherited)

    def adopt_tensor(
        self,
        tensor: torch.Tensor,
        source: torch.Tensor | None,
        slot: tuple[nn.Module, str, str] | None = None,
    ) -> None:
        """Record ``tensor`` as the clone's: an alias of ``source`` (held by the base at ``slot``) while it
        views its bytes, else private."""
        if source is not None and storage_id(tensor) == storage_id(source) and storage_id(tensor) is not None:
            self.aliases[id(tensor)] = _AliasOf(weakref.ref(tensor), source, _view_key(source), slot)
        else:
            self.own_tensors[id(tensor)] = tensor

    def adopt_alias_of(self, tensor: torch.Tensor, record: _AliasOf) -> None:
        """Record ``tensor`` as an alias standing for what another clone's alias ``record`` stands for."""
        self.aliases[id(tensor)] = _AliasOf(weakref.ref(tensor), record.source, record.viewing, record.slot)

    def privatise(self, tensor: torch.Tensor) -> None:
        """Give the alias ``tensor`` private bytes in place (same object); it becomes the clone's own."""
        self.aliases.pop(id(tensor), None)
        with torch.no_grad():
            tensor.data = tensor.detach().clone()
        self.own_tensors[id(tensor)] = tensor
        self.base_changed()

    def in_scope_here(self) -> bool:
        """Whether this thread has a scope of the clone open (its call runs inside a patch or method)."""
        here = threading.get_ident()
        return any(scope.thread == here for scope in self.scopes)

    def base_changed(self) -> None:
        self._shared = None

    # -- following the base --------------------------------------------------------------------

    def follow(self) -> None:
        """Take the base's replacements of inherited tensors (module doc); cost O(inherited + aliases)."""
        if self.origins:
            self._follow_shells()
        if self.aliases:
            self._follow_aliases()

    def _follow_shells(self) -> None:
        for key, origin in list(self.origins.items()):
            shell = self.owned.get(key)
            if shell is None:
                del self.origins[key]
                continue
            for kind, inherited in origin.inherited.items():
                mine, theirs = shell.__dict__[kind], origin.original.__dict__[kind]
                for name, tensor in inherited.items():
                    now = theirs.get(name)
                    if now is not tensor and now is not None:
                        if mine.get(name) is tensor:
                            mine[name] = now
                        inherited[name] = now
                        self.base_changed()

    def _follow_aliases(self) -> None:
        for key, record in list(self.aliases.items()):
            alias = record.alias()
            if alias is None:
                del self.aliases[key]
                continue
            if alias.requires_grad:  # unfrozen outside any scope: it trains its own bytes
                self.privatise(alias)
                continue
            source = record.source
            if record.slot is not None:
                module, kind, name = record.slot
                held = module.__dict__[kind].get(name)
                if held is not None and held is not source:  # the base put a new object there
                    alias.data = held.detach()
                    record.source, record.viewing = held, _view_key(held)
                    self.base_changed()
                    continue
            now = _view_key(source)
            if now != record.viewing:
                if _view_key(alias)[0] == record.viewing[0]:
                    alias.data = source.detach()
                record.viewing = now
                self.base_changed()

    # -- questions -----------------------------------------------------------------------------

    def shared(self) -> Shared:
        """What the clone shares with its base: the base's storages, tensor objects and modules.

        Read from the base's own tree (never from the clone's, so nothing the clone does can make
        its own tensors look shared or the base's look owned); cached until the base is seen to
        change. A base that is itself a clone answers with its tree as it is now.
        """
        if self._shared is None:
            storages: set[tuple[str, int]] = set()
            objects: set[int] = set()
            modules: set[int] = set()
            for module in raw_modules(self.base):
                modules.add(id(module))
                for tensor in raw_tensors(module):
                    objects.add(id(tensor))
                    key = storage_id(tensor)
                    if key is not None:
                        storages.add(key)
            self._shared = Shared(storages, objects, modules)
        return self._shared

    def describe(self, tensor: torch.Tensor) -> str:
        """A name for ``tensor`` in the clone's tree, by object or by the storage it views."""
        root = self.root()
        if root is None:
            return "a tensor"
        names = named_tensors(root)
        if id(tensor) in names:
            return repr(names[id(tensor)])
        key = storage_id(tensor)
        for module_name, module in root.named_modules(remove_duplicate=False):
            for _, name, held in tensor_slots(module):
                if storage_id(held) == key:
                    return (
                        f"{module_name + '.' if module_name else ''}{name!s} (through a view of its storage)"
                    )
        return "a tensor"
