"""An SDXL-shaped diffusers UNet (fp16, 2.57 B parameters): clone, patch all 70 attn2, copy no tensor."""

from __future__ import annotations

import pytest
import torch

from cow_model import LazyClonedModel
from instantid.testing.shapes import build_unet

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_unet() -> torch.nn.Module:
    return build_unet("sdxl", torch.float16)


def test_patching_all_attn2_copies_no_parameter_and_leaves_the_base_untouched(
    sdxl_unet: torch.nn.Module,
) -> None:
    base = sdxl_unet
    tensors_before = {
        name: (id(t), t.data_ptr(), t._version)
        for name, t in [*base.named_parameters(), *base.named_buffers()]
    }
    processors_before = dict(base.attn_processors)
    modules_before = {name: id(m) for name, m in base.named_modules()}

    clone = LazyClonedModel(base)
    paths = [name for name, _ in base.named_modules() if name.endswith("attn2")]
    assert len(paths) == 70
    new = {path: AttnProcessor() for path in paths}
    for path in paths:
        clone.patch_block(path, lambda attn, path=path: attn.set_processor(new[path]))

    assert isinstance(clone, type(base))
    for path in paths:
        assert clone.get_submodule(path).processor is new[path]
    assert clone.attn_processors.keys() == processors_before.keys()
    clone_tensors = {
        name: (id(t), t.data_ptr(), t._version)
        for name, t in [*clone.named_parameters(), *clone.named_buffers()]
    }
    assert clone_tensors == tensors_before  # the same tensor objects: nothing copied
    assert clone.private_bytes == 0
    assert clone.shared_bytes == sum(t.untyped_storage().nbytes() for t in base.state_dict().values())
    # only the 70 attn2 modules and their ancestors were copied, as shells
    copied = set(clone.private_paths)
    assert set(paths) <= copied
    assert all(any(p == c or p.startswith(c + ".") or c == "" for p in paths) for c in copied)
    assert len(copied) < 300

    assert dict(base.attn_processors) == processors_before
    assert {name: id(m) for name, m in base.named_modules()} == modules_before
    assert {
        name: (id(t), t.data_ptr(), t._version)
        for name, t in [*base.named_parameters(), *base.named_buffers()]
    } == tensors_before
