"""InstantID's caches: the work an apply repeats when a graph re-runs, each layer keyed exactly.

ComfyUI re-runs ``ApplyInstantID`` whenever any input changes (the prompt conditioning is one),
nearly always with the same face, adapter and model. Four :class:`cow_model.cache.PatchCache`
layers keep what that work produced:

- ``faces``: one image's face analysis (a :class:`instantid.face.FaceResult`, or "no face"), keyed
  by a BLAKE2b digest of the image's ``uint8`` pixels and its shape (an equal image in a new tensor
  hits), the face-analysis object (held weakly, by identity) and the detection sizes;
- ``tokens``: the Resampler's conditional and unconditional face tokens, keyed by the adapter
  (every tensor, exactly), the embeddings' exact contents, the noise and the device;
- ``kv``: every layer's identity K/V (:func:`instantid.attention.precompute_kv`), keyed by the
  adapter, the face-token tensors, the dtype and the device;
- ``models``: a patched output model, keyed by the input model (weakly, by identity), a
  fingerprint of what the model carries (ComfyUI's ``patches_uuid`` where present, else its weight
  patches; its object patches and ``model_options``), and every input the patch depends on. A hit
  hands out a fresh clone of the kept model, so nothing a caller does to its output's dicts reaches
  the cache. Since ComfyUI PR #12382 (2026-02) that clone shares the patch objects with the kept
  model, and another pack may change one in place (``Attn2Replace.add``): so a hit first checks that
  the kept model still holds the attn2 patch objects it was stored with, each with the same term
  containers and entries (by identity: microseconds), and otherwise rebuilds it, counted as
  ``invalidated`` (and as a miss, not a hit) in :meth:`InstantIDCaches.stats`. The kept model holds
  no reference to its input model: ComfyUI's ``clone().parent`` (set since 2025) is cleared on it.

A changed ``weight``, ``start_at``, ``end_at`` or ``mask`` misses only ``models`` and rebuilds the
per-layer terms from the kept K/V.

Sizes: ``InstantIDCaches(max_mb, max_entries)``, defaulting to the environment variables
``INSTANTID_CACHE_MB`` (the bytes all layers together may hold, default 256) and
``INSTANTID_CACHE_ENTRIES`` (entries per layer, default 32); 0 in either disables caching (every
call computes). The process-wide instance is :data:`CACHES`; :func:`configure` replaces its layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from cow_model.cache import PatchCache, by_contents, tensors_in
from instantid.attention import IdentityKV, face_tokens, precompute_kv
from instantid.face import DETECTION_SIZES, FaceResult, NoFaceDetectedError, analyze_face, image_label
from instantid.weights import InstantIDWeights

logger = logging.getLogger(__name__)

R = TypeVar("R")

ENV_MB = "INSTANTID_CACHE_MB"
ENV_ENTRIES = "INSTANTID_CACHE_ENTRIES"
DEFAULT_MB = 256
DEFAULT_ENTRIES = 32
LAYERS = ("faces", "tokens", "kv", "models")
SHARES = {"faces": 0.05, "tokens": 0.10, "kv": 0.60, "models": 0.25}
"""Each layer's share of the byte budget (K/V dominate: ~10 MiB per SDXL face in fp16)."""


@dataclass(frozen=True)
class NoFace:
    """A cached "no face in this image" (the image's width and height, for the message)."""

    width: int
    height: int


def image_digest(image: np.ndarray) -> tuple[bytes, tuple[int, ...], str]:
    """A fast exact key for an image's pixels: BLAKE2b (128 bits) of its bytes, its shape and dtype."""
    data = np.ascontiguousarray(image)
    return hashlib.blake2b(data.tobytes(), digest_size=16).digest(), tuple(data.shape), str(data.dtype)


def _frozen(result: FaceResult) -> FaceResult:
    """``result`` with read-only copies of its arrays, so no caller can change a cached result."""
    arrays = {}
    for name in ("embedding", "kps", "bbox"):
        array = np.array(getattr(result, name), copy=True)
        array.setflags(write=False)
        arrays[name] = array
    return FaceResult(det_score=result.det_score, det_size=result.det_size, **arrays)


def _sizes_text(det_sizes: Sequence[int]) -> str:
    return f"detection sizes {det_sizes[0]} down to {det_sizes[-1]}"


def _kv_tensors(result: Any) -> Iterable[Tensor]:
    for kv in result:
        yield kv.k
        yield kv.v


def _attn2_table(model: Any) -> dict[Any, Any]:
    options = getattr(model, "model_options", {})
    return options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


def _model_tensors(kept: Any) -> Iterable[Tensor]:
    """The K/V tensors a kept patched ComfyUI model's InstantID terms hold (the bytes it adds; weights are shared)."""
    for patch in _attn2_table(getattr(kept, "model", kept)).values():
        for callback in getattr(patch, "callback", ()):
            kv = getattr(callback, "kv", None)
            if isinstance(kv, IdentityKV):
                yield kv.k
                yield kv.v


def fingerprint(value: Any, depth: int = 0) -> Any:
    """A hashable summary of a nested options structure: containers by content, numbers and strings by
    value, every other object by type and identity. Two structures with the same fingerprint hold the
    same objects in the same places."""
    if depth > 50:
        return ("deep", id(value))
    if isinstance(value, dict):
        return (
            "dict",
            tuple((fingerprint(k, depth + 1), fingerprint(v, depth + 1)) for k, v in value.items()),
        )
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(fingerprint(v, depth + 1) for v in value))
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, repr(value))
    if isinstance(value, Tensor):
        version = getattr(value, "_version", None) if not value.is_inference() else None
        return ("tensor", id(value), value.data_ptr(), tuple(value.shape), version)
    return (type(value).__qualname__, id(value))


_MODEL_FIELDS = (
    "object_patches",
    "model_options",
    "weight_wrapper_patches",
    "hook_patches",
    "additional_models",
    "injections",
)


def model_fingerprint(model: Any) -> Any:
    """What a ComfyUI ``ModelPatcher`` carries besides its base weights: ``patches_uuid`` (ComfyUI renews it on
    every weight-patch change) or else a fingerprint of ``patches``; object patches, ``model_options`` and the
    other patch tables of newer ComfyUI versions; its base model and load device."""
    uuid = getattr(model, "patches_uuid", None)
    weights = ("uuid", str(uuid)) if uuid is not None else fingerprint(getattr(model, "patches", None))
    others = tuple(
        (name, fingerprint(getattr(model, name))) for name in _MODEL_FIELDS if hasattr(model, name)
    )
    return (weights, others, id(getattr(model, "model", None)), str(getattr(model, "load_device", None)))


def _entries(terms: Any) -> tuple[Any, ...] | None:
    """A list's entries (a list can grow in place); ``None`` for anything else (a tuple is checked by identity)."""
    return tuple(terms) if isinstance(terms, list) else None


def patch_seal(model: Any) -> tuple[tuple[Any, ...], ...]:
    """What a kept model's attn2 patches are: per key, the patch object, its ``callback`` and ``kwargs``
    containers and, for lists, their entries. Compared by identity with :func:`same_seal`."""
    seal = []
    for key, patch in _attn2_table(model).items():
        callback, kwargs = getattr(patch, "callback", None), getattr(patch, "kwargs", None)
        seal.append((key, patch, callback, _entries(callback), kwargs, _entries(kwargs)))
    return tuple(seal)


def same_seal(a: tuple[tuple[Any, ...], ...], b: tuple[tuple[Any, ...], ...]) -> bool:
    """Whether two :func:`patch_seal` results hold the same keys and the very same objects."""

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, tuple) and isinstance(y, tuple):
            return len(x) == len(y) and all(i is j for i, j in zip(x, y, strict=True))
        return x is y

    return len(a) == len(b) and all(
        ra[0] == rb[0] and all(same(x, y) for x, y in zip(ra[1:], rb[1:], strict=True)) for ra, rb in zip(a, b, strict=True)
    )


class _KeptModel:
    """A patched model the ``models`` layer keeps, with the :func:`patch_seal` it had when kept.

    Its ``parent`` (ComfyUI's ``clone()`` sets it since 2025) is cleared, so the entry never keeps its
    input model alive; ComfyUI reads ``parent`` only weakly (``LoadedModel``), and only of models it loads.
    """

    __slots__ = ("model", "seal")

    def __init__(self, model: Any) -> None:
        self.keep(model)

    def keep(self, model: Any) -> None:
        if getattr(model, "parent", None) is not None:
            model.parent = None
        self.model = model
        self.seal = patch_seal(model)

    def intact(self) -> bool:
        """Whether the kept model still holds the patch objects and terms it was kept with."""
        return same_seal(self.seal, patch_seal(self.model))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(float(raw))
    except ValueError:
        logger.warning("%s=%r is not a number; using %d", name, raw, default)
        return default
    return max(value, 0)


class InstantIDCaches:
    """The four cache layers (``faces``, ``tokens``, ``kv``, ``models``), or none when disabled.

    ``max_mb``: bytes all layers together may hold, in MiB (split by :data:`SHARES`); ``max_entries``: entries
    per layer. ``None`` reads ``INSTANTID_CACHE_MB`` / ``INSTANTID_CACHE_ENTRIES``; 0 disables caching.
    """

    def __init__(self, max_mb: float | None = None, max_entries: int | None = None) -> None:
        self.max_mb = _env_int(ENV_MB, DEFAULT_MB) if max_mb is None else max_mb
        self.max_entries = _env_int(ENV_ENTRIES, DEFAULT_ENTRIES) if max_entries is None else max_entries
        self.layers: dict[str, PatchCache] = {}
        self._run = threading.local()
        self._invalidated = 0
        self._kept_lock = threading.Lock()
        if self.enabled:
            budget = int(self.max_mb * 2**20)
            tensors_of: dict[str, Callable[[Any], Iterable[Tensor]]] = {
                "faces": lambda _: (),
                "tokens": tensors_in,
                "kv": _kv_tensors,
                "models": _model_tensors,
            }
            for name in LAYERS:
                self.layers[name] = PatchCache(
                    self.max_entries,
                    int(budget * SHARES[name]),
                    name=f"instantid.{name}",
                    tensors_of=tensors_of[name],
                )

    @property
    def enabled(self) -> bool:
        return self.max_mb > 0 and self.max_entries > 0

    @contextlib.contextmanager
    def one_run(self) -> Iterator[None]:
        """Within the block, one face analysis per image serves every call, cache enabled or not.

        A node that needs both the embedding and the keypoints of an image runs in this block, so
        ``INSTANTID_CACHE_MB=0`` still detects each face once (the memo lives only for the block,
        in this thread).
        """
        outer = getattr(self._run, "faces", None)
        if outer is None:
            self._run.faces = {}
        try:
            yield
        finally:
            if outer is None:
                self._run.faces = None

    def _lookup(self, layer: str, key: Any, compute: Callable[[], R]) -> R:
        run = getattr(self._run, "faces", None) if layer == "faces" else None
        if run is not None:
            if key not in run:
                run[key] = self._cached(layer, key, compute)
            return run[key]
        return self._cached(layer, key, compute)

    def _cached(self, layer: str, key: Any, compute: Callable[[], R]) -> R:
        cache = self.layers.get(layer)
        if cache is None:
            return compute()
        return cache.get_or_compute(key, compute)

    # --- the layers --------------------------------------------------------------------------

    def analyze_face(
        self,
        app: Any,
        image: np.ndarray,
        *,
        index: int = 0,
        det_sizes: Sequence[int] = DETECTION_SIZES,
        label: str | None = None,
    ) -> FaceResult:
        """:func:`instantid.face.analyze_face`, kept per image contents, face-analysis object and detection sizes.

        The result's arrays are read-only. Raises what ``analyze_face`` raises, with the same messages.
        """
        name = label or image_label(index)
        sizes = tuple(int(s) for s in det_sizes)

        def analyze() -> FaceResult | NoFace:
            try:
                return _frozen(analyze_face(app, image, index=index, det_sizes=sizes, label=name))
            except NoFaceDetectedError:
                return NoFace(int(image.shape[1]), int(image.shape[0]))

        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.dtype != np.uint8:
            return analyze_face(app, image, index=index, det_sizes=sizes, label=name)  # its own error
        result = self._lookup("faces", ("face", app, image_digest(image), sizes), analyze)
        if isinstance(result, NoFace):
            raise NoFaceDetectedError(
                f"No face detected in {name} ({result.width}x{result.height}) at {_sizes_text(sizes)}"
            )
        return result

    def face_tokens(
        self, weights: InstantIDWeights, embeds: Tensor, *, noise: float = 0.0, device: Any = None
    ) -> tuple[Tensor, Tensor]:
        """:func:`instantid.attention.face_tokens`, kept per adapter, embedding contents, noise and device."""
        target = embeds.device if device is None else torch.device(device)
        key = ("tokens", weights, by_contents(embeds), float(noise), str(target))
        return self._lookup("tokens", key, lambda: face_tokens(weights, embeds, noise=noise, device=target))

    def precompute_kv(
        self, weights: InstantIDWeights, cond: Tensor, uncond: Tensor, *, dtype: torch.dtype, device: Any
    ) -> tuple[IdentityKV, ...]:
        """:func:`instantid.attention.precompute_kv`, kept per adapter, face-token tensors, dtype and device."""
        key = ("kv", weights, cond, uncond, dtype, str(torch.device(device)))
        return self._lookup(
            "kv", key, lambda: precompute_kv(weights, cond, uncond, dtype=dtype, device=device)
        )

    def patched_model(self, model: Any, inputs: Any, build: Callable[[], Any]) -> Any:
        """A fresh clone of the model ``build()`` makes from ``model`` and ``inputs`` (every input it depends
        on besides the model), kept per model (weakly), :func:`model_fingerprint` and ``inputs``.

        A kept model whose patches were changed in place since (another pack's ``add`` through a clone
        that shared them) is rebuilt and kept anew in the same entry, counted as ``invalidated`` (the
        entry's byte count stays the first build's: the rebuild holds the same cached K/V)."""
        key = ("model", model, model_fingerprint(model), inputs)
        if "models" not in self.layers:
            return build()
        kept = self._lookup("models", key, lambda: _KeptModel(build()))
        if not kept.intact():
            logger.info("instantid.models: a kept model's patches were changed in place by another node; rebuilding it")
            with self._kept_lock:
                self._invalidated += 1
            kept.keep(build())
        return kept.model.clone()

    # --- telemetry -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Every layer's ``PatchCache.stats()`` as a dict, and the totals. The ``models`` layer also counts
        ``invalidated``: hits on a kept model changed in place, rebuilt (counted as misses, not hits)."""
        layers = {name: cache.stats().as_dict() for name, cache in self.layers.items()}
        if "models" in layers:
            models = layers["models"]
            models["invalidated"] = self._invalidated
            models["hits"] -= self._invalidated
            models["misses"] += self._invalidated
            lookups = models["hits"] + models["misses"]
            models["hit_rate"] = models["hits"] / lookups if lookups else 0.0
        hits = sum(s["hits"] for s in layers.values())
        misses = sum(s["misses"] for s in layers.values())
        return {
            "enabled": self.enabled,
            "max_mb": self.max_mb,
            "max_entries": self.max_entries,
            "layers": layers,
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "bytes": sum(s["bytes"] for s in layers.values()),
            "time_saved_s": sum(s["time_saved_s"] for s in layers.values()),
        }

    def clear(self) -> None:
        """Drop every entry of every layer (counters are kept)."""
        for cache in self.layers.values():
            cache.clear()
        logger.debug("InstantID caches cleared")

    def summary(self) -> str:
        """One line: hits/lookups per layer, bytes held, time saved."""
        stats = self.stats()
        if not stats["enabled"]:
            return "InstantID cache: disabled"
        parts = [f"{name} {s['hits']}/{s['hits'] + s['misses']}" for name, s in stats["layers"].items()]
        return (
            f"InstantID cache: hits {', '.join(parts)}; {stats['bytes'] / 2**20:.1f} MiB held; "
            f"{stats['time_saved_s'] * 1e3:.0f} ms saved"
        )


_lock = threading.Lock()
CACHES = InstantIDCaches()
"""The process-wide caches the ComfyUI nodes and the diffusers path use."""


def caches() -> InstantIDCaches:
    """The process-wide caches (``CACHES``, as last set by :func:`configure`)."""
    return CACHES


def configure(max_mb: float | None = None, max_entries: int | None = None) -> InstantIDCaches:
    """Replace the process-wide caches with new, empty ones of these sizes (``None``: from the environment)."""
    global CACHES
    with _lock:
        CACHES = InstantIDCaches(max_mb, max_entries)
    return CACHES
