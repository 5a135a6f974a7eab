"""The GPU path on CPU: conversions that change nothing, model offload on a view, fullgraph compile."""

from __future__ import annotations

import pytest
import torch

from cow_model import LazyClonedModel, SharedWeightsError
from instantid.testing.tiny_pipelines import tiny_sdxl_unet


def test_a_conversion_that_changes_nothing_is_not_refused():
    """accelerate's offload hook calls clone.to("cpu:0") on a CPU clone: torch copies, nothing changes."""
    base = tiny_sdxl_unet(seed=0)
    clone = LazyClonedModel(base)
    clone.to("cpu:0")
    assert all(a is b for a, b in zip(base.parameters(), clone.parameters(), strict=True))
    with pytest.raises(SharedWeightsError, match="conversion would change"):
        clone.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in base.parameters())
