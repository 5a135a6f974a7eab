"""``instantid.cache`` in the diffusers path: a re-applied face reuses its tokens and K/V, and outputs are
bit-equal with and without the cache (``apply_instantid`` and ``instantid_hooks``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from instantid import cache as instantid_cache
from instantid.diffusers import apply_instantid, instantid_hooks
from tests.diffusers.helpers import face, run, unet_inputs


@pytest.fixture
def caches() -> Iterator[instantid_cache.InstantIDCaches]:
    yield instantid_cache.configure(max_mb=64, max_entries=8)
    instantid_cache.configure()


def _lookups(layer: str) -> tuple[int, int]:
    stats = instantid_cache.caches().stats()["layers"][layer]
    return stats["hits"], stats["misses"]


def test_apply_instantid_reuses_tokens_and_kv(unet, adapter, caches) -> None:
    args, kwargs = unet_inputs()
    first = run(apply_instantid(unet, adapter, face(1), weight=0.8), args, kwargs)
    assert (_lookups("tokens"), _lookups("kv")) == ((0, 1), (0, 1))
    again = run(apply_instantid(unet, adapter, face(1).clone(), weight=0.8), args, kwargs)
    assert (_lookups("tokens"), _lookups("kv")) == ((1, 1), (1, 1)), "an equal embedding in a new tensor hits"
    assert torch.equal(first, again)
    reweighted = run(apply_instantid(unet, adapter, face(1), weight=0.3), args, kwargs)
    assert (_lookups("tokens"), _lookups("kv")) == ((2, 1), (2, 1)), "a new weight reuses the K/V"
    noisy = apply_instantid(unet, adapter, face(1), weight=0.3, noise=0.2)
    assert (_lookups("tokens"), _lookups("kv")) == ((2, 2), (2, 2))
    other = apply_instantid(unet, adapter, face(2), weight=0.3)
    assert (_lookups("tokens"), _lookups("kv")) == ((2, 3), (2, 3))
    instantid_cache.configure(max_mb=0)
    assert torch.equal(run(apply_instantid(unet, adapter, face(1), weight=0.8), args, kwargs), first)
    assert torch.equal(run(apply_instantid(unet, adapter, face(1), weight=0.3), args, kwargs), reweighted)
    del noisy, other


def test_instantid_hooks_cached_equals_uncached(unet, adapter, caches) -> None:
    args, kwargs = unet_inputs(seed=3)
    outputs = []
    for _ in range(2):
        with instantid_hooks(unet, adapter, face(4), weight=0.6, start=0.0, end=0.9):
            outputs.append(run(unet, args, kwargs))
    assert _lookups("kv") == (1, 1)
    instantid_cache.configure(max_mb=0)
    with instantid_hooks(unet, adapter, face(4), weight=0.6, start=0.0, end=0.9):
        uncached = run(unet, args, kwargs)
    assert torch.equal(outputs[0], uncached) and torch.equal(outputs[1], uncached)
