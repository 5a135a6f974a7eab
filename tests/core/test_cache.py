"""``PatchCache``: hits only for exactly the same inputs, misses after any change."""

from __future__ import annotations

import dataclasses
import gc
import math

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


def test_equal_values_of_different_types_are_different_keys() -> None:
    cache = PatchCache()
    seen: list[object] = []

    def record(value: object) -> str:
        seen.append(value)
        return f"{type(value).__name__}:{value!r}"

    values: list[object] = [
        2,
        2.0,
        True,
        1,
        1.0,
        2 + 0j,
        (2,),
        [2],
        (2.0,),
        {"k": 2},
        {"k": 2.0},
        {2: "v"},
        {2.0: "v"},
    ]
    results = [cache(record, value) for value in values]
    assert results == [f"{type(v).__name__}:{v!r}" for v in values], "each value got its own result"
    assert len(seen) == len(values), "no value hit another's entry"
    assert [cache(record, value) for value in values] == results and len(seen) == len(values), (
        "each hits its own"
    )


def test_signed_zeros_differ_and_nan_matches_nan() -> None:
    cache = PatchCache()
    calls: list[float] = []

    def sign(x: float) -> float:
        calls.append(x)
        return math.copysign(1.0, x)

    assert cache(sign, 0.0) == 1.0
    assert cache(sign, -0.0) == -1.0, "-0.0 must not hit 0.0's entry"
    assert len(calls) == 2
    nan_calls = len(calls)
    first = cache(sign, float("nan"))
    assert cache(sign, float("nan")) == first and len(calls) == nan_calls + 1, (
        "a new NaN object hits NaN's entry"
    )
    complex_calls: list[complex] = []

    def identity(z: complex) -> complex:
        complex_calls.append(z)
        return z

    cache(identity, complex(0.0, 0.0))
    cache(identity, complex(0.0, -0.0))
    cache(identity, complex(float("nan"), 1.0))
    cache(identity, complex(float("nan"), 1.0))
    assert len(complex_calls) == 3


def test_nested_floats_are_keyed_exactly() -> None:
    cache = PatchCache()
    calls: list[object] = []

    def run(options: object) -> int:
        calls.append(options)
        return len(calls)

    steps = [
        ({"scale": 0.0, "weights": (1.0, float("nan"))}, 1),
        ({"scale": 0.0, "weights": (1.0, float("nan"))}, 1),  # a hit: NaN matches NaN, nested
        ({"scale": -0.0, "weights": (1.0, float("nan"))}, 2),  # a miss: -0.0
        ({"scale": 0, "weights": (1.0, float("nan"))}, 3),  # a miss: int 0
        ({"scale": False, "weights": (1.0, float("nan"))}, 4),  # a miss: bool
        (frozenset({-0.0}), 5),
        (frozenset({0.0}), 6),
        (frozenset({0.0}), 6),
    ]
    for options, expected_calls in steps:
        cache(run, options)
        assert len(calls) == expected_calls, options


def test_numpy_scalars_are_keyed_by_type_and_exact_value() -> None:
    np = pytest.importorskip("numpy")
    cache = PatchCache()
    calls: list[object] = []

    def run(x: object) -> int:
        calls.append(x)
        return len(calls)

    for value in (
        np.float32(0.0),
        np.float32(-0.0),
        np.float64(0.0),
        0.0,
        np.float32("nan"),
        np.float32("nan"),
    ):
        cache(run, value)
    assert len(calls) == 5
