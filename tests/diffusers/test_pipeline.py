"""End to end: a tiny random SDXL ControlNet pipeline generating with InstantID for 2 steps.

The view from ``apply_instantid`` must equal (1) the same base pipeline with the processors installed
in place (``instantid_hooks``), bitwise, and (2) InstantID's reference data flow built from diffusers'
own parts only: ``IPAdapterAttnProcessor2_0`` holding the adapter's ``to_k_ip``/``to_v_ip``, the face
tokens appended to the prompt embeddings, and the ControlNet given those face tokens alone.
"""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from PIL import Image

from cow_model import LazyClonedModel
from instantid.attention import face_tokens
from instantid.diffusers import FaceTokensControlNet, apply_instantid, instantid_hooks
from instantid.diffusers.processor import fixed_layout
from instantid.face import analyze_face, load_face_analysis
from instantid.keypoints import draw_kps
from instantid.testing.face_models import build_antelopev2_like, paste_face_tag
from instantid.testing.tiny_pipelines import IMAGE_SIZE
from tests.diffusers.helpers import assert_unchanged, face, snapshot
from tests.diffusers.test_processor import ip_adapter_unet

pytestmark = pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`")

PROMPT, NEGATIVE = "a photo of a person", "blurry"
KPS = np.array([[5, 6], [11, 6], [8, 9], [5, 12], [11, 12]], dtype=np.float32)


def generate(pipeline, control, **kwargs) -> np.ndarray:
    return pipeline(
        **({"prompt": PROMPT, "negative_prompt": NEGATIVE} | kwargs),
        image=control,
        num_inference_steps=2,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def reference_generation(pipe, adapter, embedding, weight: float, control) -> np.ndarray:
    """InstantID's data flow from diffusers' parts: face tokens after the text, IP-Adapter processors on
    a copy of the UNet, the ControlNet (a copy) reading the 16 face tokens only."""
    cond, uncond = face_tokens(adapter, embedding)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE
    )
    controlnet = copy.deepcopy(pipe.controlnet)
    controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: (
            args,
            kwargs | {"encoder_hidden_states": kwargs["encoder_hidden_states"][:, -16:]},
        ),
        with_kwargs=True,
    )
    reference = StableDiffusionXLControlNetPipeline(
        **(pipe.components | {
            "unet": ip_adapter_unet(pipe.unet, adapter, [weight] * adapter.num_layers),
            "controlnet": controlnet,
            "scheduler": type(pipe.scheduler).from_config(pipe.scheduler.config),
        }),
        add_watermarker=False,
    )  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    return generate(
        reference,
        control,
        prompt=None,
        negative_prompt=None,
        prompt_embeds=torch.cat([embeds, cond], dim=1),
        negative_prompt_embeds=torch.cat([negative, uncond], dim=1),
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
    )


def test_view_equals_in_place_hooks_and_the_reference_flow(pipe, tiny_adapter):
    control = draw_kps((IMAGE_SIZE, IMAGE_SIZE), KPS)
    embedding = face(21)
    base_before = snapshot(pipe.unet)
    components_before = dict(pipe.components)
    config_before = pipe.config

    view = apply_instantid(pipe, tiny_adapter, embedding, weight=0.8)
    image = generate(view, control)
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(image).all()

    # the base pipeline and its UNet are untouched by making and running the view
    assert pipe.config is config_before and dict(pipe.components) == components_before
    assert all(pipe.components[k] is v for k, v in components_before.items())
    assert_unchanged(pipe.unet, base_before)
    # the view's models are copy-on-write clones of the base's (the ControlNet's behind the face-token proxy);
    # tokenizers are copies, the scheduler a new instance
    assert view.unet is not pipe.unet and view.unet.base is pipe.unet
    assert view.controlnet.__wrapped__.base is pipe.controlnet and isinstance(view.controlnet, ControlNetModel)
    assert view.scheduler is not pipe.scheduler and view.scheduler.config == pipe.scheduler.config
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert isinstance(getattr(view, name), LazyClonedModel) and getattr(view, name).base is getattr(pipe, name)
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(view, name) is not getattr(pipe, name)
        assert getattr(view, name)(PROMPT).input_ids == getattr(pipe, name)(PROMPT).input_ids

    with instantid_hooks(pipe, tiny_adapter, embedding, weight=0.8):
        assert np.array_equal(generate(pipe, control), image)
    assert_unchanged(pipe.unet, base_before)
    assert pipe.config is config_before and pipe.controlnet is components_before["controlnet"]

    np.testing.assert_allclose(
        image, reference_generation(pipe, tiny_adapter, embedding, 0.8, control), atol=1e-4
    )
    assert np.abs(image - generate(pipe, control)).max() > 1e-3  # the identity shows in the image


def test_views_with_a_window_equal_hooks_and_differ_from_full(pipe, tiny_adapter):
    control = draw_kps((IMAGE_SIZE, IMAGE_SIZE), KPS)
    view = apply_instantid(pipe, tiny_adapter, face(22), weight=1.0, start=0.0, end=0.4)
    image = generate(view, control)
    with instantid_hooks(pipe, tiny_adapter, face(22), weight=1.0, start=0.0, end=0.4):
        assert np.array_equal(generate(pipe, control), image)
    full = generate(apply_instantid(pipe, tiny_adapter, face(22), weight=1.0), control)
    assert not np.array_equal(image, full)


def test_controlnet_proxy_hands_over_face_tokens(pipe, tiny_adapter):
    cond, uncond = face_tokens(tiny_adapter, face(23))
    controlnet = copy.deepcopy(pipe.controlnet)
    seen = []
    controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    proxy = FaceTokensControlNet(controlnet, cond, uncond, fixed_layout(True))
    assert isinstance(proxy, ControlNetModel) and proxy.config is controlnet.config
    g = torch.Generator().manual_seed(0)
    inputs = {
        "controlnet_cond": torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        },
        "return_dict": False,
    }
    latent = IMAGE_SIZE // 2
    sample, text = torch.randn(2, 4, latent, latent, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        proxy(sample, 10, encoder_hidden_states=text, **inputs)
        proxy(sample, 10, encoder_hidden_states=text, guess_mode=True, **inputs)
    assert torch.equal(seen[0], torch.cat([uncond, cond]))
    assert torch.equal(seen[1], torch.cat([cond, cond]))


@pytest.fixture(scope="module")
def face_app(tmp_path_factory):
    return load_face_analysis(build_antelopev2_like(tmp_path_factory.mktemp("insightface")), provider="CPU")


def test_a_face_image_goes_through_insightface(pipe, tiny_adapter, face_app):
    photo_path = Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"
    photo = np.ascontiguousarray(cv2.imread(str(photo_path))[..., ::-1])
    photo = paste_face_tag(photo, (photo.shape[1] // 2, photo.shape[0] // 2), 40)
    result = analyze_face(face_app, photo)

    from_image = apply_instantid(pipe, tiny_adapter, photo, face_analysis=face_app)
    from_result = apply_instantid(pipe, tiny_adapter, result)
    from_embedding = apply_instantid(pipe, tiny_adapter, torch.from_numpy(result.embedding))
    from_pil = apply_instantid(pipe, tiny_adapter, Image.fromarray(photo), face_analysis=face_app)
    from_batch = apply_instantid(pipe, tiny_adapter, np.stack([photo, photo]), face_analysis=face_app)
    for key, processor in from_image.unet.attn_processors.items():
        if ".attn2." in key:
            for other in (from_result, from_embedding, from_pil, from_batch):
                assert torch.equal(processor.kv.k, other.unet.attn_processors[key].kv.k)
                assert torch.equal(processor.kv.v, other.unet.attn_processors[key].kv.v)
    image = generate(from_image, draw_kps(photo, result.kps))
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(image).all()


def test_a_view_of_a_view_carries_only_the_new_identity(pipe, tiny_adapter):
    first = apply_instantid(pipe, tiny_adapter, face(24))
    second = apply_instantid(first, tiny_adapter, face(25))
    direct = apply_instantid(pipe, tiny_adapter, face(25))
    assert second.controlnet.__wrapped__.base.base is pipe.controlnet
    assert torch.equal(second.controlnet._self_tokens[0], direct.controlnet._self_tokens[0])
    for key, processor in direct.unet.attn_processors.items():
        if ".attn2." in key:
            assert torch.equal(second.unet.attn_processors[key].kv.k, processor.kv.k)
    assert first.unet.attn_processors[key] is not second.unet.attn_processors[key]


def test_a_pipeline_without_controlnet_and_without_guidance(pipe, tiny_adapter):
    """StableDiffusionXLPipeline (no ControlNet), guidance_scale=1: the batch holds conditional samples only."""
    from diffusers import StableDiffusionXLPipeline

    components = {k: v for k, v in pipe.components.items() if k != "controlnet"}
    plain = StableDiffusionXLPipeline(**components, add_watermarker=False)
    plain.set_progress_bar_config(disable=True)
    settings = {"num_inference_steps": 2, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "output_type": "np"}

    def generate_plain(pipeline, guidance):
        generator = torch.Generator().manual_seed(0)
        return pipeline(PROMPT, guidance_scale=guidance, generator=generator, **settings).images

    view = apply_instantid(plain, tiny_adapter, face(26), weight=1.0)
    assert getattr(view, "controlnet", None) is None
    image = generate_plain(view, 1.0)
    with instantid_hooks(plain, tiny_adapter, face(26), weight=1.0):
        assert np.array_equal(generate_plain(plain, 1.0), image)
    assert not np.array_equal(generate_plain(plain, 1.0), image)


def test_hooks_on_a_pipeline_restore_it_after_an_exception(pipe, tiny_adapter):
    controlnet, config, unet_before = pipe.controlnet, pipe.config, snapshot(pipe.unet)
    with (
        pytest.raises(RuntimeError, match="interrupted"),
        instantid_hooks(pipe, tiny_adapter, face(27), end=0.5),
    ):
        assert isinstance(pipe.controlnet, FaceTokensControlNet) and pipe.controlnet.__wrapped__ is controlnet
        raise RuntimeError("interrupted")
    assert pipe.controlnet is controlnet and pipe.config is config
    assert_unchanged(pipe.unet, unet_before)
