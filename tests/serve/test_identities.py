"""A replica's parts in-process, without Ray: views, the bench's deep-copy baseline, rendering and its deadline."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pydantic", reason="instantid.serve's requests need pydantic (installed with ray[serve])")

from PIL import Image

from bench.serve import DeepCopyPipelines
from instantid.serve.errors import DeadlineExceeded, Unprocessable
from instantid.serve.identities import CowViews, LoadedIdentity
from instantid.serve.inputs import GenerateRequest
from instantid.serve.render import image_size, render_png
from instantid.serve.store import IdentityRecord
from instantid.testing.serve_models import tiny_adapter, tiny_pipeline


@pytest.fixture(scope="module")
def parts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas run (torch_threads: 1); two threads on two busy cores crawl
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    yield pipe, tiny_adapter(pipe)
    torch.set_num_threads(threads)


def identity(seed: int) -> IdentityRecord:
    return IdentityRecord(f"id{seed}", np.random.default_rng(seed).normal(size=512) * 20)


def render(pipe, record, deadline_s: float = 60.0, steps: int = 2, **body) -> bytes:
    request = GenerateRequest(prompt="a portrait", seed=1, **body)
    return render_png(pipe, record, request, steps=steps, size=(16, 16), deadline=time.monotonic() + deadline_s)


def test_views_and_the_deep_copy_baseline_make_the_same_image_and_leave_the_base_alone(parts):
    pipe, adapter = parts
    weights = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    processors = dict(pipe.unet.attn_processors)
    record = identity(0)
    view = LoadedIdentity(record, CowViews(pipe, adapter))
    copy = LoadedIdentity(record, DeepCopyPipelines(pipe, adapter))
    options = (0.8, 0.0, 1.0)
    from_view = render(view.pipeline(options), record)
    assert render(copy.pipeline(options), record) == from_view
    assert render(pipe, record) != from_view  # the base pipeline has no identity
    assert render(LoadedIdentity(identity(1), CowViews(pipe, adapter)).pipeline(options), record) != from_view
    assert Image.open(io.BytesIO(from_view)).size == (16, 16)
    assert pipe.unet.attn_processors == processors
    assert all(torch.equal(weights[name], tensor) for name, tensor in pipe.unet.state_dict().items())
    views, copies = CowViews(pipe, adapter).bytes_per_identity(), DeepCopyPipelines(pipe, adapter).bytes_per_identity()
    assert views < copies / 4


def test_a_view_is_rebuilt_for_other_options_and_released_for_good(parts):
    pipe, adapter = parts
    loaded = LoadedIdentity(identity(2), CowViews(pipe, adapter))
    first = loaded.pipeline((0.8, 0.0, 1.0))
    assert loaded.pipeline((0.8, 0.0, 1.0)) is first
    assert loaded.pipeline((0.3, 0.0, 1.0)) is not first
    loaded.release()
    with pytest.raises(RuntimeError, match="released"):
        loaded.pipeline((0.8, 0.0, 1.0))


def test_deadline_and_size_checks(parts):
    pipe, _ = parts
    with pytest.raises(DeadlineExceeded, match="before its generation started"):
        render(pipe, identity(3), deadline_s=-1.0)
    with pytest.raises(DeadlineExceeded, match=r"after \d+ denoising steps"):  # stopped between steps
        render(pipe, identity(3), deadline_s=0.02, steps=200)
    assert len(render(pipe, identity(3), steps=2)) > 0  # the pipeline carries on
    with pytest.raises(Unprocessable, match="multiple of 8"):
        image_size(pipe, GenerateRequest(prompt="p", width=12), 64)
    assert image_size(pipe, GenerateRequest(prompt="p"), 64) == (16, 16)
