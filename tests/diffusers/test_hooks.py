"""instantid_hooks: in place for the block, restored exactly (exceptions included), one thread only."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from cow_model import LazyClonedModel
from instantid.diffusers import OwnerThreadError, apply_instantid, instantid_hooks
from tests.diffusers.helpers import assert_unchanged, face, run, snapshot, unet_inputs


def test_hooks_equal_the_clone_and_restore_exactly(unet, adapter):
    before = snapshot(unet)
    args, kwargs = unet_inputs(timestep=700.0)
    clone = apply_instantid(unet, adapter, face(7), weight=0.6, start=0.1, end=0.9)
    with instantid_hooks(unet, adapter, face(7), weight=0.6, start=0.1, end=0.9) as hooked:
        assert hooked is unet
        assert torch.equal(run(unet, args, kwargs), run(clone, args, kwargs))
        assert len(unet.time_proj._forward_pre_hooks) == 1
    assert_unchanged(unet, before)


def test_exception_inside_the_block_restores(unet, adapter):
    before = snapshot(unet)
    with pytest.raises(KeyError, match="boom"), instantid_hooks(unet, adapter, face(8), start=0.2):
        raise KeyError("boom")
    assert_unchanged(unet, before)


def test_restores_module_processors_exactly(unet, adapter):
    """A UNet whose attn2 modules hold nn.Module processors (here diffusers' IP-Adapter ones) gets them back,
    in the same place of each module's child dict."""
    from tests.diffusers.test_cow_diffusers import ip_processors

    with (
        pytest.raises(TypeError, match="copy-on-write clone"),
        instantid_hooks(LazyClonedModel(unet), adapter, face(9)),
    ):
        pass
    own = copy.deepcopy(unet)  # a private model to install diffusers' processors on, in place
    own.set_attn_processor({**own.attn_processors, **ip_processors(unet)})
    before = snapshot(own)
    with instantid_hooks(own, adapter, face(9)):
        assert all("processor" not in m._modules for n, m in own.named_modules() if n.endswith("attn2"))
    assert_unchanged(own, before)


def test_another_thread_is_refused_while_active(unet, adapter):
    args, kwargs = unet_inputs()
    errors: list[BaseException] = []

    def other_thread():
        try:
            run(unet, args, kwargs)
        except BaseException as error:
            errors.append(error)

    with instantid_hooks(unet, adapter, face(10)):
        run(unet, args, kwargs)  # the owning thread runs fine
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], OwnerThreadError)
    assert "instantid_hooks" in str(errors[0]) and "apply_instantid" in str(errors[0])
    # after the block, any thread may run it again
    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1


def test_a_second_block_on_the_same_unet_is_refused(unet, adapter):
    before = snapshot(unet)
    with instantid_hooks(unet, adapter, face(11)):
        with pytest.raises(RuntimeError, match="already has InstantID processors"):
            with instantid_hooks(unet, adapter, face(12)):
                pass
    assert_unchanged(unet, before)


def test_bad_input_installs_nothing(unet, adapter):
    before = snapshot(unet)
    with pytest.raises(ValueError, match="512"), instantid_hooks(unet, adapter, torch.randn(1, 128)):
        pass
    assert_unchanged(unet, before)
