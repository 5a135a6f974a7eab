"""Low-level helpers on ``torch.nn.Module`` trees: shell copies, aliases and tensor walks.

A *shell copy* of a module is a new object of the same class whose attribute dict is a
shallow copy of the original's, with every plain container in it (the parameter, buffer, child
and hook dicts, and any attribute of exact type dict, OrderedDict, set or list) copied one level
deep. Tensors, child modules and every other object stay shared (container subclasses such as
diffusers' ``FrozenDict`` included: a scope copies what its block can write, ``cow_model.scope``),
so a shell costs a few dict copies and never a tensor copy; ``setattr``, ``register_*`` and child
replacement on the shell do not reach the original (``copy.copy`` would share those dicts).

Callables bound to the original are rebound to the shell, so the shell runs its own state:
bound methods (an instance-level ``forward``), ``functools.partial`` objects holding the module
(accelerate's hooks install ``partial(new_forward, module)``), the same inside hook dicts, and
``module.compile()``'s compiled call, which is rebuilt around the shell with the same
``torch.compile`` settings.

An *alias* of a tensor is a new tensor object of the same class viewing the same storage: it
shares the bytes but not the object, so ``alias.data = ...``, ``alias.requires_grad_()`` or a
parametrization's ``set_`` change the alias only.
"""

from __future__ import annotations

import copyreg
import functools
import logging
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]
from torch.utils.hooks import RemovableHandle

from .options import cow_copy, is_shared

logger = logging.getLogger(__name__)

_CONTAINERS = (dict, set, list)
PLAIN_CONTAINERS = frozenset({dict, OrderedDict, set, list})  # their .copy() keeps the type
STATE_ATTR = "_cow_state"
"""Attribute of a clone's root holding its bookkeeping; never copied into shells."""
_COMPILED = "_compiled_call_impl"
_TREE_DICTS = frozenset({"_parameters", "_buffers", "_modules"})
"""Module dicts that hold tensors and modules only: copied without looking for bound callables."""
_BINDABLE = frozenset({types.MethodType, functools.partial})
_ATOMIC = frozenset({int, float, bool, str, type(None), tuple, frozenset, bytes, torch.dtype, torch.device})
"""Attribute types a shell shares without looking at them (immutable)."""
_SCALARS = _ATOMIC - {tuple, frozenset}
"""Immutable types that hold nothing else."""
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {STATE_ATTR, _COMPILED, "forward"}
"""Attributes every module has (torch's parameter, buffer, child and hook containers): never plain state."""
_NOT_PLAIN = (nn.Module, torch.Tensor, type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType,
              weakref.ref, torch._C.ScriptObject, RemovableHandle)  # fmt: skip
ShellRebuilder = Callable[[Any, nn.Module, nn.Module], dict[str, Any]]
_REBUILDERS: dict[str, ShellRebuilder] = {}


def register_shell_attribute(name: str, rebuild: ShellRebuilder) -> None:
    """Rebuild the attribute ``name`` for every shell copy of a module that has it.

    ``rebuild(value, original, shell)`` returns the shell's new attribute values (``name``'s and any
    other it must change, such as ``forward``). For registries that point back at their module
    (diffusers' hook registry), which a shell must not share with the module it was copied from.
    Such an attribute is the shell's own from then on, so scopes do not copy it again.
    """
    _REBUILDERS[name] = rebuild


def rebind(value: Any, old: object, new: object) -> Any:
    """``value`` with references to ``old`` replaced by ``new`` where ``value`` is a callable bound to it.

    Handles bound methods and ``functools.partial`` objects (their positional and keyword
    arguments, and the attributes ``functools.update_wrapper`` copies onto them); any other
    value is returned as is.
    """
    kind = type(value)
    if kind is types.MethodType:
        return types.MethodType(value.__func__, new) if value.__self__ is old else value
    if kind is functools.partial:
        refs = [a is old for a in value.args] + [v is old for v in value.keywords.values()]
        extra = {k: rebind(v, old, new) for k, v in value.__dict__.items()}
        if not any(refs) and all(extra[k] is v for k, v in value.__dict__.items()):
            return value
        bound = functools.partial(
            value.func,
            *[new if a is old else a for a in value.args],
            **{k: new if v is old else v for k, v in value.keywords.items()},
        )
        bound.__dict__.update(extra)
        return bound
    return value


def is_rebinding(value: Any, original: Any, old: object, new: object) -> bool:
    """Whether ``value`` is ``original`` or what :func:`rebind` makes of it for ``old -> new``."""
    if value is original:
        return True
    kind = type(value)
    if kind is not type(original):
        return False
    if kind is types.MethodType:
        return value.__func__ is original.__func__ and value.__self__ is new and original.__self__ is old
    if kind is functools.partial:
        return (
            value.func is original.func
            and len(value.args) == len(original.args)
            and all(
                is_rebinding(a, b, old, new) or (a is new and b is old)
                for a, b in zip(value.args, original.args, strict=True)
            )
            and value.keywords.keys() == original.keywords.keys()
            and all(
                value.keywords[k] is v or (value.keywords[k] is new and v is old)
                for k, v in original.keywords.items()
            )
        )
    return False


def _copy_container(value: Any, old: nn.Module, new: nn.Module) -> Any:
    copied = value.copy()
    if isinstance(copied, dict):
        for key, item in copied.items():
            if type(item) in _BINDABLE:
                bound = rebind(item, old, new)
                if bound is not item:
                    copied[key] = bound
    return copied


def _recompiled(compiled: Callable[..., Any], shell: nn.Module) -> Callable[..., Any]:
    """``module.compile()``'s wrapper rebuilt around ``shell._call_impl``, with the same dynamo context."""
    for cell in getattr(compiled, "__closure__", None) or ():
        context = cell.cell_contents
        if type(context).__name__.endswith("Context") and callable(context):
            return context(shell._call_impl)  # type: ignore[no-any-return,unused-ignore]
    return torch.compile(shell._call_impl)


def shell_copy(module: nn.Module, cls: type | None = None) -> nn.Module:
    """A new module sharing ``module``'s tensors and children but owning its containers.

    The shell is an instance of ``cls`` (default: ``module``'s own class). Callables bound to
    ``module`` are rebound to the shell (module doc). A clone's bookkeeping is not copied.
    Cost: one dict copy per container attribute (a few microseconds for a diffusers ``Attention``).
    """
    shell: nn.Module = object.__new__(cls or type(module))
    state = module.__dict__.copy()
    state.pop(STATE_ATTR, None)
    for name in [name for name, value in state.items() if type(value) not in _ATOMIC]:
        value = state[name]
        kind = type(value)
        if kind in PLAIN_CONTAINERS:
            state[name] = (
                value.copy() if not value or name in _TREE_DICTS else _copy_container(value, module, shell)
            )
        elif kind in _BINDABLE:
            bound = rebind(value, module, shell)
            if bound is not value:
                state[name] = bound
        elif kind is RemovableHandle:
            state[name] = _rehandle(value, module.__dict__, state)
    if _REBUILDERS and not _REBUILDERS.keys().isdisjoint(state):
        for name, rebuild in _REBUILDERS.items():
            if name in state:
                state.update(rebuild(state[name], module, shell))
    object.__setattr__(shell, "__dict__", state)
    if state.get(_COMPILED) is not None:
        state[_COMPILED] = _recompiled(state[_COMPILED], shell)
    return shell


def _rehandle(handle: RemovableHandle, old: dict[str, Any], new: dict[str, Any]) -> RemovableHandle:
    """``handle`` for the shell: removing it removes the hook from the shell's hook dict, not the original's."""
    mapped = {id(old[name]): new[name] for name in old if type(old[name]) in PLAIN_CONTAINERS}

    def ref(held: Any) -> Any:
        target = held() if callable(held) else None
        copy_ = mapped.get(id(target)) if target is not None else None
        return held if copy_ is None else weakref.ref(copy_)

    made = RemovableHandle.__new__(RemovableHandle)
    made.id = handle.id
    made.hooks_dict_ref = ref(handle.hooks_dict_ref)
    made.extra_dict_ref = tuple(ref(extra) for extra in handle.extra_dict_ref)
    return made


def _reaches_state(value: Any) -> bool:
    """Whether a write through ``value`` (an attribute of a module) could change something mutable."""
    kind = type(value)
    if kind in _SCALARS or kind in _BINDABLE:
        return False
    if kind in PLAIN_CONTAINERS or kind is tuple or kind is frozenset:
        items = value.values() if isinstance(value, dict) else value
        return kind is not set and any(type(item) not in _SCALARS for item in items)
    return not isinstance(value, _NOT_PLAIN) and not is_shared(value)


_SIMPLE_CLASSES: dict[type, bool] = {}
"""Classes whose instances ``copy.deepcopy`` copies as a new object with its ``__dict__`` copied."""


def _simple_class(cls: type) -> bool:
    simple = _SIMPLE_CLASSES.get(cls)
    if simple is None:
        simple = _SIMPLE_CLASSES[cls] = (
            cls.__new__ is object.__new__
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and getattr(cls, "__getstate__", None) is getattr(object, "__getstate__", None)
            and getattr(cls, "__deepcopy__", None) is None
            and getattr(cls, "__setstate__", None) is None
            and cls not in copyreg.dispatch_table
            and not _slots(cls)
            and not getattr(cls, "__cow_shared__", False)
        )
    return simple


def _quick_copy(value: Any, memo: dict[int, Any]) -> Any:
    """``cow_copy(value)`` for a plain object whose attributes are all numbers and strings; else ``None``."""
    cls = type(value)
    if not _simple_class(cls):
        return None
    attributes = getattr(value, "__dict__", None)
    if attributes is None or any(type(v) not in _SCALARS for v in attributes.values()):
        return None
    copied = object.__new__(cls)
    copied.__dict__.update(attributes)
    memo[id(value)] = copied
    return copied


def private_plain_state(module: nn.Module, memo: dict[int, Any]) -> list[tuple[str, Any, Any]]:
    """Give ``module`` copies of the attributes a write could reach through; ``(name, copy, original)`` each.

    Dicts and lists holding more than numbers and strings, and plain objects (anything but modules,
    tensors, functions, classes and what ``cow_copy`` shares) are copied with ``cow_copy``
    (``copy.deepcopy``'s semantics, tensors and modules shared), one copy per object in ``memo``. An
    object ``cow_copy`` cannot copy (it holds a lock, a file) stays shared. Attributes registered with
    :func:`register_shell_attribute` are the module's own already.
    """
    state = module.__dict__
    made = []
    for name in [n for n, v in state.items() if type(v) not in _SCALARS and n not in _MODULE_INTERNALS]:
        value = state[name]
        if name in _REBUILDERS or not _reaches_state(value):
            continue
        try:
            copied = memo.get(id(value)) or _quick_copy(value, memo) or cow_copy(value, memo)
        except Exception as error:
            logger.debug("%s.%s cannot be copied (%s); it stays shared", type(module).__name__, name, error)
            continue
        if copied is not value:
            state[name] = copied
            made.append((name, copied, value))
    return made


def unchanged(copied: Any, original: Any, seen: set[tuple[int, int]] | None = None) -> bool:
    """Whether ``copied`` (a ``cow_copy`` of ``original``) still holds what ``original`` holds.

    Compared structurally: containers item by item, objects by their ``__dict__`` and slots, what
    ``cow_copy`` shared by identity, anything else by ``==``. Unsure answers are ``False``.
    """
    if copied is original:
        return True
    cls = type(original)
    if type(copied) is not cls:
        return False
    seen = set() if seen is None else seen
    pair = (id(copied), id(original))
    if pair in seen:
        return True
    seen.add(pair)
    if isinstance(original, dict):
        if list(copied) != list(original) or not all(
            unchanged(copied[k], v, seen) for k, v in original.items()
        ):
            return False
    elif isinstance(original, (list, tuple)):
        if len(copied) != len(original) or not all(
            unchanged(a, b, seen) for a, b in zip(copied, original, strict=True)
        ):
            return False
    elif isinstance(original, (set, frozenset)):
        if copied != original:
            return False
    elif cls in _ATOMIC:
        return bool(copied == original)
    elif not (hasattr(original, "__dict__") or hasattr(cls, "__slots__")):
        try:
            return bool(copied == original)
        except Exception:
            return False
    if hasattr(original, "__dict__"):  # attributes: their order is not state
        mine, theirs = vars(copied), vars(original)
        if mine.keys() != theirs.keys() or not all(unchanged(mine[k], v, seen) for k, v in theirs.items()):
            return False
    for slot in _slots(cls):
        if unchanged(getattr(copied, slot, _MISSING), getattr(original, slot, _MISSING), seen) is False:
            return False
    return True


_MISSING = object()


def _slots(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend(
            [slots] if isinstance(slots, str) else [n for n in slots if n not in ("__dict__", "__weakref__")]
        )
    return names


def tensors_held(module: nn.Module) -> Iterator[torch.Tensor]:
    """Tensors ``module`` holds outside its parameters and buffers: in attributes, in the containers
    and plain objects there (one level into an object's ``__dict__``), and inside TorchScript objects
    (a quantized module's packed weights)."""
    stack = [v for n, v in module.__dict__.items() if n not in _MODULE_INTERNALS and type(v) not in _SCALARS]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen or isinstance(value, nn.Module):
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif isinstance(value, torch._C.ScriptObject):
            try:
                stack.append(value.__getstate__())  # type: ignore[attr-defined]
            except Exception:
                continue
        elif hasattr(value, "__dict__") and not isinstance(value, _NOT_PLAIN):
            stack.extend(vars(value).values())


def link(
    children: dict[str, Any], name: str, child: nn.Module | None, parent: nn.Module | None = None
) -> None:
    """``children[name] = child``; a ``torch.compile`` wrapper (``OptimizedModule``) whose ``_orig_mod``
    changes rebuilds its compiled forward around the new module."""
    children[name] = child
    if name == "_orig_mod" and parent is not None and callable(getattr(type(parent), "_initialize", None)):
        parent._initialize()  # type: ignore[operator]


def same_state(shell: nn.Module, original: nn.Module) -> bool:
    """Whether ``shell`` still holds exactly what :func:`shell_copy` gave it from ``original``.

    Values are compared by identity (bound callables as their rebinding); containers item by
    item; a rebuilt compiled call counts as the original's.
    """
    mine, theirs = shell.__dict__, original.__dict__
    if mine.keys() != theirs.keys():
        return False
    for name, value in mine.items():
        other = theirs[name]
        if value is other or is_rebinding(value, other, original, shell):
            continue
        if name == _COMPILED and value is not None and other is not None:
            continue
        if not (isinstance(value, _CONTAINERS) and type(value) is type(other) and len(value) == len(other)):
            return False
        if isinstance(value, dict) and isinstance(other, dict):
            if not all(
                key in other and (item is other[key] or is_rebinding(item, other[key], original, shell))
                for key, item in value.items()
            ):
                return False
        elif isinstance(value, list):
            if any(a is not b for a, b in zip(value, other, strict=True)):
                return False
        elif value != other:
            return False
    return True


def alias(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor object of ``tensor``'s class viewing the same storage (module doc).

    Parameters stay parameters with the same ``requires_grad``; attributes set on the tensor
    object are copied (shallowly) to the alias. An uninitialized (lazy) tensor, which has no bytes,
    gets a new uninitialized tensor of its kind.
    """
    if isinstance(tensor, UninitializedTensorMixin):  # no bytes yet: a new uninitialized tensor of its kind
        fresh: torch.Tensor = type(tensor)(requires_grad=tensor.requires_grad, device=tensor.device, dtype=tensor.dtype)
        fresh.__dict__.update(tensor.__dict__)
        return fresh
    made: torch.Tensor = tensor.detach()
    if isinstance(tensor, nn.Parameter):
        made = torch.Tensor._make_subclass(type(tensor), made, tensor.requires_grad)
    if tensor.__dict__:
        made.__dict__.update(tensor.__dict__)
    return made


def same_tensor_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` look at the same bytes the same way, with the same autograd flags."""
    if isinstance(a, UninitializedTensorMixin) or isinstance(b, UninitializedTensorMixin):
        return (
            type(a) is type(b)
            and (a.dtype, a.device, a.requires_grad) == (b.dtype, b.device, b.requires_grad)
            and a.__dict__.keys() == b.__dict__.keys()
            and all(v is b.__dict__[k] for k, v in a.__dict__.items())
        )
    return (
        type(a) is type(b)
        and a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.requires_grad == b.requires_grad
        and a.grad is None
        and (a.device.type == "meta" or a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
        and a.storage_offset() == b.storage_offset()
        and a.stride() == b.stride()
        and a.__dict__.keys() == b.__dict__.keys()
        and all(v is b.__dict__[k] for k, v in a.__dict__.items())
    )


def _walk(root: nn.Module, children: Callable[[nn.Module], Iterable[nn.Module | None]]) -> list[nn.Module]:
    seen = {id(root)}
    found = [root]
    stack = [root]
    while stack:
        for child in children(stack.pop()):
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
                stack.append(child)
    return found


def all_modules(root: nn.Module) -> list[nn.Module]:
    """Every distinct module under ``root`` (``root`` included), depth first, without building names.

    Inside a scope, children are read through its on-access dicts (they become the clone's stand-ins).
    """
    return _walk(root, lambda module: module._modules.values())


def raw_modules(root: nn.Module) -> list[nn.Module]:
    """Every distinct module under ``root`` as held now, without going through a scope's on-access dicts."""
    return _walk(root, lambda module: dict.values(module.__dict__["_modules"]))


def raw_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The parameters and buffers ``module`` holds directly, as held now (no scope stand-ins made)."""
    for kind in ("_parameters", "_buffers"):
        for tensor in dict.values(module.__dict__[kind]):
            if tensor is not None:
                yield tensor


def tensor_slots(module: nn.Module) -> Iterator[tuple[dict[str, Any], str, torch.Tensor]]:
    """``(container, name, tensor)`` for every parameter and buffer held directly by ``module``."""
    for tensors in (module._parameters, module._buffers):
        for name, tensor in tensors.items():
            if tensor is not None:
                yield tensors, name, tensor


def all_tensors(root: nn.Module) -> dict[int, torch.Tensor]:
    """``id -> tensor`` for every distinct parameter and buffer under ``root``."""
    return {id(t): t for module in all_modules(root) for _, _, t in tensor_slots(module)}


def named_tensors(root: nn.Module) -> dict[int, str]:
    """``id(tensor) -> first qualified name`` for every parameter and buffer under ``root``."""
    names: dict[int, str] = {}
    for prefix, module in root.named_modules(remove_duplicate=False):
        for _, name, tensor in tensor_slots(module):
            names.setdefault(id(tensor), f"{prefix}.{name}" if prefix else name)
    return names


def storage_id(tensor: torch.Tensor) -> tuple[str, int] | None:
    """The storage ``tensor`` views, or ``None`` when it has no bytes (meta, empty)."""
    if tensor.device.type == "meta" or isinstance(tensor, UninitializedTensorMixin):
        return None
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return (str(tensor.device), storage.data_ptr())


def storage_bytes(root: nn.Module) -> dict[tuple[str, int], int]:
    """``storage_id -> nbytes`` for every storage that the tensors under ``root`` live in."""
    sizes: dict[tuple[str, int], int] = {}
    for tensor in all_tensors(root).values():
        key = storage_id(tensor)
        if key is not None:
            sizes[key] = tensor.untyped_storage().nbytes()
    return sizes


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter, or ``None`` for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None
