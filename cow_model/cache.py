"""``PatchCache``: memoize what a patch computes from tensors, invalidated exactly.

A patch often derives heavy values from its inputs once (InstantID's per-layer K/V from the
face tokens and the adapter weights). When a graph re-runs with the same inputs, the cache
returns the earlier result instead of recomputing it.

Exact invalidation: a cached result is returned only when ``fn`` is the same object and every
argument matches the one it was computed from:

- a tensor must be the *same* tensor object, still alive, with the same data pointer, shape,
  stride, dtype and version counter. Inference tensors (made under ``torch.inference_mode()``,
  as ComfyUI makes everything) carry no version counter: for those the cache keeps a copy when
  they are small (``max_snapshot_numel`` elements) and compares contents; larger inference
  tensors are compared by identity and data pointer only, which is documented as the one
  blind spot (an in-place write inside inference mode to a large tensor);
- other arguments are compared by type and value (they must be hashable): ``2``, ``2.0`` and
  ``True`` are different keys, although Python's ``==`` calls them equal. Floats (and complex
  numbers, and numpy scalars) are compared by their exact value: ``-0.0`` and ``0.0`` differ, and
  NaN matches NaN (where ``==`` says it matches nothing). Other hashable objects are compared by
  their own ``==`` and ``hash``. Tuples, lists, dicts, frozensets and dataclass instances are
  looked into, with their types; a dict's key order is part of its key (another order is a miss,
  never a wrong hit).

Entries hold weak references to their tensor arguments, so the cache never keeps inputs alive;
results are held strongly, at most ``maxsize`` of them (least recently used dropped first).
Thread-safe.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

from .tree import version_of

R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class _TensorGuard:
    ref: weakref.ref[torch.Tensor]
    data_ptr: int
    layout: tuple[Any, ...]
    version: int | None
    contents: torch.Tensor | None

    def holds(self, tensor: torch.Tensor) -> bool:
        if self.ref() is not tensor or tensor.data_ptr() != self.data_ptr or _layout(tensor) != self.layout:
            return False
        if self.version is not None:
            return version_of(tensor) == self.version
        return self.contents is None or torch.equal(self.contents, tensor)


def _layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)


class PatchCache:
    """An LRU memo for ``fn(*args, **kwargs)`` keyed exactly on its tensor and value arguments."""

    def __init__(self, maxsize: int = 16, max_snapshot_numel: int = 1 << 16) -> None:
        if maxsize < 1:
            raise ValueError(f"PatchCache needs maxsize >= 1; got {maxsize}")
        self.maxsize = maxsize
        self.max_snapshot_numel = max_snapshot_numel
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[tuple[_TensorGuard, ...], Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __call__(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """``fn(*args, **kwargs)``, or the result of an earlier call with exactly these inputs.

        Raises ``TypeError`` naming the argument when one is neither a tensor, a container or
        dataclass of them, nor hashable.
        """
        tensors: list[torch.Tensor] = []
        key = (fn, _key((args, tuple(sorted(kwargs.items()))), tensors, "arguments"))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and all(guard.holds(t) for guard, t in zip(entry[0], tensors, strict=True)):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
        result = fn(*args, **kwargs)
        guards = tuple(self._guard(tensor) for tensor in tensors)
        with self._lock:
            self.misses += 1
            self._entries[key] = (guards, result)
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return result

    def _guard(self, tensor: torch.Tensor) -> _TensorGuard:
        version = version_of(tensor)
        contents = None
        if version is None and tensor.numel() <= self.max_snapshot_numel:
            contents = tensor.detach().clone()
        return _TensorGuard(weakref.ref(tensor), tensor.data_ptr(), _layout(tensor), version, contents)


def _key(value: Any, tensors: list[torch.Tensor], where: str) -> Hashable:
    """A hashable stand-in for ``value`` that equals another's only for the same type and value.

    Tensors become positions in ``tensors``; floats become their exact hexadecimal value (NaN one key).
    """
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", id(value))
    cls = type(value)
    if isinstance(value, (tuple, list)):
        return (cls, tuple(_key(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)))
    if isinstance(value, dict):
        return (
            cls,
            tuple(
                (_key(k, tensors, f"{where} key {k!r}"), _key(v, tensors, f"{where}[{k!r}]"))
                for k, v in value.items()
            ),
        )
    if isinstance(value, frozenset):
        return (cls, frozenset(_key(item, tensors, f"{where} item") for item in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple(
            (f.name, _key(getattr(value, f.name), tensors, f"{where}.{f.name}"))
            for f in dataclasses.fields(value)
        )
        return (cls, fields)
    if isinstance(value, float):
        return (cls, _float_key(value))
    if isinstance(value, complex):
        return (cls, _float_key(value.real), _float_key(value.imag))
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic) and not isinstance(value, numpy.object_):
        return (cls, _key(value.item(), tensors, where))
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"PatchCache cannot key {where}: {cls.__name__} is neither a tensor, a tuple/list/dict or "
            "dataclass of them, nor hashable"
        ) from None
    return (cls, value)


def _float_key(value: float) -> str:
    """The exact value: ``-0.0`` and ``0.0`` differ, every NaN is ``"nan"``."""
    return float.hex(value)
