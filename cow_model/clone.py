"""``LazyClonedModel``: a copy-on-write clone of a ``torch.nn.Module`` tree.

What is shared, what is copied:

- A clone starts as a *shell copy* of the base's root module (see ``cow_model.tree``): every
  child module, parameter and buffer is the base's own object. Nothing else is copied.
- ``patch_block(path, fn)`` copies the module at ``path`` and its ancestors as shells (path
  copying, as persistent data structures do) and hands the copy to ``fn``. Siblings, other
  subtrees and every tensor stay shared. Tensors are never copied by the clone itself.
- The base is never mutated by the clone. Mutate a clone only through ``patch_block`` (or the
  clone's own methods below): ``clone.down_blocks[1]`` returns a module that may still be
  shared with the base, like any attribute of a persistent structure.

Writes to shared tensors are never silent:

- ``to()``, ``half()``, ``float()``, ``cuda()``, ``cpu()``, ``type()``, ``to_empty()`` ... are
  allowed when they leave every shared tensor as it is (e.g. a pipeline's ``.to(device)`` when
  the model is already there), and convert only the clone's private tensors. Otherwise they
  raise ``SharedWeightsError``: convert the base instead; clones share its tensors and follow.
- ``requires_grad_()`` likewise raises when it would change a shared parameter.
- ``load_state_dict()`` copies: each loaded tensor becomes a private tensor of the clone, in a
  path-copied module; the base keeps its values.
- ``train()`` / ``eval()`` path-copy the modules whose flag changes.
- In-place writes (``weight.add_(1)``, through either side) are caught by ``verify_shared()``,
  which compares version counters and data pointers with a snapshot taken at clone time; pass
  ``check_writes=True`` to run that check before every forward.
"""

from __future__ import annotations

import copy
import difflib
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import wrapt
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .errors import SharedWeightsError, UnknownPathError
from .tree import all_modules, all_tensors, named_tensors, shell_copy, storage_bytes, version_of

PatchFn = Callable[[nn.Module], "nn.Module | None"]

# nn.Module methods that only call ``self._apply``; run with the proxy as ``self`` they reach
# ``LazyClonedModel._apply`` instead of recursing into shared modules.
_CONVERSIONS = ("to", "cuda", "cpu", "xpu", "type", "float", "double", "half", "bfloat16", "to_empty")


def _describe(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class LazyClonedModel(wrapt.CallableObjectProxy):
    """A transparent, callable proxy for a copy-on-write clone of ``base``.

    ``isinstance(clone, type(base))`` holds and attributes fall through to the clone's own
    root module; calling the clone runs its (patched) tree with no overhead beyond the proxy
    call. ``base`` may itself be a ``LazyClonedModel``: the new clone shares with both, and the
    parent's private modules become shared (the parent copies them again on its next patch).

    Raises ``TypeError`` naming what was given when ``base`` is not a ``torch.nn.Module``.
    """

    def __init__(self, base: nn.Module | LazyClonedModel, *, check_writes: bool = False) -> None:
        if isinstance(base, LazyClonedModel):
            base_root: nn.Module = base.__wrapped__
            base._self_private = weakref.WeakSet([base_root])
        elif isinstance(base, nn.Module):
            base_root = base
        else:
            raise TypeError(f"LazyClonedModel clones a torch.nn.Module; got {_describe(base)}")
        root = shell_copy(base_root)
        super().__init__(root)
        self._self_base = base_root
        self._self_private: weakref.WeakSet[nn.Module] = weakref.WeakSet([root])
        self._self_snapshot = [
            (tensor, version_of(tensor), tensor.data_ptr()) for tensor in all_tensors(base_root).values()
        ]
        if check_writes:
            root.register_forward_pre_hook(lambda module, args: self.verify_shared())

    # -- structure -----------------------------------------------------------------------------

    @property
    def base(self) -> nn.Module:
        """The module this clone was made from (for a clone of a clone, the parent's tree)."""
        return self._self_base

    def patch_block(self, path: str, fn: PatchFn) -> nn.Module:
        """Give ``fn`` a private copy of the module at dotted ``path`` ("" is the root).

        ``fn`` may set attributes, processors or children on the copy, or return a replacement
        module. Only the module and its ancestors are copied (as shells); no tensor is copied.
        Returns the module now at ``path``. Atomic: when ``fn`` raises, or returns something
        that is not a module, the clone is unchanged. Raises ``UnknownPathError`` listing the
        closest valid paths when ``path`` names no module.
        """
        names = path.split(".") if path else []
        chain = self._self_resolve(path, names)
        private = shell_copy(chain[-1])
        result = fn(private)
        if result is not None and not isinstance(result, nn.Module):
            raise TypeError(
                f"patch function for {path!r} must return None or a torch.nn.Module; got {_describe(result)}"
            )
        installed = private if result is None else result
        self._self_link(names, chain, installed)
        if installed is private:
            self._self_private.add(private)
        return installed

    def _self_resolve(self, path: str, names: list[str]) -> list[nn.Module]:
        chain = [self.__wrapped__]
        for depth, name in enumerate(names):
            child = chain[-1]._modules.get(name)
            if child is None:
                raise UnknownPathError(self._self_unknown(path, names[:depth], name))
            chain.append(child)
        return chain

    def _self_unknown(self, path: str, found: list[str], missing: str) -> str:
        valid = [name for name, _ in self.__wrapped__.named_modules() if name]
        closest = difflib.get_close_matches(path, valid, n=5, cutoff=0.6)
        if not closest:
            parent = ".".join(found)
            closest = [name for name in valid if name.rpartition(".")[0] == parent][:10]
        where = ".".join(found) or "the root module"
        return (
            f"no module at path {path!r}: {where} has no child {missing!r}. "
            f"Closest valid paths: {', '.join(closest) or '(none)'}"
        )

    def _self_link(self, names: list[str], chain: list[nn.Module], module: nn.Module) -> None:
        """Install ``module`` at ``names``, copying the shared ancestors as shells."""
        child = module
        for depth in range(len(names) - 1, -1, -1):
            parent = chain[depth]
            if parent in self._self_private:
                parent._modules[names[depth]] = child
                return
            parent = shell_copy(parent)
            parent._modules[names[depth]] = child
            self._self_private.add(parent)
            child = parent
        self.__wrapped__ = child

    @property
    def private_paths(self) -> list[str]:
        """Dotted paths of the modules this clone copied (shells it owns), root included as ""."""
        return [name for name, module in self.__wrapped__.named_modules() if module in self._self_private]

    # -- memory --------------------------------------------------------------------------------

    @property
    def shared_bytes(self) -> int:
        """Bytes of tensor storage that this clone shares with its base."""
        base = storage_bytes(self._self_base)
        return sum(size for key, size in storage_bytes(self.__wrapped__).items() if key in base)

    @property
    def private_bytes(self) -> int:
        """Bytes of tensor storage that this clone holds and its base does not."""
        base = storage_bytes(self._self_base)
        return sum(size for key, size in storage_bytes(self.__wrapped__).items() if key not in base)

    # -- guarding shared tensors ---------------------------------------------------------------

    def verify_shared(self) -> None:
        """Raise ``SharedWeightsError`` if a tensor this clone shares was modified in place.

        Compares version counters and data pointers with the snapshot taken when the clone was
        made; catches writes through the clone and through the base alike. Writes through
        ``tensor.data`` bypass version counters and are not seen.
        """
        live = all_tensors(self.__wrapped__)
        changed = [
            tensor
            for tensor, version, pointer in self._self_snapshot
            if id(tensor) in live and (version_of(tensor) != version or tensor.data_ptr() != pointer)
        ]
        if changed:
            listed = self._self_names(changed, 5)
            raise SharedWeightsError(
                f"{len(changed)} tensor(s) shared between this clone and its base were modified in place "
                f"after cloning ({listed}); both sides see the change. Give the clone its own tensor with "
                "patch_block or load_state_dict instead of writing in place."
            )

    def _self_names(self, tensors: list[torch.Tensor], limit: int) -> str:
        """The first ``limit`` qualified names of ``tensors`` in this clone, sorted, for error messages."""
        names = named_tensors(self.__wrapped__)
        return ", ".join(sorted(names[id(t)] for t in tensors)[:limit])

    def _self_shared_ids(self) -> set[int]:
        return set(all_tensors(self._self_base))

    def _self_private_modules(self) -> list[nn.Module]:
        base_modules = {id(module) for module in all_modules(self._self_base)}
        return [module for module in all_modules(self.__wrapped__) if id(module) not in base_modules]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LazyClonedModel:
        """Apply a tensor conversion to the clone's private tensors; refuse to change shared ones."""
        shared = self._self_shared_ids()
        changing = [t for t in all_tensors(self.__wrapped__).values() if id(t) in shared and fn(t) is not t]
        if changing:
            listed = self._self_names(changing, 3)
            raise SharedWeightsError(
                f"this conversion would change {len(changing)} tensor(s) that the clone shares with its base "
                f"({listed}, ...). Convert the base instead (its clones share its tensors and follow it), "
                "or convert before cloning."
            )
        modules = self._self_private_modules() if recurse else [self.__wrapped__]
        for module in modules:
            module._apply(fn, recurse=False)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> LazyClonedModel:
        """Set ``requires_grad`` on private parameters; raise if a shared one would change."""
        shared = self._self_shared_ids()
        params = set(self.__wrapped__.parameters())
        if any(id(p) in shared and p.requires_grad != requires_grad for p in params):
            raise SharedWeightsError(
                "requires_grad_ would change parameters shared with the base; set it on the base before cloning"
            )
        for param in params:
            param.requires_grad_(requires_grad)
        return self

    def train(self, mode: bool = True) -> LazyClonedModel:
        """Set the training flag, path-copying every module whose flag changes."""
        for path in [name for name, module in self.__wrapped__.named_modules() if module.training != mode]:
            self.patch_block(path, lambda module: setattr(module, "training", mode))
        return self

    def eval(self) -> LazyClonedModel:
        """``train(False)``."""
        return self.train(False)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load tensors into private copies: each loaded key gets a new tensor in a path-copied module.

        Keys, shapes and ``strict`` behave as in ``torch.nn.Module.load_state_dict`` (the dtype and
        device of the current tensor are kept; ``assign`` is accepted for signature compatibility
        and ignored, since loading here always installs new tensors). Module-specific
        ``_load_from_state_dict`` overrides are not run. Raises ``RuntimeError`` listing every
        problem before anything is changed.
        """
        own = self.__wrapped__.state_dict(keep_vars=True)
        unexpected = [key for key in state_dict if key not in own]
        missing = [key for key in own if key not in state_dict]
        errors = [
            f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
            f"the shape in the current model is {tuple(own[key].shape)}"
            for key, value in state_dict.items()
            if key in own and tuple(value.shape) != tuple(own[key].shape)
        ]
        if strict:
            errors += [f'Unexpected key(s) in state_dict: "{key}"' for key in unexpected]
            errors += [f'Missing key(s) in state_dict: "{key}"' for key in missing]
        if errors:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self.__wrapped__).__name__}:\n\t" + "\n\t".join(errors)
            )
        by_module: dict[str, dict[str, Any]] = {}
        for key, value in state_dict.items():
            if key in own:
                path, _, name = key.rpartition(".")
                by_module.setdefault(path, {})[name] = value
        for path, values in by_module.items():
            self.patch_block(path, functools.partial(_install_copies, values=values))
        return _IncompatibleKeys(missing, unexpected)

    # -- copying the proxy ---------------------------------------------------------------------

    def __copy__(self) -> LazyClonedModel:
        return LazyClonedModel(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Module:
        return copy.deepcopy(self.__wrapped__, memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__wrapped__.__reduce_ex__(protocol)


def _install_copies(module: nn.Module, values: Mapping[str, Any]) -> None:
    """Replace ``module``'s tensors named in ``values`` with new tensors holding those values."""
    for name, value in values.items():
        if name in module._parameters:
            old = module._parameters[name]
            assert old is not None
            fresh = torch.empty_like(old).copy_(value)
            module._parameters[name] = nn.Parameter(fresh, requires_grad=old.requires_grad)
        else:
            old_buffer = module._buffers[name]
            assert old_buffer is not None
            module._buffers[name] = torch.empty_like(old_buffer).copy_(value)


def _conversion(name: str) -> Callable[..., Any]:
    def convert(self: LazyClonedModel, *args: Any, **kwargs: Any) -> Any:
        method = getattr(type(self.__wrapped__), name)
        return method(self, *args, **kwargs)

    convert.__name__ = name
    convert.__doc__ = f"``nn.Module.{name}`` on the clone: private tensors convert, shared ones must not change."
    return convert


for _name in _CONVERSIONS:
    setattr(LazyClonedModel, _name, _conversion(_name))


def register_scoped_method(name: str, method: Callable[..., Any]) -> None:
    """Make ``clone.<name>(...)`` call ``method(clone, ...)`` on every ``LazyClonedModel``.

    For adapters: a framework method that mutates a model's modules in place (diffusers'
    ``set_attn_processor``, say) would, called through the proxy, reach modules the clone
    shares with its base. Registering a clone-scoped version (one that goes through
    ``patch_block``) makes the natural call safe. Raises ``ValueError`` if ``name`` is already
    one of the proxy's own attributes, other than a method registered here before.
    """
    existing = LazyClonedModel.__dict__.get(name)
    if existing is not None and not getattr(existing, "__cow_scoped__", False):
        raise ValueError(f"{name!r} is already an attribute of LazyClonedModel and cannot be replaced")

    @functools.wraps(method)
    def scoped(self: LazyClonedModel, *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs)

    scoped.__cow_scoped__ = True  # type: ignore[attr-defined]
    setattr(LazyClonedModel, name, scoped)
