"""``PatchCache``: memoize what a patch computes from tensors, invalidated exactly, bounded, observable.

A patch often derives heavy values from its inputs once (InstantID's per-layer K/V from the
face tokens and the adapter weights). When a graph re-runs with the same inputs, the cache
returns the earlier result instead of recomputing it.

Exact invalidation: a cached result is returned only when ``fn`` is the same object and every
argument matches the one it was computed from:

- a tensor must be the *same* tensor object, still alive, with the same data pointer, shape,
  stride, dtype and version counter, and the same bytes where it is looked at: a small tensor
  (up to ``max_snapshot_numel`` elements) is kept as a copy and compared in full on every lookup;
  a larger one has the bytes of 512 evenly spaced elements compared. That catches the writes the
  version counter does not see (``p.data.copy_()``, as ComfyUI patches weights in place; writes
  through ``t.numpy()``; writes through another tensor object on the same storage, made with
  ``set_``) and in-place writes to inference tensors, which have no version counter: always for a
  small tensor, for a large one whenever the write changes a sampled element (a whole new
  weight, a LoRA merged in). The blind spot, documented: such a write to a large tensor that
  leaves all 512 sampled elements as they were. ``by_contents(t)`` keys a tensor by its exact
  contents instead (dtype, shape and bytes): an equal tensor made anew hits. A sparse (or other
  non-strided) tensor raises ``TypeError`` before ``fn`` runs: pass ``t.to_dense()`` or
  ``by_contents(t)``;
- a bound method is keyed by its function and its object, each as below (``cache(obj.method, t)``
  hits with a new bound method of the same object and never keeps ``obj`` alive);
- an object that compares by identity (its class keeps ``object``'s ``__eq__`` and
  ``__hash__``: a model, a face-analysis app) is held by weak reference and matches only itself;
- other arguments are compared by type and value (they must be hashable): ``2``, ``2.0`` and
  ``True`` are different keys, although Python's ``==`` calls them equal. Floats (and complex
  numbers, and numpy scalars) are compared by their exact value: ``-0.0`` and ``0.0`` differ, and
  NaN matches NaN (where ``==`` says it matches nothing). Other hashable objects are compared by
  their own ``==`` and ``hash``. Tuples, lists, dicts, frozensets and dataclass instances are
  looked into, with their types; a dict's key order is part of its key (another order is a miss,
  never a wrong hit).

Lifetime: entries hold weak references to their tensor and identity-compared arguments, so the
cache never keeps inputs alive, and when one of them is freed its entries are dropped at once
(a weak-reference callback; deferred to the cache's next operation when the object dies while
the cache is busy). Results are held strongly, bounded by ``maxsize`` entries and by
``max_bytes`` bytes of the tensors they hold (each storage counted once however many results
share it); the least recently used entries are evicted first, and a result larger than
``max_bytes`` on its own is returned without being kept.

Thread-safe: one lock guards the table; ``fn`` runs outside it (two threads missing on the same
key both compute, and the later result is kept). ``stats()`` gives hits, misses, evictions, the
bytes held, the hit rate and the time saved (the compute time of every hit); each event is
logged at debug level on the ``cow_model.cache`` logger.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import threading
import time
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

import torch

from .tree import version_of

R = TypeVar("R")

logger = logging.getLogger(__name__)

StorageKey = tuple[str, int, int]


@dataclasses.dataclass(frozen=True)
class _TensorGuard:
    ref: weakref.ref[torch.Tensor]
    data_ptr: int
    layout: tuple[Any, ...]
    version: int | None
    contents: torch.Tensor | None
    """All of a small tensor's bytes."""
    sample: torch.Tensor | None
    """The bytes of :data:`SAMPLED` evenly spaced elements of a large tensor."""

    def holds(self, tensor: torch.Tensor) -> bool:
        if self.ref() is not tensor or tensor.data_ptr() != self.data_ptr or _layout(tensor) != self.layout:
            return False
        if self.version is not None and version_of(tensor) != self.version:
            return False
        if self.contents is not None:
            return torch.equal(self.contents, _as_bytes(tensor))
        return self.sample is None or torch.equal(self.sample, _sampled_bytes(tensor))


SAMPLED = 512
"""Elements of a large tensor argument whose bytes are compared on every lookup (module doc)."""


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def _sampled_bytes(tensor: torch.Tensor) -> torch.Tensor:
    count = tensor.numel()
    positions = torch.linspace(0, count - 1, min(SAMPLED, count)).long()
    return tensor.detach()[torch.unravel_index(positions, tensor.shape)].view(torch.uint8)


def _snapshot(tensor: torch.Tensor, max_numel: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(contents, sample)`` to compare on a later lookup; ``(None, None)`` for tensors without plain bytes."""
    if tensor.is_meta or tensor.is_quantized or tensor.numel() == 0:
        return None, None
    if tensor.numel() <= max_numel:
        return _as_bytes(tensor).clone(), None
    return None, _sampled_bytes(tensor)


@dataclasses.dataclass(frozen=True)
class _ObjectGuard:
    ref: weakref.ref[Any]

    def holds(self, obj: Any) -> bool:
        return self.ref() is obj


_Guard = _TensorGuard | _ObjectGuard


def _layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)


@dataclasses.dataclass(frozen=True, eq=False)
class by_contents:
    """Key ``tensor`` by its exact contents (dtype, shape and bytes), not by the tensor object.

    For small tensors made anew on every run with the same values (face embeddings); the bytes
    are read once per call, so keep it to tensors of a few thousand elements.
    """

    tensor: torch.Tensor

    def key(self) -> Hashable:
        t = self.tensor.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        data = t.reshape(-1).contiguous().cpu()
        return (
            "contents",
            t.dtype,
            tuple(t.shape),
            data.view(torch.uint8).numpy().tobytes() if t.numel() else b"",
        )


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """A snapshot of one cache's counters (``PatchCache.stats()``)."""

    name: str
    hits: int
    misses: int
    evictions: int
    dropped: int
    entries: int
    max_entries: int
    bytes: int
    max_bytes: int | None
    time_saved_s: float

    @property
    def hit_rate(self) -> float:
        """Hits over lookups (0.0 before any lookup)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters as JSON-ready values, ``hit_rate`` included."""
        return dataclasses.asdict(self) | {"hit_rate": self.hit_rate}


@dataclasses.dataclass(eq=False)
class _Entry:
    guards: tuple[_Guard, ...]
    result: Any
    storages: dict[StorageKey, int]
    seconds: float


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors inside ``value``: itself, or found in tuples, lists, sets, dict values and dataclass fields."""
    stack = [value]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (tuple, list, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))


def storage_bytes(tensors: Iterable[torch.Tensor]) -> dict[StorageKey, int]:
    """``{storage: nbytes}`` for the distinct storages behind ``tensors`` (meta tensors count 0)."""
    out: dict[StorageKey, int] = {}
    for tensor in tensors:
        if tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        device = tensor.device
        out[(device.type, -1 if device.index is None else device.index, storage.data_ptr())] = (
            storage.nbytes()
        )
    return out


class PatchCache:
    """An LRU memo for ``fn(*args, **kwargs)`` keyed exactly on its tensor and value arguments.

    ``maxsize``: most entries kept (>= 1). ``max_bytes``: most bytes of result tensors kept
    (``None``: no byte bound). ``tensors_of(result)``: the tensors a result owns, for the byte
    count (default :func:`tensors_in`). ``name`` names the cache in logs and ``stats()``.
    """

    def __init__(
        self,
        maxsize: int = 16,
        max_bytes: int | None = None,
        *,
        max_snapshot_numel: int = 1 << 16,
        name: str = "PatchCache",
        tensors_of: Callable[[Any], Iterable[torch.Tensor]] = tensors_in,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"PatchCache needs maxsize >= 1; got {maxsize}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"PatchCache needs max_bytes >= 0 or None; got {max_bytes}")
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.max_snapshot_numel = max_snapshot_numel
        self.name = name
        self.tensors_of = tensors_of
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.dropped = 0
        self.time_saved = 0.0
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._storages: dict[StorageKey, list[int]] = {}  # storage -> [entries holding it, nbytes]
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[Hashable, weakref.ref[Any]]] = collections.deque()
        self._self_ref = weakref.ref(self)

    # --- the memo ------------------------------------------------------------------------------

    def __call__(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """``fn(*args, **kwargs)``, or the result of an earlier call with exactly these inputs.

        Raises ``TypeError`` naming the argument when one is neither a tensor, a container or
        dataclass of them, nor hashable.
        """
        referents: list[Any] = []
        key = (_key(fn, referents, "fn"), _key((args, tuple(sorted(kwargs.items()))), referents, "arguments"))
        return self._get_or_compute(key, referents, lambda: fn(*args, **kwargs))

    def get_or_compute(self, key_parts: Any, compute: Callable[[], R]) -> R:
        """The result cached under ``key_parts`` (keyed as ``__call__`` keys its arguments), else ``compute()``,
        kept under that key. ``compute`` must depend on nothing outside ``key_parts``."""
        referents: list[Any] = []
        key = ("parts", _key(key_parts, referents, "key"))
        return self._get_or_compute(key, referents, compute)

    def _get_or_compute(self, key: Hashable, referents: list[Any], compute: Callable[[], R]) -> R:
        with self._lock:
            self._purge_pending()
            entry = self._entries.get(key)
            if entry is not None and all(g.holds(r) for g, r in zip(entry.guards, referents, strict=True)):
                self._entries.move_to_end(key)
                self.hits += 1
                self.time_saved += entry.seconds
                logger.debug("%s: hit (%.2f ms saved)", self.name, entry.seconds * 1e3)
                return entry.result
            self.misses += 1
        start = time.perf_counter()
        result = compute()
        seconds = time.perf_counter() - start
        guards = tuple(self._guard(key, r) for r in referents)
        storages = storage_bytes(self.tensors_of(result))
        logger.debug("%s: miss (computed in %.2f ms)", self.name, seconds * 1e3)
        with self._lock:
            self._purge_pending()
            if any(g.ref() is None for g in guards):
                return result  # an input died while computing: nothing to key on
            old = self._entries.pop(key, None)
            if old is not None:
                self._release(old)
            entry = _Entry(guards, result, storages, seconds)
            if self.max_bytes is not None and self._new_bytes(storages) > self.max_bytes:
                logger.debug(
                    "%s: result of %d bytes exceeds max_bytes=%d, not kept",
                    self.name,
                    sum(storages.values()),
                    self.max_bytes,
                )
                return result
            self._entries[key] = entry
            self._hold(entry)
            self._evict()
        return result

    # --- bookkeeping ---------------------------------------------------------------------------

    def _guard(self, key: Hashable, referent: Any) -> _Guard:
        callback = _freed_callback(self._self_ref, key)
        if not isinstance(referent, torch.Tensor):
            return _ObjectGuard(weakref.ref(referent, callback))
        contents, sample = _snapshot(referent, self.max_snapshot_numel)
        return _TensorGuard(
            weakref.ref(referent, callback),
            referent.data_ptr(),
            _layout(referent),
            version_of(referent),
            contents,
            sample,
        )

    def _new_bytes(self, storages: dict[StorageKey, int]) -> int:
        return sum(n for s, n in storages.items() if s not in self._storages)

    def _hold(self, entry: _Entry) -> None:
        for storage, nbytes in entry.storages.items():
            held = self._storages.get(storage)
            if held is None:
                self._storages[storage] = [1, nbytes]
                self._bytes += nbytes
            else:
                held[0] += 1

    def _release(self, entry: _Entry) -> None:
        for storage in entry.storages:
            held = self._storages[storage]
            held[0] -= 1
            if held[0] == 0:
                del self._storages[storage]
                self._bytes -= held[1]

    def _evict(self) -> None:
        while len(self._entries) > self.maxsize or (
            self.max_bytes is not None and self._bytes > self.max_bytes
        ):
            _, entry = self._entries.popitem(last=False)
            self._release(entry)
            self.evictions += 1
            logger.debug(
                "%s: evicted the least recently used entry (%d entries, %d bytes left)",
                self.name,
                len(self._entries),
                self._bytes,
            )

    def _input_freed(self, key: Hashable, ref: weakref.ref[Any]) -> None:
        self._pending.append((key, ref))
        if self._lock.acquire(blocking=False):  # busy (maybe in this very thread): the next operation purges
            try:
                self._purge_pending()
            finally:
                self._lock.release()

    def _purge_pending(self) -> None:
        """Drop the entries whose inputs were freed (the lock is held)."""
        while self._pending:
            key, ref = self._pending.popleft()
            entry = self._entries.get(key)
            if entry is not None and any(g.ref is ref for g in entry.guards):
                del self._entries[key]
                self._release(entry)
                self.dropped += 1
                logger.debug(
                    "%s: an input was freed, its entry dropped (%d entries left)",
                    self.name,
                    len(self._entries),
                )

    # --- inspection ----------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            self._purge_pending()
            return len(self._entries)

    @property
    def bytes_held(self) -> int:
        """Bytes of the distinct tensor storages the kept results hold."""
        with self._lock:
            self._purge_pending()
            return self._bytes

    def stats(self) -> CacheStats:
        """Hits, misses, evictions, entries dropped because an input was freed, entries, bytes, time saved."""
        with self._lock:
            self._purge_pending()
            return CacheStats(
                name=self.name,
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
                dropped=self.dropped,
                entries=len(self._entries),
                max_entries=self.maxsize,
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                time_saved_s=self.time_saved,
            )

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._pending.clear()
            count = len(self._entries)
            self._entries.clear()
            self._storages.clear()
            self._bytes = 0
        logger.debug("%s: cleared (%d entries)", self.name, count)

    def reset_stats(self) -> None:
        """Zero the counters (entries are kept)."""
        with self._lock:
            self.hits = self.misses = self.evictions = self.dropped = 0
            self.time_saved = 0.0


def _freed_callback(cache_ref: weakref.ref[PatchCache], key: Hashable) -> Callable[[weakref.ref[Any]], None]:
    def freed(ref: weakref.ref[Any]) -> None:
        cache = cache_ref()
        if cache is not None:
            cache._input_freed(key, ref)

    return freed


def _by_identity(value: Any) -> bool:
    """Whether ``value`` compares by identity and can be held weakly."""
    cls = type(value)
    if cls.__eq__ is not object.__eq__ or cls.__hash__ is not object.__hash__:
        return False
    try:
        weakref.ref(value)
    except TypeError:
        return False
    return True


def _key(value: Any, referents: list[Any], where: str) -> Hashable:
    """A hashable stand-in for ``value`` that equals another's only for the same type and value.

    Tensors and identity-compared objects become positions in ``referents`` (guarded weakly);
    floats become their exact hexadecimal value (NaN one key).
    """
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(
                f"PatchCache cannot key {where}: a {str(value.layout).removeprefix('torch.')} tensor has no plain "
                "bytes to guard; pass a dense tensor (t.to_dense()) or by_contents(t)"
            )
        referents.append(value)
        return ("tensor", id(value))
    if type(value) is types.MethodType:  # bound methods: the function and the object, each keyed as itself
        return ("method", _key(value.__func__, referents, where), _key(value.__self__, referents, f"{where}.__self__"))
    if isinstance(value, by_contents):
        return value.key()
    cls = type(value)
    if isinstance(value, (tuple, list)):
        return (cls, tuple(_key(item, referents, f"{where}[{i}]") for i, item in enumerate(value)))
    if isinstance(value, dict):
        return (
            cls,
            tuple(
                (_key(k, referents, f"{where} key {k!r}"), _key(v, referents, f"{where}[{k!r}]"))
                for k, v in value.items()
            ),
        )
    if isinstance(value, frozenset):
        return (cls, frozenset(_key(item, referents, f"{where} item") for item in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple(
            (f.name, _key(getattr(value, f.name), referents, f"{where}.{f.name}"))
            for f in dataclasses.fields(value)
        )
        return (cls, fields)
    if isinstance(value, float):
        return (cls, _float_key(value))
    if isinstance(value, complex):
        return (cls, _float_key(value.real), _float_key(value.imag))
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic) and not isinstance(value, numpy.object_):
        return (cls, _key(value.item(), referents, where))
    if value is not None and _by_identity(value):
        referents.append(value)
        return ("object", id(value))
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
