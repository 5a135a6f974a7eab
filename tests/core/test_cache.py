"""``PatchCache``: hits only for exactly the same inputs, misses after any change."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from cow_model import PatchCache


def counting():
    calls = []

    def project(tokens: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        calls.append(1)
        return tokens @ weight * scale

    return project, calls


def test_same_inputs_hit_and_changed_inputs_miss() -> None:
    cache = PatchCache()
    project, calls = counting()
    tokens, weight = torch.randn(2, 3), torch.randn(3, 4)
    first = cache(project, tokens, weight)
    assert cache(project, tokens, weight) is first and len(calls) == 1
    cache(project, tokens, weight, scale=2.0)
    assert len(calls) == 2
    cache(project, tokens.clone(), weight)  # an equal but different tensor: a different input
    assert len(calls) == 3
    with torch.no_grad():
        weight.add_(1)  # in place: version counter moves
    assert torch.allclose(cache(project, tokens, weight), tokens @ weight)
    assert len(calls) == 4
    weight.data = torch.zeros(3, 4)  # new storage behind the same object
    assert torch.count_nonzero(cache(project, tokens, weight)) == 0
    assert (cache.hits, cache.misses) == (1, 5)


def test_small_inference_tensors_are_compared_by_contents() -> None:
    cache = PatchCache()
    project, calls = counting()
    with torch.inference_mode():
        tokens, weight = torch.randn(2, 3), torch.randn(3, 4)
        cache(project, tokens, weight)
        cache(project, tokens, weight)
        assert len(calls) == 1
        tokens.mul_(2)  # inference tensors have no version counter
        assert torch.allclose(cache(project, tokens, weight), tokens @ weight)
    assert len(calls) == 2


def test_dataclasses_and_containers_are_looked_into() -> None:
    @dataclasses.dataclass(frozen=True)
    class Weights:
        k: tuple[torch.Tensor, ...]

    cache = PatchCache()
    calls = []

    def run(weights: Weights, options: dict[str, list[int]]) -> int:
        calls.append(1)
        return len(weights.k)

    weights = Weights((torch.ones(2), torch.ones(2)))
    cache(run, weights, {"layers": [1, 2]})
    cache(run, weights, {"layers": [1, 2]})
    cache(run, weights, {"layers": [1, 3]})
    with torch.no_grad():
        weights.k[1].zero_()
    cache(run, weights, {"layers": [1, 2]})
    assert len(calls) == 3


def test_entries_hold_no_inputs_and_are_bounded() -> None:
    import weakref

    cache = PatchCache(maxsize=2)
    project, calls = counting()
    weight = torch.randn(3, 4)
    inputs = [torch.randn(2, 3) for _ in range(5)]
    for tokens in inputs:
        cache(project, tokens, weight)
    assert len(cache) == 2
    cache(project, inputs[0], weight)  # the oldest entries were dropped
    assert len(calls) == 6
    alive = weakref.ref(inputs[-1])
    del inputs, tokens
    gc.collect()
    assert alive() is None


def test_unhashable_arguments_are_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=r"cannot key arguments\[0\]\[0\]: set is neither"):
        PatchCache()(len, {1, 2})
    with pytest.raises(ValueError, match="maxsize >= 1"):
        PatchCache(maxsize=0)
