"""The GPU path on CPU: conversions that change nothing, model offload on a view, fullgraph compile."""

from __future__ import annotations

import pytest
import torch

from cow_model import LazyClonedModel, SharedWeightsError
from instantid.diffusers import apply_instantid
from instantid.testing.tiny_pipelines import tiny_sdxl_unet
from tests.diffusers.helpers import face, run, unet_inputs


def test_a_conversion_that_changes_nothing_is_not_refused():
    """accelerate's offload hook calls clone.to("cpu:0") on a CPU clone: torch copies, nothing changes."""
    base = tiny_sdxl_unet(seed=0)
    clone = LazyClonedModel(base)
    clone.to("cpu:0")
    assert all(a is b for a, b in zip(base.parameters(), clone.parameters(), strict=True))
    with pytest.raises(SharedWeightsError, match="conversion would change"):
        clone.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in base.parameters())


def test_fullgraph_compile_of_an_identity_clone_with_a_window(unet, adapter):
    """One graph, no break (no thread read without an owner, the window as a tensor: no host sync),
    and the compiled clone equals the eager one inside and outside the window."""
    clone = apply_instantid(unet, adapter, face(5), end=0.5)
    args, kwargs = unet_inputs(timestep=500.0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(clone)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(clone, fullgraph=True, backend="eager")
    for timestep in (500.0, 100.0):  # in the window, after it
        args, kwargs = unet_inputs(timestep=timestep)
        torch.testing.assert_close(run(compiled, args, kwargs), run(clone, args, kwargs), rtol=1e-5, atol=1e-5)
    outside = unet_inputs(timestep=100.0)
    torch.testing.assert_close(run(clone, *outside), run(unet, *outside))
    torch._dynamo.reset()
