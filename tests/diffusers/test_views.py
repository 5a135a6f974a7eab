"""Issue 15: ordinary diffusers calls on a view keep (or plainly refuse) the identity; views own their parts.

Each test drives the session's tiny SDXL ControlNet pipeline the way a diffusers user would and checks
the identity is acting (or plainly refused) and the base pipeline is unchanged.
"""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from instantid.diffusers import apply_instantid
from instantid.diffusers.compose import ComposedIdentityProcessor, identity_of
from instantid.diffusers.pipeline import FaceTokensControlNet
from instantid.diffusers.view import IdentityNotSavedWarning
from instantid.keypoints import draw_kps
from instantid.testing.tiny_pipelines import IMAGE_SIZE, tiny_sdxl_unet
from tests.diffusers.helpers import assert_unchanged, face, run, snapshot, unet_inputs

pytestmark = pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`")

KPS = np.array([[5, 6], [11, 6], [8, 9], [5, 12], [11, 12]], dtype=np.float32)
CONTROL = draw_kps((IMAGE_SIZE, IMAGE_SIZE), KPS)


def generate(pipeline, steps: int = 1, image=CONTROL, **kwargs) -> np.ndarray:
    return pipeline(
        "a photo of a person", negative_prompt="blurry", image=image, num_inference_steps=steps,
        height=IMAGE_SIZE, width=IMAGE_SIZE, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
        output_type="np", **kwargs,
    ).images  # fmt: skip


@pytest.fixture(scope="module")
def view(pipe, tiny_adapter):
    return apply_instantid(pipe, tiny_adapter, face(31), weight=1.0)


@pytest.fixture(scope="module")
def plain(pipe, tiny_adapter):
    """The same pipeline through a view whose identity is off (weight 0): IdentityNet still reads the face."""
    return generate(apply_instantid(pipe, tiny_adapter, face(31), weight=0.0))


def test_set_ip_adapter_scale_and_per_call_scale_act_on_the_identity(pipe, tiny_adapter, view, plain):
    full = generate(view)
    assert not np.array_equal(full, plain)
    assert np.array_equal(generate(view, ip_adapter_scale=0), plain)
    assert np.array_equal(generate(view), full)  # the per-call scale is for that call only
    view.set_ip_adapter_scale(0.0)
    try:
        assert np.array_equal(generate(view), plain)
        view.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})  # InstantStyle's per-block form
        scales = {key: identity_of(p).scale for key, p in view.unet.attn_processors.items() if identity_of(p)}
        on = [key for key, s in scales.items() if s == 1.0]
        assert on and all(key.startswith("up_blocks.0.attentions.1") for key in on)
        with pytest.raises(TypeError, match=r"number .* per-block dict"):
            view.set_ip_adapter_scale("strong")
        with pytest.raises(ValueError, match="per-block"):
            view.set_ip_adapter_scale({"up": {"block_0": [1.0, 0.0]}})
    finally:
        view.set_ip_adapter_scale(1.0)
    assert np.array_equal(generate(view), full)


def test_image_embeds_per_call_select_the_identity(pipe, tiny_adapter, view):
    other = generate(apply_instantid(pipe, tiny_adapter, face(32), weight=1.0))
    assert np.array_equal(generate(view, image_embeds=face(32)), other)
    assert np.array_equal(generate(view, ip_adapter_image_embeds=[face(32)]), other)
    with pytest.raises(ValueError, match="list of one"):
        generate(view, ip_adapter_image_embeds=[face(32), face(33)])


@pytest.mark.parametrize(
    "call",
    [
        lambda v: v.enable_attention_slicing(1),
        lambda v: v.fuse_qkv_projections(),
        lambda v: v.unet.set_attn_processor(AttnProcessor2_0()),
    ],
    ids=["enable_attention_slicing", "fuse_qkv_projections", "set_attn_processor"],
)
def test_processor_replacing_methods_keep_the_identity(pipe, tiny_adapter, call):
    before = snapshot(pipe.unet)
    view = apply_instantid(pipe, tiny_adapter, face(34), weight=1.0)
    expected = generate(view)
    call(view)
    composed = [p for p in view.unet.attn_processors.values() if isinstance(p, ComposedIdentityProcessor)]
    assert len(composed) == tiny_adapter.num_layers
    np.testing.assert_allclose(generate(view), expected, atol=1e-4)
    assert_unchanged(pipe.unet, before)
    assert not any(isinstance(p, ComposedIdentityProcessor) for p in pipe.controlnet.attn_processors.values())


def test_reassigned_controlnet_gets_the_face_tokens(pipe, tiny_adapter):
    view = apply_instantid(pipe, tiny_adapter, face(35))
    expected = generate(view)
    view.controlnet = MultiControlNetModel([pipe.controlnet])  # InstantX's demo pattern
    assert isinstance(view.controlnet, FaceTokensControlNet) and isinstance(view.controlnet, MultiControlNetModel)
    np.testing.assert_allclose(generate(view, image=[CONTROL], controlnet_conditioning_scale=[1.0]), expected, atol=1e-5)
    assert not isinstance(pipe.controlnet, FaceTokensControlNet)


def test_saving_says_the_identity_is_not_saved(view, tmp_path):
    with pytest.warns(IdentityNotSavedWarning, match="identity is not saved"):
        view.unet.save_pretrained(tmp_path / "unet")
    with pytest.warns(IdentityNotSavedWarning, match="apply_instantid again"):
        view.save_pretrained(tmp_path / "pipe")


def test_model_offload_on_a_view_hooks_its_own_components_only(pipe, tiny_adapter):
    other = apply_instantid(pipe, tiny_adapter, face(36))
    view = apply_instantid(pipe, tiny_adapter, face(36))
    expected = generate(view)
    view.enable_model_cpu_offload(device="cpu")
    assert np.array_equal(generate(view), expected)
    for name, component in view.components.items():
        if isinstance(component, torch.nn.Module):
            assert hasattr(component, "_hf_hook"), name
    for holder in (pipe, other):
        for name, component in holder.components.items():
            if isinstance(component, torch.nn.Module):
                assert not any(hasattr(m, "_hf_hook") for m in component.modules()), name
    with pytest.raises(RuntimeError, match="meta device"):
        view.enable_sequential_cpu_offload(device="cpu")
    assert all(p.device.type == "cpu" for p in pipe.unet.parameters())


def test_vae_settings_act_on_the_view(pipe, view):
    view.vae.enable_tiling()
    view.vae.enable_slicing()
    assert view.vae.use_tiling and not pipe.vae.use_tiling and not pipe.vae.use_slicing


def test_four_threads_through_four_views(pipe, tiny_adapter):
    views = [apply_instantid(pipe, tiny_adapter, face(40 + i)) for i in range(4)]
    prompts = ["a", "a photo of a person in a red coat", "b c", "a portrait"]
    solo = [v(p, image=CONTROL, num_inference_steps=1, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="np",
              generator=torch.Generator().manual_seed(0)).images for v, p in zip(views, prompts, strict=True)]  # fmt: skip
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = views[index](
                prompts[index], image=CONTROL, num_inference_steps=1, height=IMAGE_SIZE, width=IMAGE_SIZE,
                output_type="np", generator=torch.Generator().manual_seed(0),
            ).images  # fmt: skip
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index in range(4):
        assert np.array_equal(results[index], solo[index])


def test_pickle_and_deepcopy_of_views_and_clones(pipe, unet, adapter, tiny_adapter):
    clone = apply_instantid(unet, adapter, face(37), end=0.5)
    restored = pickle.loads(pickle.dumps(clone))
    assert sum(identity_of(p) is not None for p in restored.attn_processors.values()) == adapter.num_layers
    view = apply_instantid(pipe, tiny_adapter, face(38))
    expected = generate(view)
    copied = copy.deepcopy(view)  # (pickling a pipeline whose transformers text encoders ran fails: local hooks)
    assert type(copied).__name__ == type(pipe).__name__ and copied.unet is not view.unet
    assert np.array_equal(generate(copied), expected)


def test_bad_adapters_and_faces_are_named(unet, adapter):
    with pytest.raises(TypeError, match=r"got the path 'ip-adapter\.bin'.*load_instantid"):
        apply_instantid(unet, "ip-adapter.bin", face(0))
    with pytest.raises(TypeError, match=r"adapter must be .*\(None\)"):
        apply_instantid(unet, None, face(0))
    with pytest.raises(TypeError, match="looks like an image"):
        apply_instantid(unet, adapter, np.random.rand(32, 32, 3).astype(np.float32))
    with pytest.raises(TypeError, match=r"torch\.int64 is neither an image"):
        apply_instantid(unet, adapter, torch.ones(1, 512, dtype=torch.int64))


def test_a_text_encoder_lora_through_a_view_is_the_views(pipe, tiny_adapter):
    pytest.importorskip("peft")
    view, other = (apply_instantid(pipe, tiny_adapter, face(39)) for _ in range(2))
    g = torch.Generator().manual_seed(0)
    lora = {
        f"text_encoder.text_model.encoder.layers.{i}.self_attn.q_proj.lora_{part}.weight": torch.randn(shape, generator=g)
        for i in range(3)
        for part, shape in (("A", (2, 32)), ("B", (32, 2)))
    }
    ids = torch.tensor([[512, 64, 65] + [513] * 74])
    before = pipe.text_encoder(ids).last_hidden_state
    modules = [name for name, _ in pipe.text_encoder.named_modules()]
    view.load_lora_weights(lora, adapter_name="style")
    assert not torch.equal(view.text_encoder(ids).last_hidden_state, before)
    for holder in (pipe, other):
        assert torch.equal(holder.text_encoder(ids).last_hidden_state, before)
    assert [name for name, _ in pipe.text_encoder.named_modules()] == modules


def test_a_lora_loaded_into_the_base_after_a_clone_exists_is_refused_not_half_followed(adapter):
    peft = pytest.importorskip("peft")
    base = tiny_sdxl_unet(seed=0)
    clone = apply_instantid(base, adapter, face(41))
    base.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    with pytest.raises(RuntimeError, match=r"attn2 changed its children \['to_k', 'to_q', 'to_v'\].*apply again"):
        run(clone, *unet_inputs())
    fresh = apply_instantid(base, adapter, face(41))
    assert sum(hasattr(m, "lora_A") for m in fresh.modules()) == sum(hasattr(m, "lora_A") for m in base.modules())
    run(fresh, *unet_inputs())
