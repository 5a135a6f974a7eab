"""``LazyClonedModel``: a copy-on-write clone of a ``torch.nn.Module`` tree.

A clone *is* a module: ``LazyClonedModel(base)`` returns a shell copy of ``base``'s root (a new
object whose parameter, buffer, child and hook dicts are shallow copies) of a subclass made once
per model class, named as the model class, with the clone's methods mixed in. ``type(clone).__name__``,
``clone.__class__``, ``hash``, every attribute and ``torch.compile(clone, fullgraph=True)`` behave
as for the model; ``isinstance(clone, LazyClonedModel)`` tells a clone.

What is shared, what is copied:

- Every child module, parameter and buffer is the base's own object until the clone changes it.
  Nothing is walked or copied at construction, whatever the model's size (one exception: a base
  in training mode, see ``train``).
- ``patch_block(path, fn)`` copies the module at ``path`` and its ancestors as shells (path
  copying); ``fn`` runs in a scope (``cow_model.scope``) over that module's subtree, under the
  write guard, so it may change anything there, children's hooks and parameters' attributes
  included, and only what it changed stays copied. No tensor is copied unless ``fn`` makes one.
- Mutating methods run in a scope over the whole tree (a shell per module and an alias per
  tensor, milliseconds, no tensor bytes), under the write guard: ``train``/``eval`` (the model's
  own override runs), ``apply``, ``requires_grad_``, ``zero_grad``, the ``to()`` family, and every
  method registered with :func:`register_scoped_method` (``cow_model.diffusers`` registers
  diffusers' and PEFT's). Each acts on the clone alone or raises ``SharedWeightsError`` naming
  the method, with the clone unchanged.
- Ownership is decided by the clone's own actions (``cow_model.state``) and never re-decided:
  the clone never re-copies a module it owns, so hook handles keep working, and a parent's later
  changes never reach its child clones (a child copies what its parent owned when it is made).

Writes to shared tensors are never silent where the guard runs: in ``patch_block`` functions and
scoped methods always; in forward passes with ``check_writes=True`` (off by default: a forward
then runs exactly the module's own code). ``to()``, ``half()``... convert the clone's own tensors
and raise ``SharedWeightsError`` if a shared one would change: convert the base instead; clones
follow it (the base's new tensors replace the ones a clone's shells inherited, at the clone's
next call). ``load_state_dict`` loads into new private tensors, one per tied tensor.

Gradients: a backward pass through a clone accumulates ``.grad`` on the parameters it shares,
which are the base's parameter objects, exactly as calling the base would. To train something
on a clone, freeze the base (``base.requires_grad_(False)``) and patch trainable modules in:
only those get gradients, and an optimizer over ``clone.parameters()`` that are ``requires_grad``
touches only the clone's own tensors.
"""

from __future__ import annotations

import copy
import difflib
import functools
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.module import _IncompatibleKeys
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from .errors import SharedWeightsError, UnknownPathError
from .guard import WriteGuard
from .scope import Scope, _private_copy
from .state import CloneState
from .tree import (
    STATE_ATTR,
    alias,
    all_modules,
    link,
    raw_modules,
    shell_copy,
    storage_bytes,
    storage_id,
    tensor_slots,
    tensors_held,
)

PatchFn = Callable[[nn.Module], "nn.Module | None"]

_SCOPED: dict[str, Callable[..., Any] | None] = {}
"""Registered method names -> a clone-specific implementation, or ``None`` to scope the model's own."""
_CLASSES: dict[type, type] = {}
"""Model class -> its clone class."""


def _describe(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class _ModelFirst:
    """A clone attribute that yields to a parameter, buffer or child of the model with the same name."""

    def __init__(self, fget: Callable[[Any], Any]) -> None:
        self.fget = fget
        self.name = fget.__name__
        self.__doc__ = fget.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        state = obj.__dict__
        for kind in ("_parameters", "_buffers", "_modules"):
            held = state.get(kind)
            if held and self.name in held:
                return held[self.name]
        return self.fget(obj)


class _CloneMaker(type):
    """``LazyClonedModel(base)`` makes a clone; a clone class called as its model class makes a plain model.

    So ``type(clone)(**config)`` and ``type(clone).from_pretrained(...)`` build the model, as for
    the model's own class, and a clone class's ``__init__`` is the model's (its signature too).
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is LazyClonedModel:
            return _make_clone(*args, **kwargs)
        return cls.__cow_base_class__(*args, **kwargs)  # type: ignore[attr-defined]


class LazyClonedModel(nn.Module, metaclass=_CloneMaker):
    """``LazyClonedModel(base, *, check_writes=False)``: a copy-on-write clone of ``base`` (module doc).

    ``base`` may itself be a clone: the new clone shares with both and owns copies of what the
    parent owned. Raises ``TypeError`` naming what was given when ``base`` is not a module.
    """

    __cow_base_class__: type[nn.Module] = nn.Module

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self).__cow_base_class__

    @property
    def _cow(self) -> CloneState:
        return self.__dict__[STATE_ATTR]  # type: ignore[no-any-return,unused-ignore]

    # -- calling -------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self._cow
        if not torch.compiler.is_compiling():
            state.follow()
            if state.lazy is None or state.lazy:
                self._cow_own_lazy_modules()
            if _shares_training_buffers(self) and not state.in_scope_here():
                self._cow_scoped("a training-mode forward", lambda: _private_training_buffers(self))
            if state.check_writes:
                state.base_changed()  # what the base holds now is what the guard protects
                with WriteGuard(
                    lambda: state.shared().protected, state.describe, "a forward through this clone"
                ):
                    return super().__call__(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def _cow_own_lazy_modules(self) -> None:
        """Before the first forward: path-copy the base's uninitialized lazy modules (``nn.LazyLinear`` ...) with
        new uninitialized tensors of the clone's own, so that the forward materialises them on the clone's shells."""
        state = self._cow
        with state.lock:
            if state.lazy is None:
                state.lazy = [
                    name
                    for name, module in self.named_modules()
                    if name and isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()  # type: ignore[misc]
                ]
            for path in state.lazy:
                shell = self._cow_path_copy(path, path.split("."), [])[0][-1]
                for kind in ("_parameters", "_buffers"):
                    held = shell.__dict__[kind]
                    for name, tensor in list(held.items()):
                        if isinstance(tensor, UninitializedTensorMixin):
                            made = held[name] = alias(tensor)  # a new uninitialized tensor of its kind
                            state.own_tensors[id(made)] = made
            state.lazy = []

    # -- structure -----------------------------------------------------------------------------

    @_ModelFirst
    def base(self) -> nn.Module:
        """The module this clone was made from (for a clone of a clone, the parent)."""
        return self._cow.base

    def patch_block(self, path: str, fn: PatchFn) -> nn.Module:
        """Give ``fn`` a private copy of the module at dotted ``path`` ("" is the root).

        ``fn`` may set attributes, processors, children or hooks on the copy and on anything
        below it, or return a replacement module (not for the root). Only the module and its
        ancestors are copied for good, plus whatever ``fn`` changed below it; no tensor is copied
        unless ``fn`` makes one. ``fn`` runs under the write guard: an in-place write to a
        shared tensor raises ``SharedWeightsError`` before it happens. Returns the module now at
        ``path``. Atomic: when ``fn`` raises, or returns something that is not a module, the
        clone is unchanged. Raises ``UnknownPathError`` listing the closest valid paths when
        ``path`` names no module.
        """
        names = path.split(".") if path else []
        state = self._cow
        with state.lock:
            inside = self._cow_open_scope(f"patch_block({path!r})")
            undo: list[Callable[[], None]] = []
            copied: dict[int, tuple[nn.Module, nn.Module]] = {}
            elsewhere: list[nn.Module] = []
            chain, origin = self._cow_path_copy(path, names, undo, copied, elsewhere)
            if elsewhere and not inside:
                self._cow_tie_other_paths(copied, undo)
            if inside:  # a scoped method patching: its open scope covers the tree and commits for us
                return self._cow_install(path, names, chain, fn(chain[-1]), undo)
            scope = Scope(state, chain[-1], f"the patch function for {path!r}", undo, origin=origin)
            with scope:
                installed = self._cow_install(path, names, chain, fn(chain[-1]), undo)
            if installed is not chain[-1]:
                scope.adopt(installed)
            return installed

    def _cow_install(
        self, path: str, names: list[str], chain: list[nn.Module], result: Any, undo: list[Callable[[], None]]
    ) -> nn.Module:
        """Check a patch function's result and put a replacement module in place of ``chain[-1]``."""
        if result is not None and not isinstance(result, nn.Module):
            raise TypeError(
                f"patch function for {path!r} must return None or a torch.nn.Module; got {_describe(result)}"
            )
        if result is None or result is chain[-1]:
            return chain[-1]
        if not names:
            raise TypeError("patch_block('') cannot replace the root of a clone; patch its children")
        parent = chain[-2]._modules
        undo.append(functools.partial(link, parent, names[-1], parent[names[-1]], chain[-2]))
        link(parent, names[-1], result, chain[-2])
        return result

    def _cow_open_scope(self, what: str) -> bool:
        """Whether a scope over the whole tree is open in this thread (the caller holds the lock).

        Raises ``SharedWeightsError`` when only a patch function's scope is open: a method that
        changes the whole clone cannot run inside a patch of part of it.
        """
        scopes = self._cow.scopes
        if not scopes:
            return False
        if any(scope.root is self for scope in scopes):
            return True
        raise SharedWeightsError(
            f"{what} was called inside the patch function for a part of this clone; call it before or after "
            "patch_block, or patch the root (patch_block('', fn)) to change the whole clone in one go"
        )

    def _cow_path_copy(
        self,
        path: str,
        names: list[str],
        undo: list[Callable[[], None]],
        copied: dict[int, tuple[nn.Module, nn.Module]] | None = None,
        elsewhere: list[nn.Module] | None = None,
    ) -> tuple[list[nn.Module], nn.Module | None]:
        """The modules from the root to ``path``, each owned by the clone (shell-copied where not yet),
        and the module the one at ``path`` was copied from, when this call copied it.

        ``copied`` maps ``id(original) -> (original, shell)`` for the shells made (and reused: a module met again
        gets the same shell, so a module at several paths stays one module). A copied module that may
        be held elsewhere too is added to ``elsewhere``: one held by the clone's parent dict and by
        its original's only has ``_REFS_AT_ONE_PATH`` references here; more may mean another path."""
        state = self._cow
        chain: list[nn.Module] = [self]
        origin = None
        copied = {} if copied is None else copied
        elsewhere = [] if elsewhere is None else elsewhere
        for depth, name in enumerate(names):
            children = chain[-1]._modules
            child = children.get(name)
            if child is None:
                for restore in reversed(undo):
                    restore()
                raise UnknownPathError(self._cow_unknown(path, names[:depth], name))
            if id(child) not in state.owned:
                made = copied.get(id(child))
                if made is None:
                    if sys.getrefcount(child) > _REFS_AT_ONE_PATH and id(child) in _tied_in(state.base):
                        elsewhere.append(child)
                    made = copied[id(child)] = (child, shell_copy(child))
                    state.adopt_shell(made[1], child)
                shell = made[1]
                undo.append(functools.partial(link, children, name, child, chain[-1]))
                link(children, name, shell, chain[-1])
                origin, child = child, shell
            else:
                origin = None
            chain.append(child)
        return chain, origin

    def _cow_tie_other_paths(
        self, copied: dict[int, tuple[nn.Module, nn.Module]], undo: list[Callable[[], None]]
    ) -> None:
        """Put the shells of ``copied`` at every other path the clone holds their originals at.

        One module at several paths (T5's ``shared`` / ``encoder.embed_tokens``) stays one module,
        patched wherever it is reached. Walks the clone's tree (as held): called only for a path that
        copied a module that may be held elsewhere (``_cow_path_copy``).
        """
        for names in _paths_holding(self, set(copied)):
            self._cow_path_copy(".".join(names), names, undo, copied)

    def _cow_unknown(self, path: str, found: list[str], missing: str) -> str:
        valid = [name for name, _ in self.named_modules() if name]
        closest = difflib.get_close_matches(path, valid, n=5, cutoff=0.6)
        if not closest:
            parent = ".".join(found)
            closest = [name for name in valid if name.rpartition(".")[0] == parent][:10]
        where = ".".join(found) or "the root module"
        return (
            f"no module at path {path!r}: {where} has no child {missing!r}. "
            f"Closest valid paths: {', '.join(closest) or '(none)'}"
        )

    def _cow_scoped(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in a scope over the whole tree (nested calls run inside the open scope).

        One thread at a time changes a clone: a second thread waits for the first one's scope.
        """
        state = self._cow
        with state.lock:
            if self._cow_open_scope(what):
                return fn()
            with Scope(state, self, what):
                return fn()

    @property
    def private_paths(self) -> list[str]:
        """Dotted paths of the modules this clone owns, root included as ""."""
        owned = self._cow.owned
        return [name for name, module in self.named_modules() if id(module) in owned]

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own ``state_dict``, after taking the base's replacements of shared tensors."""
        self._cow.follow()
        return super().state_dict(*args, **kwargs)

    def _named_members(self, *args: Any, **kwargs: Any) -> Any:
        self._cow.follow()  # parameters(), buffers() and their named forms see what a call would run
        return super()._named_members(*args, **kwargs)

    # -- memory --------------------------------------------------------------------------------

    def _cow_storages(self) -> tuple[dict[Any, int], dict[Any, int]]:
        """``(private, shared)`` storages. Private: those of the clone's own parameters and buffers and of the
        tensors its own modules hold elsewhere (K/V a patch stored as an attribute, a quantized module's
        packed weights), less the base's. Shared: the rest of its parameters' and buffers'."""
        state = self._cow
        everything = storage_bytes(self)
        mine: dict[Any, int] = {}
        for tensor in state.own_tensors.values():
            key = storage_id(tensor)
            if key in everything:
                mine[key] = everything[key]
        for module in all_modules(self):
            if id(module) in state.owned:
                for tensor in tensors_held(module):
                    key = storage_id(tensor)
                    if key is not None:
                        mine[key] = tensor.untyped_storage().nbytes()
        base = state.shared().storages if mine else set()
        live = {key: size for key, size in mine.items() if key not in base}
        return live, {key: size for key, size in everything.items() if key not in live}

    @property
    def shared_bytes(self) -> int:
        """Bytes of tensor storage in this clone that it does not own (shared with its base)."""
        return sum(self._cow_storages()[1].values())

    @property
    def private_bytes(self) -> int:
        """Bytes of tensor storage that this clone created and holds: its own parameters and buffers, and
        tensors its own modules keep in attributes or TorchScript objects (never the base's bytes)."""
        return sum(self._cow_storages()[0].values())

    # -- scoped torch methods ------------------------------------------------------------------

    def train(self, mode: bool = True) -> LazyClonedModel:
        """The model's own ``train(mode)`` on the clone alone.

        Modules left in training mode get private copies of their buffers, since a training
        forward updates them in place (BatchNorm's running statistics).
        """

        def run() -> None:
            super(LazyClonedModel, self).train(mode)
            _private_training_buffers(self)

        self._cow_scoped(f"{type(self).__name__}.train({mode})", run)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LazyClonedModel:
        """Apply a tensor conversion to the clone's own tensors; refuse to change shared ones.

        A conversion that changes nothing (same device, dtype, layout and values, e.g. accelerate's
        ``to("cpu:0")`` on a CPU model, which copies) keeps the shared tensor.
        """
        state = self._cow

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            result = fn(tensor)
            if result is not tensor and id(tensor) not in state.own_tensors:
                if _unchanged(tensor, result):  # e.g. to("cpu:0") on a CPU tensor: a copy of the same thing
                    return tensor
                raise SharedWeightsError(
                    f"this conversion would change {state.describe(tensor)}, a tensor the clone shares with its "
                    "base. Convert the base instead (its clones share its tensors and follow it), or convert "
                    "before cloning."
                )
            return result

        self._cow_scoped(
            "a conversion (to/half/float/cuda/...)",
            lambda: super(LazyClonedModel, self)._apply(convert, recurse),
        )
        return self

    def share_memory(self) -> LazyClonedModel:
        """Move the clone's own tensors to shared memory; raise if a shared tensor is not there already."""
        state = self._cow
        tensors = [t for m in all_modules(self) for _, _, t in tensor_slots(m)]
        outside = [t for t in tensors if id(t) not in state.own_tensors and not t.is_shared()]
        if outside:
            raise SharedWeightsError(
                f"share_memory() would move {len(outside)} tensor(s) shared with the base "
                f"(e.g. {state.describe(outside[0])}) into shared memory, changing the base's storage. "
                "Call base.share_memory() before cloning."
            )
        for tensor in tensors:
            tensor.share_memory_()
        return self

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """torch's own ``load_state_dict`` on the clone's shells, into new private tensors; the base keeps its values.

        Runs in a scope over the whole tree: every module's ``_load_from_state_dict`` and load hooks run as on
        the model (pre-hooks that rename keys, BatchNorm's version-1 checkpoints, quantized modules' packed
        weights), and keys, shapes, ``strict`` and errors are torch's. Before torch copies, each tensor it will
        write gets a new private tensor (one per tied tensor, so ties stay tied); a module with its own loader
        or load pre-hooks gets private copies of all its tensors, keys or not (BatchNorm's loader copies its
        ``num_batches_tracked`` into itself when a checkpoint has no version). With ``assign=True`` torch
        installs the given tensors (bytes shared with the base are copied first, as anything a scope installs).
        On an error nothing changes: the scope rolls the clone back.
        """
        keys = set(state_dict)

        def load() -> _IncompatibleKeys:
            if not assign:
                _private_for_load(self, keys)
            return super(LazyClonedModel, self).load_state_dict(state_dict, strict, assign)

        return self._cow_scoped("load_state_dict", load)

    # -- identity and copies -------------------------------------------------------------------

    def _cow_plain(self) -> nn.Module:
        return shell_copy(self, type(self).__cow_base_class__)

    def __copy__(self) -> LazyClonedModel:
        return LazyClonedModel(self)  # type: ignore[no-any-return,unused-ignore]

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Module:
        return copy.deepcopy(self._cow_plain(), memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self._cow_plain().__reduce_ex__(protocol)


def _unchanged(tensor: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether a conversion's ``result`` holds what ``tensor`` holds: device, dtype, layout and values."""
    same_form = (
        isinstance(result, torch.Tensor)
        and result.device == tensor.device
        and result.dtype == tensor.dtype
        and result.shape == tensor.shape
        and result.stride() == tensor.stride()
    )
    return same_form and (result.data_ptr() == tensor.data_ptr() or torch.equal(result, tensor))


_REFS_AT_ONE_PATH = 4
"""References to a module at one path of a base, when a clone path-copies it: the base parent's dict, the
clone's parent's dict, ``_cow_path_copy``'s local and ``getrefcount``'s argument. Other clones sharing the
module add theirs; ``_tied_in`` then tells."""
_TIED: weakref.WeakKeyDictionary[nn.Module, frozenset[int]] = weakref.WeakKeyDictionary()


def _tied_in(base: nn.Module) -> frozenset[int]:
    """Ids of the modules ``base`` holds at several paths (as held now).

    Kept per plain base (one walk for all its clones): ties the base makes after it was first asked
    are not seen. A base that is itself a clone (it changes with its patches) or unhashable is walked every time.
    """
    cacheable = not isinstance(base, LazyClonedModel) and type(base).__hash__ is not None
    found = _TIED.get(base) if cacheable else None
    if found is None:
        seen: set[int] = set()
        tied: set[int] = set()
        for module in raw_modules(base):
            for child in dict.values(module.__dict__["_modules"]):
                if child is not None:
                    (tied if id(child) in seen else seen).add(id(child))
        found = frozenset(tied)
        if cacheable:
            _TIED[base] = found
    return found


def _paths_holding(root: nn.Module, targets: set[int]) -> list[list[str]]:
    """The paths under ``root`` (as held, no stand-ins made) at which a module with an id in ``targets`` sits."""
    found: list[list[str]] = []
    seen = {id(root)}
    stack: list[tuple[nn.Module, list[str]]] = [(root, [])]
    while stack:
        module, names = stack.pop()
        for name, child in dict.items(module.__dict__["_modules"]):
            if child is None:
                continue
            path = [*names, name]
            if id(child) in targets:
                found.append(path)
            elif id(child) not in seen:
                seen.add(id(child))
                stack.append((child, path))
    return found


def _private_for_load(clone: LazyClonedModel, keys: set[str]) -> None:
    """Inside an open scope: a new private tensor wherever ``load_state_dict`` will copy into (its doc),
    put in every slot that holds the same tensor (ties stay tied)."""
    slots: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    fresh: dict[int, torch.Tensor] = {}
    for prefix, module in clone.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        own_loader = type(module)._load_from_state_dict is not nn.Module._load_from_state_dict or bool(
            module._load_state_dict_pre_hooks
        )
        for held in (module._parameters, module._buffers):
            for name, tensor in held.items():
                if tensor is None or (held is module._buffers and name in module._non_persistent_buffers_set):
                    continue
                slots.append((held, name, tensor))
                if (own_loader or dot + name in keys) and id(tensor) not in fresh:
                    fresh[id(tensor)] = _private_copy(tensor) if own_loader else _private_like(tensor)
    for held, name, tensor in slots:
        made = fresh.get(id(tensor))
        if made is not None:
            held[name] = made


def _private_like(tensor: torch.Tensor) -> torch.Tensor:
    made = torch.empty_like(tensor)
    if isinstance(tensor, nn.Parameter):
        return torch.Tensor._make_subclass(type(tensor), made, tensor.requires_grad)
    return made


def _private_training_buffers(clone: LazyClonedModel) -> None:
    """Inside an open scope: private copies of the buffers of every module in training mode."""
    state = clone._cow
    for module in all_modules(clone):
        if module.training:
            for name, tensor in list(module._buffers.items()):
                if tensor is not None and id(tensor) not in state.own_tensors:
                    module._buffers[name] = _private_copy(tensor)


def _make_clone(base: Any = None, *, check_writes: bool = False) -> LazyClonedModel:
    if isinstance(base, LazyClonedModel):
        model_class = type(base).__cow_base_class__
    elif isinstance(base, nn.Module):
        model_class = type(base)
    else:
        raise TypeError(f"LazyClonedModel clones a torch.nn.Module; got {_describe(base)}")
    if not isinstance(base, LazyClonedModel):
        return _clone_of(base, model_class, check_writes, None)
    parent = base._cow
    with parent.lock:  # a scope of the parent's in another thread closes first
        if parent.scopes:
            raise SharedWeightsError(
                "LazyClonedModel(clone) was called inside a patch function or scoped method of that clone; "
                "make the child clone before or after it"
            )
        return _clone_of(base, model_class, check_writes, parent)


def _clone_of(
    base: nn.Module, model_class: type[nn.Module], check_writes: bool, parent: CloneState | None
) -> LazyClonedModel:
    root = shell_copy(base, _clone_class(model_class))
    state = CloneState(root, base, check_writes)
    root.__dict__[STATE_ATTR] = state
    state.owned[id(root)] = root
    if parent is not None:
        origin = parent.origins.get(id(base))
        state.adopt_shell(root, origin.original if origin is not None else base)
        _copy_parent_owned(root, parent, state)
    else:
        state.adopt_shell(root, base)
    return root  # type: ignore[return-value]


def _copy_parent_owned(root: nn.Module, parent: CloneState, state: CloneState) -> None:
    """Give a child clone its own shells of the modules its parent owns, its own copies of the bytes the parent
    made, and its own aliases of what the parent's aliases stand for (O(parent's own))."""
    stack = [root]
    shells: dict[int, nn.Module] = {}
    copies: dict[int, torch.Tensor] = {}
    while stack:
        module = stack.pop()
        for container, name, tensor in list(tensor_slots(module)):
            record = parent.aliases.get(id(tensor))
            if id(tensor) in parent.own_tensors or record is not None:
                made = copies.get(id(tensor))
                if made is None and record is None:  # bytes the parent made: the child's own copy
                    made = copies[id(tensor)] = _private_copy(tensor)
                    state.own_tensors[id(made)] = made
                elif (
                    made is None and record is not None
                ):  # a stand-in for the base's: the child's own stand-in
                    made = copies[id(tensor)] = alias(tensor)
                    state.adopt_alias_of(made, record)
                container[name] = made
        for name, child in list(module._modules.items()):
            if child is None or id(child) not in parent.owned:
                continue
            shell = shells.get(id(child))
            if shell is None:
                shell = shells[id(child)] = shell_copy(child)
                origin = parent.origins.get(id(child))
                state.adopt_shell(shell, origin.original if origin is not None else child)
                stack.append(shell)
            module._modules[name] = shell


def _shares_training_buffers(clone: LazyClonedModel) -> bool:
    """Whether a module of the clone (as held, no stand-ins made) is in training mode with a buffer it does not own.

    Runs at every call: a walk without a visited set (0.15 us a module here); a module at several
    paths is looked at once per path, and a tree with more visits than ``_FAST_WALK`` falls back to
    a walk that visits each module once.
    """
    stack: list[Any] = [clone]
    visits = 0
    while stack:
        module = stack.pop()
        if module is None:
            continue
        visits += 1
        if visits > _FAST_WALK:
            return any(_training_with_shared_buffers(m, clone) for m in raw_modules(clone))
        state = module.__dict__
        if state.get("training") and state["_buffers"] and _training_with_shared_buffers(module, clone):
            return True
        stack.extend(dict.values(state["_modules"]))
    return False


_FAST_WALK = 200_000


def _training_with_shared_buffers(module: nn.Module, clone: LazyClonedModel) -> bool:
    own = clone._cow.own_tensors
    return module.training and any(
        t is not None and id(t) not in own for t in dict.values(module.__dict__["_buffers"])
    )


def _clone_class(model_class: type[nn.Module]) -> type:
    """The clone class for ``model_class``: named as it, the clone's methods first in the MRO."""
    cls = _CLASSES.get(model_class)
    if cls is None:
        namespace: dict[str, Any] = {
            "__module__": model_class.__module__,
            "__qualname__": model_class.__qualname__,
            "__doc__": model_class.__doc__,
            "__cow_base_class__": model_class,
        }
        cls = type(model_class.__name__, (LazyClonedModel, model_class), namespace)
        for name, method in _SCOPED.items():
            _install_scoped(cls, name, method)
        cls = _CLASSES.setdefault(model_class, cls)  # one class per model class, also when threads race
    return cls


def _install_scoped(cls: type, name: str, method: Callable[..., Any] | None) -> None:
    model_class = cls.__cow_base_class__  # type: ignore[attr-defined]
    own = getattr(model_class, name, None)
    wrapped = method or own
    if wrapped is None:
        return

    @functools.wraps(wrapped)
    def scoped(self: LazyClonedModel, *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(method, self) if method is not None else getattr(super(cls, self), name)
        return self._cow_scoped(f"{type(self).__name__}.{name}()", lambda: call(*args, **kwargs))

    setattr(cls, name, scoped)


def register_scoped_method(name: str, method: Callable[..., Any] | None = None) -> None:
    """Make ``clone.<name>(...)`` act on the clone alone, on every clone of a model that has it.

    Without ``method``, the model's own method runs in a scope over the clone's whole tree
    (module doc): what it changes is copied, what it would write in place is refused with
    ``SharedWeightsError`` naming the method. With ``method``, ``method(clone, ...)`` runs in that
    scope instead. Raises ``ValueError`` if ``name`` is one of ``LazyClonedModel``'s own attributes.
    """
    if name in LazyClonedModel.__dict__ or name.startswith("_cow"):
        raise ValueError(f"{name!r} is already an attribute of LazyClonedModel and cannot be replaced")
    _SCOPED[name] = method
    for cls in _CLASSES.values():
        _install_scoped(cls, name, method)


for _name in ("apply", "requires_grad_", "zero_grad", "set_submodule"):
    register_scoped_method(_name)
