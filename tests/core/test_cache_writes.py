"""``PatchCache`` (issue 14 item 7): writes that bypass the version counter, sparse arguments, bound methods."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch

from cow_model import PatchCache


def counted() -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    calls: list[int] = []

    def double(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return t * 2

    return double, calls


@pytest.mark.parametrize("numel", [16, 1 << 18])  # under and over max_snapshot_numel
@pytest.mark.parametrize("write", ["data", "numpy", "set_sibling"])
def test_writes_that_bypass_the_version_counter_miss(write: str, numel: int) -> None:
    cache = PatchCache()
    double, calls = counted()
    weight = torch.nn.Parameter(torch.randn(numel))
    assert torch.equal(cache(double, weight), weight * 2)
    if write == "data":
        weight.data.copy_(torch.randn(numel))  # ComfyUI's in-place weight patching
    elif write == "numpy":
        weight.detach().numpy()[:] = 3.0
    else:
        sibling = torch.empty(0)
        sibling.set_(weight.untyped_storage(), 0, weight.shape)  # another tensor object on the same bytes
        with torch.no_grad():
            sibling.fill_(-1.0)
    assert torch.equal(cache(double, weight), weight * 2)
    assert len(calls) == 2


def test_a_sparse_argument_is_a_clear_error_before_fn_runs() -> None:
    cache = PatchCache()
    double, calls = counted()
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(TypeError, match=r"arguments\[0\].*sparse_coo.*to_dense"):
        cache(double, sparse)
    assert calls == []
    assert torch.equal(cache(double, sparse.to_dense()), torch.eye(3) * 2)


def test_a_bound_method_does_not_keep_its_object_alive() -> None:
    class Projector:
        def __init__(self) -> None:
            self.calls = 0

        def project(self, t: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return t + 1

    cache = PatchCache()
    tokens = torch.randn(4)
    projector = Projector()
    first = cache(projector.project, tokens)
    assert cache(projector.project, tokens) is first and projector.calls == 1  # a new bound method each time: a hit
    other = Projector()
    cache(other.project, tokens)
    assert other.calls == 1  # another object: another key
    ref = weakref.ref(projector)
    del projector
    gc.collect()
    assert ref() is None
    assert len(cache) == 1  # its entry went with it
