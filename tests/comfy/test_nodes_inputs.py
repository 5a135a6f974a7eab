"""Each node on real inputs, and bad input with clear errors.

Covers: the loader on both published file formats and on a checkpoint of another kind; the face
analysis node and another pack's FaceAnalysis object; no face; masks of another size (resized)
and of a wrong rank; a model without cross-attention; the keypoint preprocessor; the attention
patch + ControlNet pair of nodes; combining several reference faces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from insightface.app import FaceAnalysis
from safetensors.torch import save_file

from instantid.comfy.blocks import NoCrossAttentionError
from instantid.comfy.errors import InstantIDNodeError
from instantid.comfy.patch import attn2_patches
from instantid.face import FaceModelsMissingError, NoFaceDetectedError
from instantid.testing import comfyui
from instantid.testing.adapter_files import write_random_adapter
from instantid.testing.face_models import build_antelopev2_like
from instantid.weights import AdapterFormatError, InstantIDWeights
from tests.comfy.instantid_helpers import (
    face_image,
    faceless_image,
    no_cross_attention_patcher,
    pack_nodes,
    shared_adapter,
    shared_patcher,
    small_face_analysis,
)


@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_antelopev2_like(tmp_path_factory.mktemp("insightface"))


@pytest.fixture(scope="module")
def face_app(insightface_root: Path) -> Any:
    return small_face_analysis(insightface_root)


@pytest.fixture(scope="module")
def models_folder(comfy: comfyui.ComfyUI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("instantid_models")
    comfy.folder_paths.add_model_folder_path("instantid", str(folder))
    return folder


def _apply(comfy: comfyui.ComfyUI, face_app: Any, control_net: Any, **overrides: Any) -> tuple[Any, Any, Any]:
    inputs = {
        "instantid": shared_adapter(comfy, "sd15"),
        "insightface": face_app,
        "control_net": control_net,
        "image": face_image(40, 60),
        "model": shared_patcher(comfy, "sd15"),
        "positive": comfyui.conditioning("sd15", 1),
        "negative": comfyui.conditioning("sd15", 2),
        "weight": 0.8,
        "start_at": 0.0,
        "end_at": 1.0,
    } | overrides
    node = inputs.pop("node", pack_nodes(comfy).ApplyInstantID)
    return comfyui.run_node(node, **inputs)  # type: ignore[return-value]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loader_reads_both_published_formats(comfy: comfyui.ComfyUI, models_folder: Path, fmt: str) -> None:
    name = f"instantid_sd15.{fmt}"
    write_random_adapter(models_folder / name, "sd15", fmt, torch.float16, seed=3, resampler="small")  # type: ignore[arg-type]
    loader = pack_nodes(comfy).InstantIDModelLoader
    assert name in loader.INPUT_TYPES()["required"]["instantid_file"][0]
    (weights,) = comfyui.run_node(loader, instantid_file=name)
    assert isinstance(weights, InstantIDWeights)
    assert (weights.arch, weights.num_layers, weights.cross_attention_dim) == ("sd15", 16, 768)


def test_loader_refuses_a_controlnet_checkpoint(
    comfy: comfyui.ComfyUI, models_folder: Path, tiny_controlnet: Callable[..., Any]
) -> None:
    state = tiny_controlnet("sd15").control_model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(models_folder / "controlnet.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"ControlNet checkpoint.*expected an InstantID adapter"):
        comfyui.run_node(pack_nodes(comfy).InstantIDModelLoader, instantid_file="controlnet.safetensors")


def test_loader_names_the_folders_for_a_missing_file(comfy: comfyui.ComfyUI, models_folder: Path) -> None:
    with pytest.raises(InstantIDNodeError, match=r"'gone\.bin' not found in the instantid model folders"):
        comfyui.run_node(pack_nodes(comfy).InstantIDModelLoader, instantid_file="gone.bin")


def test_face_analysis_node_loads_from_models_insightface(
    comfy: comfyui.ComfyUI, insightface_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nodes = pack_nodes(comfy)
    monkeypatch.setattr(nodes, "INSIGHTFACE_DIR", str(insightface_root))
    (app,) = comfyui.run_node(nodes.InstantIDFaceAnalysis, provider="CPU")
    assert isinstance(app, FaceAnalysis)
    monkeypatch.setattr(nodes, "INSIGHTFACE_DIR", str(tmp_path))
    with pytest.raises(FaceModelsMissingError, match=r"models/antelopev2.*scrfd_10g_bnkps\.onnx"):
        comfyui.run_node(nodes.InstantIDFaceAnalysis, provider="CPU")


def test_another_packs_face_analysis_object_works(
    comfy: comfyui.ComfyUI, insightface_root: Path, tiny_controlnet: Callable[..., Any]
) -> None:
    """A FaceAnalysis made the way ComfyUI_InstantID's own loader makes it (antelopev2 under root, prepared at 640)."""
    foreign = FaceAnalysis(name="antelopev2", root=str(insightface_root), providers=["CPUExecutionProvider"])
    foreign.prepare(ctx_id=0, det_size=(640, 640))
    model, positive, _ = _apply(comfy, foreign, tiny_controlnet("sd15"))
    assert len(attn2_patches(model.model_options)) == 16
    assert positive[0][1]["cross_attn_controlnet"].shape == (1, 16, 768)


def test_no_face_in_the_reference_image(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any]
) -> None:
    with pytest.raises(NoFaceDetectedError, match=r"^No face detected"):
        _apply(comfy, face_app, tiny_controlnet("sd15"), image=faceless_image())


def test_a_mask_of_another_size_is_accepted_and_passed_on(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any]
) -> None:
    mask = torch.zeros(37, 53)
    mask[:, :20] = 1.0
    model, positive, negative = _apply(comfy, face_app, tiny_controlnet("sd15"), mask=mask)
    assert positive[0][1]["mask"].shape == (1, 37, 53) and "mask" not in negative[0][1]
    assert positive[0][1]["set_area_to_bounds"] is False
    patch = next(iter(attn2_patches(model.model_options).values()))
    assert torch.equal(patch.identities[0].mask.mask.cpu(), mask)
    latent = comfyui.ksample(comfy, model, positive, negative, comfyui.empty_latent(comfy, 8), steps=1)
    assert torch.isfinite(latent).all()


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (32,), (1, 64, 0)])
def test_a_mask_of_a_wrong_rank_or_without_pixels_is_refused(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any], shape: tuple[int, ...]
) -> None:
    with pytest.raises(
        InstantIDNodeError,
        match=r"`mask` has shape .*expected a non-empty MASK of shape \[H, W\] or \[B, H, W\]",
    ):
        _apply(comfy, face_app, tiny_controlnet("sd15"), mask=torch.ones(shape))


def test_a_model_without_cross_attention_is_refused(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any]
) -> None:
    with pytest.raises(NoCrossAttentionError, match="no cross-attention layers"):
        _apply(comfy, face_app, tiny_controlnet("sd15"), model=no_cross_attention_patcher(comfy))


def test_keypoints_preprocessor(comfy: comfyui.ComfyUI, face_app: Any) -> None:
    node = pack_nodes(comfy).FaceKeypointsPreprocessor
    image = torch.cat([face_image(40, 60), faceless_image()])
    (drawn,) = comfyui.run_node(node, faceanalysis=face_app, image=image)
    assert drawn.shape == (1, 320, 320, 3)  # the image without a face is skipped, as in the original
    assert drawn.amax() == 1.0 and (drawn.sum(-1) == 0).float().mean() > 0.9  # coloured points on black
    (none,) = comfyui.run_node(node, faceanalysis=face_app, image=faceless_image())
    assert torch.equal(none, torch.zeros_like(faceless_image()))


def test_attention_patch_and_controlnet_nodes(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any]
) -> None:
    nodes = pack_nodes(comfy)
    base = shared_patcher(comfy, "sd15")
    common = {
        "instantid": shared_adapter(comfy, "sd15"),
        "insightface": face_app,
        "image": face_image(40, 60),
    }
    unpatched, embeds = comfyui.run_node(
        nodes.InstantIDAttentionPatch, model=base, weight=0.0, start_at=0.0, end_at=1.0, noise=0.0, **common
    )
    assert unpatched is base and embeds["cond"].shape == (1, 16, 768)
    model, embeds = comfyui.run_node(
        nodes.InstantIDAttentionPatch, model=base, weight=0.5, start_at=0.0, end_at=1.0, noise=0.3, **common
    )
    assert len(attn2_patches(model.model_options)) == 16 and not torch.equal(embeds["uncond"], embeds["cond"])

    positive, negative = comfyui.conditioning("sd15", 1), comfyui.conditioning("sd15", 2)
    kps = face_image(40, 60)
    args = {
        "face_embeds": embeds,
        "control_net": tiny_controlnet("sd15"),
        "image_kps": kps,
        "start_at": 0.1,
        "end_at": 0.9,
    }
    same = comfyui.run_node(
        nodes.ApplyInstantIDControlNet, positive=positive, negative=negative, strength=0.0, **args
    )
    assert same == (positive, negative)
    new_positive, new_negative = comfyui.run_node(
        nodes.ApplyInstantIDControlNet, positive=positive, negative=negative, strength=0.7, **args
    )
    assert "control" not in positive[0][1], "the input conditioning was changed"
    control = new_positive[0][1]["control"]
    assert control is new_negative[0][1]["control"]
    assert (control.strength, control.timestep_percent_range) == (0.7, (0.1, 0.9))
    assert torch.equal(new_positive[0][1]["cross_attn_controlnet"], embeds["cond"])
    assert torch.equal(new_negative[0][1]["cross_attn_controlnet"], embeds["uncond"])
    assert new_positive[0][1]["control_apply_to_uncond"] is False


def test_advanced_node_combines_several_faces(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any]
) -> None:
    nodes = pack_nodes(comfy)
    images = torch.cat([face_image(40, 60), face_image(700, 300)])
    common = {
        "node": nodes.ApplyInstantIDAdvanced,
        "image": images,
        "ip_weight": 0.7,
        "cn_strength": 0.4,
        "noise": 0.0,
    }
    common.pop("weight", None)
    control_net = tiny_controlnet("sd15")
    model, positive, _ = _apply(comfy, face_app, control_net, combine_embeds="concat", **common)
    term = next(iter(attn2_patches(model.model_options).values())).identities[0]
    assert term.kv.num_sets == 2 and term.weight == 0.7
    assert positive[0][1]["cross_attn_controlnet"].shape == (1, 32, 768)
    assert positive[0][1]["control"].strength == 0.4
    model, positive, _ = _apply(comfy, face_app, control_net, combine_embeds="average", **common)
    assert next(iter(attn2_patches(model.model_options).values())).identities[0].kv.num_sets == 1
    assert positive[0][1]["cross_attn_controlnet"].shape == (1, 16, 768)
