"""``PatchCache`` bounds and lifetime: LRU order, entry and byte bounds, weak inputs, threads, stats, a soak."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from pathlib import Path

import pytest
import torch

from cow_model.cache import PatchCache, by_contents


class Face:
    """An identity-compared input (like a model or a face-analysis app)."""


def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_least_recently_used_is_evicted_first() -> None:
    cache = PatchCache(maxsize=3)
    calls: list[int] = []

    def f(i: int) -> int:
        calls.append(i)
        return i

    for i in (1, 2, 3):
        cache(f, i)
    cache(f, 1)  # 1 is now the most recently used: 2 goes first
    cache(f, 4)
    assert calls == [1, 2, 3, 4]
    cache(f, 1)
    cache(f, 3)
    assert calls == [1, 2, 3, 4], "1 and 3 were kept"
    cache(f, 2)
    assert calls == [1, 2, 3, 4, 2], "2 was evicted"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries) == (3, 5, 2, 3)
    assert stats.hit_rate == pytest.approx(3 / 8)


def test_byte_bound_counts_each_storage_once() -> None:
    shared = torch.zeros(256)  # 1 KiB
    cache = PatchCache(maxsize=100, max_bytes=4096)

    def pair(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return shared, shared[:10]  # two views of one storage: 1 KiB held, not 2

    cache(pair, 0)
    cache(pair, 1)
    assert cache.bytes_held == 1024, "one storage shared by two results and two views counts once"

    def own(i: int) -> torch.Tensor:
        return torch.zeros(256)  # 1 KiB each

    for i in range(3):
        cache(own, i)
    assert cache.bytes_held == 4096 and len(cache) == 5
    cache(own, 3)  # over the bound: the oldest entries go until it fits
    assert cache.bytes_held <= 4096
    assert cache.stats().evictions == 2, "the two shared-storage entries went first (LRU), freeing 1 KiB"
    assert len(cache) == 4

    def huge(i: int) -> torch.Tensor:
        return torch.zeros(2048)  # 8 KiB: larger than the bound on its own

    before = len(cache)
    assert cache(huge, 0).numel() == 2048
    assert len(cache) == before and cache.bytes_held <= 4096, "a result over max_bytes is returned, not kept"


def test_entry_bound_holds_under_many_keys() -> None:
    cache = PatchCache(maxsize=5, max_bytes=1 << 20)
    for i in range(50):
        cache(double, torch.full((4,), float(i)))
    assert len(cache) <= 5
    gc.collect()
    assert len(cache) == 0, "every input died, so every entry was dropped"
    assert cache.bytes_held == 0


def test_freed_input_drops_its_entries_and_is_collected() -> None:
    cache = PatchCache(maxsize=10)
    face, other = Face(), Face()
    x = torch.randn(3)

    def analyze(app: Face, t: torch.Tensor) -> torch.Tensor:
        return t + 1

    result = cache(analyze, face, x)
    cache(analyze, other, x)
    assert cache(analyze, face, x) is result
    assert len(cache) == 2
    alive = weakref.ref(face)
    del face
    # no gc.collect(): a plain object dies at once and the weak-reference callback drops its entry
    assert alive() is None, "the cache must not keep an input alive"
    assert len(cache) == 1 and cache.stats().dropped == 1
    dead_tensor = weakref.ref(x)
    del x
    gc.collect()
    assert dead_tensor() is None
    assert len(cache) == 0 and cache.bytes_held == 0


def test_identity_objects_match_only_themselves() -> None:
    cache = PatchCache()
    calls: list[Face] = []

    def f(app: Face) -> int:
        calls.append(app)
        return len(calls)

    a, b = Face(), Face()
    assert cache(f, a) == 1 and cache(f, a) == 1
    assert cache(f, b) == 2


def test_by_contents_hits_equal_tensors_and_misses_any_difference() -> None:
    cache = PatchCache()
    calls: list[int] = []

    def f(key: object) -> int:
        calls.append(1)
        return len(calls)

    base = torch.arange(6, dtype=torch.float32)
    cache(f, by_contents(base))
    cache(f, by_contents(base.clone()))  # an equal tensor made anew
    assert len(calls) == 1
    cache(f, by_contents(base.reshape(2, 3)))  # other shape
    cache(f, by_contents(base.double()))  # other dtype
    changed = base.clone()
    changed[3] = -changed[3] - 1e-7
    cache(f, by_contents(changed))
    zero = torch.zeros(1)
    cache(f, by_contents(zero))
    cache(f, by_contents(-zero))  # -0.0 has other bytes
    assert len(calls) == 6


def test_clear_and_stats() -> None:
    cache = PatchCache(maxsize=4, name="kv")
    x = torch.randn(8)
    cache(double, x)
    cache(double, x)
    stats = cache.stats()
    assert stats.name == "kv" and stats.bytes == 32 and stats.entries == 1
    assert stats.time_saved_s >= 0.0 and stats.as_dict()["hit_rate"] == 0.5
    cache.clear()
    assert len(cache) == 0 and cache.bytes_held == 0
    assert cache.stats().hits == 1, "counters survive clear()"


def test_events_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    cache = PatchCache(maxsize=1, name="faces")
    with caplog.at_level(logging.DEBUG, logger="cow_model.cache"):
        x, y = torch.randn(2), torch.randn(2)
        cache(double, x)
        cache(double, x)
        cache(double, y)
        del y
        gc.collect()
    text = caplog.text
    for event in ("faces: miss", "faces: hit", "faces: evicted", "faces: an input was freed"):
        assert event in text, event


def test_eight_threads_on_one_cache() -> None:
    cache = PatchCache(maxsize=16, max_bytes=16 * 64 * 4)
    inputs = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(seed: int) -> None:
        try:
            barrier.wait()
            for step in range(400):
                x = inputs[(seed * 7 + step * 5) % len(inputs)]
                out = cache(double, x)
                if not torch.equal(out, x * 2):
                    raise AssertionError(f"thread {seed}: wrong result at step {step}")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    stats = cache.stats()
    assert stats.hits + stats.misses == 8 * 400
    assert stats.entries <= 16 and stats.bytes <= 16 * 64 * 4
    assert stats.bytes == sum(e.result.untyped_storage().nbytes() for e in cache._entries.values())
    assert stats.hits > 0


def test_soak_10000_apply_evict_cycles_leak_nothing() -> None:
    """10,000 misses through a cache of 8 entries: RSS grows < 50 MiB and every evicted result is collected."""
    cache = PatchCache(maxsize=8, max_bytes=8 * 4096)
    weight = torch.randn(16, 16)
    face = Face()

    def apply(app: Face, tokens: torch.Tensor, w: torch.Tensor, strength: float) -> tuple[torch.Tensor, Face]:
        return (tokens @ w) * strength, Face()

    results: list[weakref.ref[object]] = []
    inputs_alive: list[weakref.ref[torch.Tensor]] = []
    gc.collect()
    start = rss_bytes()
    tokens = torch.randn(16, 16)
    for i in range(10_000):
        if i % 10 == 0:
            tokens = torch.randn(16, 16)  # the old tokens die: their entries are dropped
            inputs_alive.append(weakref.ref(tokens))
        out, marker = cache(apply, face, tokens, weight, float(i % 13))
        results.append(weakref.ref(marker))
        del out, marker
    del tokens
    gc.collect()
    grown = rss_bytes() - start
    assert grown < 50 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"
    alive = sum(ref() is not None for ref in results)
    assert alive <= len(cache) <= 8, f"{alive} results alive with {len(cache)} entries kept"
    assert all(ref() is None for ref in inputs_alive)
    assert len(cache) == 0, "every tokens tensor is gone, so is every entry"
    stats = cache.stats()
    assert stats.misses + stats.hits == 10_000 and stats.evictions + stats.dropped == stats.misses
