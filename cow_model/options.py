"""``cow_copy``: ``copy.deepcopy`` for option structures, sharing heavy immutable payload.

What is copied: every container and plain object, exactly as ``copy.deepcopy`` (CPython 3.11's
``copy`` module) copies it: dicts, lists, tuples, sets, bound methods with their ``__self__``,
objects through ``copyreg.dispatch_table`` / ``__reduce_ex__(4)`` / ``__reduce__``, aliasing and
cycles preserved through the memo. Reduce tuples are rebuilt as ``copy._reconstruct`` rebuilds
them, errors included: a reduce tuple of fewer than 2 or more than 5 items (a 6th item,
``state_setter``, is not supported by ``copy``) raises the same ``TypeError``; an object without
any reduce method raises ``copy.Error``.

What is shared (returned as is): what ``copy.deepcopy`` treats as atomic (numbers, strings,
functions, classes, ...), torch tensors and parameters, ``torch.nn.Module`` instances, torch
dtypes and devices, and objects that declare themselves shareable: a class attribute
``__cow_shared__ = True``, or a class passed to ``register_shared``. Sharing is the contract
that such payload is not mutated in place after it is placed in options.

Objects defining ``__deepcopy__`` are copied by it, receiving the same memo. So that a
``__deepcopy__`` that calls ``copy.deepcopy(value, memo)`` shares what ``cow_copy`` shares, the
memo is first seeded with the shared objects reachable from the object (found through
``gc.get_referents``, not descending into shared objects, classes, functions or modules): each is
entered as its own copy, which ``copy.deepcopy`` then returns as is (it looks the memo up before
anything else). A tensor inside such an object is therefore the same tensor in the copy, and stays
one object with the same tensor elsewhere in the options, whatever the order of the dicts.
Shared objects that such a ``__deepcopy__`` reaches without a reference from the object (through
a global, or a memo of its own) are copied as ``copy.deepcopy`` copies them.

Nesting depth: one level of nesting costs as many Python frames as in ``copy.deepcopy`` (or
fewer), so ``cow_copy`` copies every structure ``copy.deepcopy`` copies under the same recursion
limit. Results never depend on the order of a dict's items beyond what ``copy.deepcopy``'s do.

The cost grows with the number of containers and objects visited, not with payload bytes.
"""

from __future__ import annotations

import copy
import copyreg
import gc
import types
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")
Memo = dict[int, Any]

_DEEPCOPY_ATOMIC: frozenset[type] = frozenset(
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
    }
)
"""The exact types ``copy.deepcopy`` returns as they are (besides classes)."""
_ATOMIC_TYPES: frozenset[type] = _DEEPCOPY_ATOMIC | {
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
}
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
    for registered in _registered:  # a loop, not any(genexpr): one frame less at the deepest level
        if issubclass(cls, registered):
            return True
    return False


def cow_copy(obj: T, memo: Memo | None = None, _nil: Any = []) -> T:  # noqa: B006 - a private sentinel, as in copy.deepcopy
    """A deep copy of ``obj`` that shares tensors, modules and other declared payload (module doc).

    Structured as ``copy.deepcopy`` is (the dispatch inlined, the copiers calling back into this
    function), so that nesting costs the same number of frames per level.
    """
    if memo is None:
        memo = {}
    key = id(obj)
    found = memo.get(key, _nil)
    if found is not _nil:
        return found
    cls = type(obj)
    if cls in _ATOMIC_TYPES or is_shared(obj):
        return obj
    copier = _COPIERS.get(cls)
    if copier is not None:
        result = copier(obj, memo)
    else:
        deepcopy = getattr(obj, "__deepcopy__", None)
        if deepcopy is not None:
            _seed_shared(obj, memo)
            result = deepcopy(memo)
        else:
            reduced = _reduce(obj, cls)
            result = obj if isinstance(reduced, str) else _reconstruct(obj, memo, *reduced)
    if result is not obj:
        memo[key] = result
        _keep_alive(obj, memo)
    return result


def _keep_alive(obj: Any, memo: Memo) -> None:
    """Keep ``obj`` alive as long as ``memo`` (its id is a key), as ``copy._keep_alive`` does."""
    try:
        memo[id(memo)].append(obj)
    except KeyError:
        memo[id(memo)] = [obj]


def _seed_shared(obj: Any, memo: Memo) -> None:
    """Enter every shared object reachable from ``obj`` into ``memo`` as its own copy.

    Run before ``obj.__deepcopy__(memo)``: a ``copy.deepcopy(value, memo)`` inside it then returns
    these objects as they are. Walks references iteratively (no recursion), skipping what ``memo``
    already holds and not descending into shared objects, modules or atomic values.
    """
    seen = {id(obj)}
    stack = [obj]
    while stack:
        for ref in gc.get_referents(stack.pop()):
            ref_id = id(ref)
            if ref_id in seen or ref_id in memo:
                continue
            seen.add(ref_id)
            ref_cls = type(ref)
            if ref_cls in _DEEPCOPY_ATOMIC or ref_cls is types.ModuleType or isinstance(ref, type):
                continue  # copy.deepcopy returns these as they are, or they are not options
            if is_shared(ref):
                memo[ref_id] = ref
                _keep_alive(ref, memo)
            else:
                stack.append(ref)


def _copy_list(obj: list[Any], memo: Memo) -> list[Any]:
    result: list[Any] = []
    memo[id(obj)] = result
    append = result.append
    for item in obj:
        append(cow_copy(item, memo))
    return result


def _copy_dict(obj: dict[Any, Any], memo: Memo) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    memo[id(obj)] = result
    for key, value in obj.items():
        result[cow_copy(key, memo)] = cow_copy(value, memo)
    return result


def _copy_tuple(obj: tuple[Any, ...], memo: Memo) -> tuple[Any, ...]:
    items = []
    for item in obj:  # a loop, not a comprehension (a frame of its own in 3.11)
        items.append(cow_copy(item, memo))
    try:  # a cycle through this tuple was copied meanwhile
        return memo[id(obj)]
    except KeyError:
        pass
    for new, old in zip(items, obj):  # noqa: B905 - same length by construction
        if new is not old:
            return tuple(items)
    return obj


def _copy_method(obj: types.MethodType, memo: Memo) -> types.MethodType:
    return type(obj)(obj.__func__, cow_copy(obj.__self__, memo))


_COPIERS: dict[type, Callable[[Any, Memo], Any]] = {
    list: _copy_list,
    dict: _copy_dict,
    tuple: _copy_tuple,
    types.MethodType: _copy_method,
}


def _reduce(obj: Any, cls: type) -> Any:
    """What ``copy.deepcopy`` reduces ``obj`` to (same lookup order, same error)."""
    reductor = copyreg.dispatch_table.get(cls)
    if reductor:
        return reductor(obj)
    reduce_ex = getattr(obj, "__reduce_ex__", None)
    if reduce_ex is not None:
        return reduce_ex(4)
    reduce = getattr(obj, "__reduce__", None)
    if reduce:
        return reduce()
    raise copy.Error(f"un(deep)copyable object of type {cls}")


def _reconstruct(
    x: Any,
    memo: Memo,
    func: Callable[..., Any],
    args: Any,
    state: Any = None,
    listiter: Any = None,
    dictiter: Any = None,
) -> Any:
    """``copy._reconstruct`` (CPython 3.11) with ``cow_copy`` for its deep copies.

    The same signature, so a reduce tuple of the wrong length raises the same ``TypeError``.
    """
    if args:
        copied_args = []
        for arg in args:
            copied_args.append(cow_copy(arg, memo))
        args = copied_args
    y = func(*args)
    memo[id(x)] = y

    if state is not None:
        state = cow_copy(state, memo)
        if hasattr(y, "__setstate__"):
            y.__setstate__(state)
        else:
            if isinstance(state, tuple) and len(state) == 2:
                state, slotstate = state
            else:
                slotstate = None
            if state is not None:
                y.__dict__.update(state)
            if slotstate is not None:
                for name, value in slotstate.items():
                    setattr(y, name, value)

    if listiter is not None:
        for item in listiter:
            y.append(cow_copy(item, memo))
    if dictiter is not None:
        for key, value in dictiter:
            key = cow_copy(key, memo)
            value = cow_copy(value, memo)
            y[key] = value
    return y
