"""``cow_copy``: ``copy.deepcopy`` for option structures, sharing heavy immutable payload.

What is copied: every container and plain object, exactly as ``copy.deepcopy`` copies it
(dicts, lists, tuples, sets, objects through ``__reduce_ex__``, aliasing and cycles preserved
through the memo, bound methods with their ``__self__``). Objects defining ``__deepcopy__`` are
copied by it, receiving the same memo.

What is shared (returned as is): what ``copy.deepcopy`` treats as atomic (numbers, strings,
functions, classes, ...), torch tensors and parameters, ``torch.nn.Module`` instances, torch
dtypes and devices, and objects that declare themselves shareable: a class attribute
``__cow_shared__ = True``, or a class passed to ``register_shared``. Sharing is the contract
that such payload is not mutated in place after it is placed in options.

The cost grows with the number of containers and objects visited, not with payload bytes.
"""

from __future__ import annotations

import copyreg
import types
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")
Memo = dict[int, Any]

_ATOMIC_TYPES: frozenset[type] = frozenset(
    {
        type(None),
        type(Ellipsis),
        type(NotImplemented),
        int,
        float,
        bool,
        complex,
        bytes,
        str,
        range,
        property,
        types.CodeType,
        types.FunctionType,
        types.BuiltinFunctionType,
        weakref.ref,
        torch.dtype,
        torch.device,
        torch.layout,
        torch.memory_format,
    }
)
_SHARED_BASES: tuple[type, ...] = (torch.Tensor, nn.Module, type)
_registered: set[type] = set()


def register_shared(cls: type[T]) -> type[T]:
    """Declare instances of ``cls`` (and its subclasses) shareable by ``cow_copy``; usable as a decorator."""
    if not isinstance(cls, type):
        raise TypeError(f"register_shared takes a class; got {type(cls).__name__} {cls!r}")
    _registered.add(cls)
    return cls


def is_shared(obj: object) -> bool:
    """Whether ``cow_copy`` returns ``obj`` itself instead of copying it."""
    cls = type(obj)
    if cls in _ATOMIC_TYPES or isinstance(obj, _SHARED_BASES):
        return True
    if getattr(cls, "__cow_shared__", False) is True:
        return True
    return any(issubclass(cls, registered) for registered in _registered)


def cow_copy(obj: T, memo: Memo | None = None) -> T:
    """A deep copy of ``obj`` that shares tensors, modules and other declared payload (module doc)."""
    return _copy(obj, {} if memo is None else memo)


def _copy(obj: Any, memo: Memo) -> Any:
    key = id(obj)
    found = memo.get(key, memo)
    if found is not memo:
        return found
    if is_shared(obj):
        return obj
    cls = type(obj)
    copier = _COPIERS.get(cls)
    if copier is not None:
        result = copier(obj, memo)
    else:
        deepcopy = getattr(obj, "__deepcopy__", None)
        if deepcopy is not None:
            result = deepcopy(memo)
        else:
            result = _copy_by_reduce(obj, memo)
    if result is not obj:
        memo[key] = result
        memo.setdefault(id(memo), []).append(obj)  # keep the original alive while memo lives
    return result


def _copy_list(obj: list[Any], memo: Memo) -> list[Any]:
    result: list[Any] = []
    memo[id(obj)] = result
    result.extend(_copy(item, memo) for item in obj)
    return result


def _copy_dict(obj: dict[Any, Any], memo: Memo) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    memo[id(obj)] = result
    for key, value in obj.items():
        result[_copy(key, memo)] = _copy(value, memo)
    return result


def _copy_tuple(obj: tuple[Any, ...], memo: Memo) -> tuple[Any, ...]:
    items = [_copy(item, memo) for item in obj]
    if id(obj) in memo:  # a cycle through this tuple was copied meanwhile
        return memo[id(obj)]
    if all(new is old for new, old in zip(items, obj, strict=True)):
        return obj
    return tuple(items)


def _copy_method(obj: types.MethodType, memo: Memo) -> types.MethodType:
    return types.MethodType(obj.__func__, _copy(obj.__self__, memo))


_COPIERS: dict[type, Callable[[Any, Memo], Any]] = {
    list: _copy_list,
    dict: _copy_dict,
    tuple: _copy_tuple,
    types.MethodType: _copy_method,
}


def _copy_by_reduce(obj: Any, memo: Memo) -> Any:
    cls = type(obj)
    reductor = copyreg.dispatch_table.get(cls)
    if reductor is not None:
        reduced = reductor(obj)
    elif hasattr(obj, "__reduce_ex__"):
        reduced = obj.__reduce_ex__(4)
    else:
        raise TypeError(f"cow_copy cannot copy {cls.__module__}.{cls.__qualname__}: it has no __reduce_ex__")
    if isinstance(reduced, str):
        return obj
    return _reconstruct(obj, memo, *reduced)


def _reconstruct(
    obj: Any,
    memo: Memo,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    state: Any = None,
    listiter: Any = None,
    dictiter: Any = None,
    *_: Any,
) -> Any:
    """Rebuild ``obj`` from its reduce tuple, copying arguments and state with ``_copy``."""
    result = func(*_copy(args, memo))
    memo[id(obj)] = result
    if state is not None:
        state = _copy(state, memo)
        if hasattr(result, "__setstate__"):
            result.__setstate__(state)
        else:
            slots = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            if state:
                result.__dict__.update(state)
            for name, value in (slots or {}).items():
                setattr(result, name, value)
    if listiter is not None:
        for item in listiter:
            result.append(_copy(item, memo))
    if dictiter is not None:
        for key, value in dictiter:
            result[_copy(key, memo)] = _copy(value, memo)
    return result
