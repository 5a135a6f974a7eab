"""The seven ComfyUI nodes, interface-compatible with ComfyUI_InstantID.

Class names, display names, input names, types, defaults, ranges and order, outputs, ``FUNCTION``
and ``CATEGORY`` are those of the original pack, so saved workflows load and run unchanged. What
differs inside: the attention patches hold precomputed K/V per layer, not the InstantID model,
and stay cheap under ComfyUI's deep copies (see ``instantid.comfy.patch``); the layer layout is
read from the model (SD1.5 and SDXL); identity attention is applied to all cross-attention layers,
the middle block's included (ComfyUI_InstantID's ApplyInstantID keys those ``("middle", 1, i)``,
which ComfyUI never calls).

Importing this module registers the ``instantid`` models folder with ComfyUI's ``folder_paths``
(``models/instantid``, keeping paths already configured for it, e.g. by extra_model_paths.yaml),
and installs ``cow_model.comfy``'s copy-on-write ``ModelPatcher.clone`` for every node when the
environment variable ``COW_MODEL_COMFY_CLONE`` asks for it (off by default), and installs the
InstantID cache telemetry (``instantid.comfy.telemetry``: the ``/instantid/cache`` routes, one log line
per run, the caches cleared when ComfyUI unloads all models).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import folder_paths
import torch
from torch import Tensor

from cow_model.comfy import install_from_env
from instantid.cache import caches
from instantid.comfy.apply import apply_identity
from instantid.comfy.blocks import context_dim, diffusion_model_of
from instantid.comfy.conditioning import (
    Conditioning,
    apply_face_controlnet,
    check_controlnet_context,
    check_mask,
)
from instantid.comfy.errors import InstantIDNodeError
from instantid.comfy.faces import embeddings, keypoint_images
from instantid.comfy.other_packs import DISPLAY_NAMES
from instantid.comfy.telemetry import install as install_telemetry
from instantid.face import CombineMode, load_face_analysis
from instantid.weights import InstantIDWeights, load_instantid

logger = logging.getLogger(__name__)

CATEGORY = "InstantID"
MODELS_FOLDER = "instantid"
INSIGHTFACE_DIR = os.path.join(folder_paths.models_dir, "insightface")
PROVIDERS = ["CPU", "CUDA", "ROCM", "CoreML"]
COMBINE_EMBEDS = ["average", "norm average", "concat"]


def register_models_folder() -> None:
    """Register ``models/instantid`` as ComfyUI's ``instantid`` folder (paths already set are kept)."""
    paths = folder_paths.folder_names_and_paths.get(MODELS_FOLDER, ([], set()))[0]
    if not paths:
        paths = [os.path.join(folder_paths.models_dir, MODELS_FOLDER)]
    folder_paths.folder_names_and_paths[MODELS_FOLDER] = (paths, folder_paths.supported_pt_extensions)


register_models_folder()
install_from_env()
install_telemetry()


def _float(default: float, low: float, high: float, step: float) -> tuple[str, dict[str, float]]:
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step})


START_AT = _float(0.0, 0.0, 1.0, 0.001)
END_AT = _float(1.0, 0.0, 1.0, 0.001)
NOISE = _float(0.0, 0.0, 1.0, 0.1)

_FACE_ANALYSIS_TIP = "The insightface antelopev2 face analysis, from InstantID Face Analysis."
TOOLTIPS: dict[str, str] = {
    "instantid_file": "The InstantID adapter in models/instantid: ip-adapter.bin or a .safetensors conversion, "
    "for SDXL or SD1.5 (the same base model as the checkpoint and the IdentityNet ControlNet).",
    "provider": "Where the face analysis runs. CPU works everywhere and is fast enough for a few images; "
    "CUDA / ROCM / CoreML need an onnxruntime built with them, otherwise the CPU is used and a warning says "
    "how to install it.",
    "instantid": "The InstantID adapter, from Load InstantID Model.",
    "insightface": _FACE_ANALYSIS_TIP,
    "faceanalysis": _FACE_ANALYSIS_TIP,
    "control_net": "The IdentityNet ControlNet (Load ControlNet Model), for the same base model as the adapter "
    "and the checkpoint: SDXL (2048-d) or SD1.5 (768-d).",
    "image": "Reference photo(s) of the face. The largest face of each image is used; images without a face "
    "are skipped, and several faces are combined into one identity.",
    "image_kps": "Optional: an image whose face sets the pose (5 keypoints) the IdentityNet follows. "
    "Not connected: the first reference image.",
    "model": "The model to add the identity to (it is cloned; the input model is not changed).",
    "positive": "The positive conditioning; it gets the IdentityNet ControlNet.",
    "negative": "The negative conditioning; it gets the IdentityNet ControlNet with the negative face tokens.",
    "weight": "Strength of the identity: the identity attention weight and the ControlNet strength.",
    "ip_weight": "Weight of the identity attention (the face likeness through the adapter).",
    "cn_strength": "Strength of the IdentityNet ControlNet (face pose and structure).",
    "start_at": "Sampling progress (0: first step, 1: last) at which the identity starts to apply.",
    "end_at": "Sampling progress (0: first step, 1: last) after which the identity stops applying.",
    "noise": "Noise used as the negative face embedding instead of zeros (0: none); a little can make the "
    "result less rigid.",
    "combine_embeds": "How several reference images are combined: average, norm average (each feature "
    "normalised across the images first), or concat (each image keeps its own face tokens).",
    "mask": "Optional: where in the image the identity applies (white: applies); any size, resized as needed.",
    "face_embeds": "The face tokens, from the FACE_EMBEDS output of InstantID Patch Attention.",
    "strength": "Strength of the IdentityNet ControlNet (face pose and structure).",
}
"""The tooltip of each node input, by input name (nodes override a few in their ``INPUT_TYPES``)."""


def with_tooltips(
    required: dict[str, tuple[Any, ...]],
    optional: dict[str, tuple[Any, ...]] | None = None,
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``INPUT_TYPES`` with a ``tooltip`` option on every input (``TOOLTIPS``, then ``overrides``).

    Input names, order, types and every other option are kept exactly as given: saved workflows map
    their widget values onto the inputs by position.
    """
    tips = TOOLTIPS | (overrides or {})

    def tip(name: str, spec: tuple[Any, ...]) -> tuple[Any, ...]:
        options = spec[1] if len(spec) > 1 else {}
        return (spec[0], {**options, "tooltip": tips[name]}, *spec[2:])

    sections = {"required": required, "optional": optional or {}}
    return {section: {n: tip(n, s) for n, s in specs.items()} for section, specs in sections.items() if specs}


class InstantIDModelLoader:
    """Load an InstantID adapter (``ip-adapter.bin`` or ``.safetensors``) from ``models/instantid``."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return with_tooltips({"instantid_file": (folder_paths.get_filename_list(MODELS_FOLDER),)})

    DESCRIPTION = (
        "Loads an InstantID adapter (ip-adapter.bin or a .safetensors conversion) from models/instantid and "
        "checks it: SDXL or SD1.5, every tensor's shape. A file of another kind (an IP-Adapter, a ControlNet) "
        "is refused with a message saying what it is."
    )
    RETURN_TYPES = ("INSTANTID",)
    FUNCTION = "load_model"
    CATEGORY = CATEGORY

    def load_model(self, instantid_file: str) -> tuple[InstantIDWeights]:
        path = folder_paths.get_full_path(MODELS_FOLDER, instantid_file)
        if path is None:
            raise InstantIDNodeError(
                f"InstantID model {instantid_file!r} not found in the instantid model folders "
                f"({', '.join(folder_paths.get_folder_paths(MODELS_FOLDER))})"
            )
        return (load_instantid(path),)


class InstantIDFaceAnalysis:
    """Load insightface's antelopev2 models from ``models/insightface/models/antelopev2``."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return with_tooltips({"provider": (PROVIDERS,)})

    DESCRIPTION = (
        "Loads insightface's antelopev2 face detector and recognizer from "
        "models/insightface/models/antelopev2 (nothing is downloaded). A provider this onnxruntime lacks "
        "falls back to the CPU with a warning."
    )
    RETURN_TYPES = ("FACEANALYSIS",)
    FUNCTION = "load_insight_face"
    CATEGORY = CATEGORY

    def load_insight_face(self, provider: str) -> tuple[Any]:
        return (load_face_analysis(INSIGHTFACE_DIR, provider),)


class FaceKeypointsPreprocessor:
    """Draw the 5-point keypoint image of the largest face of each image (black where none is found)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return with_tooltips(
            {"faceanalysis": ("FACEANALYSIS",), "image": ("IMAGE",)},
            overrides={"image": "Image(s) to draw the face keypoints of (the largest face of each)."},
        )

    DESCRIPTION = (
        "Draws the 5 face keypoints (eyes, nose, mouth corners) of the largest face of each image, the "
        "condition image the IdentityNet ControlNet takes (for ApplyInstantID's image_kps or InstantID Apply "
        "ControlNet). Images without a face are skipped; none at all gives a black image."
    )
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "preprocess_image"
    CATEGORY = CATEGORY

    def preprocess_image(self, faceanalysis: Any, image: Tensor) -> tuple[Tensor]:
        drawn = keypoint_images(faceanalysis, image, source="image")
        return (torch.zeros_like(image) if drawn is None else drawn,)


def _identity_tokens(
    weights: InstantIDWeights,
    insightface: Any,
    image: Tensor,
    noise: float,
    combine: CombineMode,
    device: Any,
) -> tuple[Tensor, Tensor]:
    """Conditional and unconditional face tokens ``[n, 16, C]`` for the faces in ``image`` (cached: the same
    tensors for the same adapter, embeddings, noise and device)."""
    embeds = embeddings(insightface, image, combine, "image")
    return caches().face_tokens(weights, embeds, noise=noise, device=device)


def _patched_model(
    model: Any,
    weights: InstantIDWeights,
    cond: Tensor,
    uncond: Tensor,
    *,
    weight: float,
    start_at: float,
    end_at: float,
    mask: Tensor | None,
) -> Any:
    """``apply_identity`` through the ``models`` cache layer: a fresh clone of the patched model kept for
    this model and these inputs (a changed weight, window or mask reuses the kept K/V)."""

    def build() -> Any:
        return apply_identity(
            model, weights, cond, uncond, weight=weight, start_at=start_at, end_at=end_at, mask=mask
        )

    return caches().patched_model(model, (weights, cond, uncond, weight, start_at, end_at, mask), build)


def _controlnet_tokens(tokens: Tensor) -> Tensor:
    """Face tokens as the ControlNet's cross-attention context: several identity sets side by side."""
    return tokens.reshape(1, -1, tokens.shape[-1])


def _keypoints(insightface: Any, image: Tensor, image_kps: Tensor | None) -> Tensor:
    """The IdentityNet's condition image, as ComfyUI_InstantID makes it: the keypoints of ``image_kps``'s
    faces, or of the first reference image when ``image_kps`` is not connected. Without a face (logged):
    ``image_kps`` itself (it may be a keypoint image drawn beforehand), else a black image."""
    if image_kps is None:
        keypoints = keypoint_images(insightface, image[:1], source="image")
        if keypoints is None:
            logger.warning(
                "No face detected in input `image` for the keypoints: the ControlNet gets a black image"
            )
            return torch.zeros_like(image[:1])
        return keypoints
    keypoints = keypoint_images(insightface, image_kps, source="image_kps")
    if keypoints is None:
        logger.warning("No face detected in input `image_kps`: it goes to the ControlNet unchanged")
        return image_kps
    return keypoints


class ApplyInstantID:
    """Identity attention on the model and the IdentityNet ControlNet on the conditioning, for one face."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return with_tooltips(
            {
                "instantid": ("INSTANTID",),
                "insightface": ("FACEANALYSIS",),
                "control_net": ("CONTROL_NET",),
                "image": ("IMAGE",),
                "model": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "weight": _float(0.8, 0.0, 5.0, 0.01),
                "start_at": START_AT,
                "end_at": END_AT,
            },
            {"image_kps": ("IMAGE",), "mask": ("MASK",)},
        )

    DESCRIPTION = (
        "Applies one face identity: identity attention on a clone of the model (every cross-attention layer) "
        "and the IdentityNet ControlNet, driven by the face keypoints, on the conditioning. The adapter, the "
        "ControlNet and the model must be for the same base model (SDXL or SD1.5)."
    )
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("MODEL", "positive", "negative")
    FUNCTION = "apply_instantid"
    CATEGORY = CATEGORY

    def apply_instantid(
        self,
        instantid: InstantIDWeights,
        insightface: Any,
        control_net: Any,
        image: Tensor,
        model: Any,
        positive: Conditioning,
        negative: Conditioning,
        start_at: float,
        end_at: float,
        weight: float = 0.8,
        ip_weight: float | None = None,
        cn_strength: float | None = None,
        noise: float = 0.35,
        image_kps: Tensor | None = None,
        mask: Tensor | None = None,
        combine_embeds: CombineMode = "average",
    ) -> tuple[Any, Conditioning, Conditioning]:
        """``weight`` sets both the identity weight and the ControlNet strength unless ``ip_weight`` /
        ``cn_strength`` are given (the Advanced node). Without ``image_kps`` the keypoints come from the
        first reference image. Before any face analysis, raises ``InstantIDNodeError`` when the ControlNet
        is for another base model than the adapter or the model. Raises ``NoFaceDetectedError`` naming the
        input when no reference image holds a face."""
        mask = check_mask(mask)
        model_dim = context_dim(diffusion_model_of(model))
        check_controlnet_context(control_net, instantid.cross_attention_dim, model_dim=model_dim)
        with caches().one_run():  # one detection per image for the embedding and the keypoints
            cond, uncond = _identity_tokens(
                instantid, insightface, image, noise, combine_embeds, model.load_device
            )
            keypoints = _keypoints(insightface, image, image_kps)
        work_model = _patched_model(
            model,
            instantid,
            cond,
            uncond,
            weight=weight if ip_weight is None else ip_weight,
            start_at=start_at,
            end_at=end_at,
            mask=mask,
        )
        new_positive, new_negative = apply_face_controlnet(
            positive,
            negative,
            control_net,
            keypoints,
            weight if cn_strength is None else cn_strength,
            start_at,
            end_at,
            _controlnet_tokens(cond),
            _controlnet_tokens(uncond),
            mask,
        )
        return (work_model, new_positive, new_negative)


class ApplyInstantIDAdvanced(ApplyInstantID):
    """ApplyInstantID with separate identity weight and ControlNet strength, noise and embedding combination."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return with_tooltips(
            {
                "instantid": ("INSTANTID",),
                "insightface": ("FACEANALYSIS",),
                "control_net": ("CONTROL_NET",),
                "image": ("IMAGE",),
                "model": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "ip_weight": _float(0.8, 0.0, 3.0, 0.01),
                "cn_strength": _float(0.8, 0.0, 10.0, 0.01),
                "start_at": START_AT,
                "end_at": END_AT,
                "noise": NOISE,
                "combine_embeds": (COMBINE_EMBEDS, {"default": "average"}),
            },
            {"image_kps": ("IMAGE",), "mask": ("MASK",)},
        )

    DESCRIPTION = (
        "Apply InstantID with separate weights for the identity attention (ip_weight) and the IdentityNet "
        "ControlNet (cn_strength), noise for the negative face embedding, and a choice of how several "
        "reference images are combined."
    )


class InstantIDAttentionPatch:
    """Identity attention only (no ControlNet); also outputs the face tokens for ApplyInstantIDControlNet."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return with_tooltips(
            {
                "instantid": ("INSTANTID",),
                "insightface": ("FACEANALYSIS",),
                "image": ("IMAGE",),
                "model": ("MODEL",),
                "weight": _float(1.0, -1.0, 3.0, 0.01),
                "start_at": START_AT,
                "end_at": END_AT,
                "noise": NOISE,
            },
            {"mask": ("MASK",)},
            overrides={"weight": "Weight of the identity attention (0: the model is returned unchanged)."},
        )

    DESCRIPTION = (
        "Identity attention only, without the ControlNet: patches a clone of the model and outputs the face "
        "tokens (FACE_EMBEDS) for InstantID Apply ControlNet, so the two halves can be placed separately."
    )
    RETURN_TYPES = ("MODEL", "FACE_EMBEDS")
    FUNCTION = "patch_attention"
    CATEGORY = CATEGORY

    def patch_attention(
        self,
        instantid: InstantIDWeights,
        insightface: Any,
        image: Tensor,
        model: Any,
        weight: float,
        start_at: float,
        end_at: float,
        noise: float = 0.0,
        mask: Tensor | None = None,
    ) -> tuple[Any, dict[str, Tensor]]:
        """With ``weight`` 0 the model is returned unpatched (the face tokens are still output)."""
        mask = check_mask(mask)
        cond, uncond = _identity_tokens(instantid, insightface, image, noise, "average", model.load_device)
        face_embeds = {"cond": cond, "uncond": uncond}
        if weight == 0:
            return (model, face_embeds)
        work_model = _patched_model(
            model, instantid, cond, uncond, weight=weight, start_at=start_at, end_at=end_at, mask=mask
        )
        return (work_model, face_embeds)


class ApplyInstantIDControlNet:
    """The IdentityNet ControlNet on the conditioning, with the face tokens of InstantIDAttentionPatch."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return with_tooltips(
            {
                "face_embeds": ("FACE_EMBEDS",),
                "control_net": ("CONTROL_NET",),
                "image_kps": ("IMAGE",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "strength": _float(1.0, 0.0, 10.0, 0.01),
                "start_at": START_AT,
                "end_at": END_AT,
            },
            {"mask": ("MASK",)},
            overrides={
                "image_kps": "The keypoint image the IdentityNet follows (Face Keypoints Preprocessor's output)."
            },
        )

    DESCRIPTION = (
        "The IdentityNet ControlNet half of InstantID: applies it to the conditioning with the face tokens "
        "of InstantID Patch Attention and the keypoint image. The ControlNet must be for the same base model "
        "as the face tokens (SDXL or SD1.5)."
    )
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply_controlnet"
    CATEGORY = CATEGORY

    def apply_controlnet(
        self,
        face_embeds: dict[str, Tensor],
        control_net: Any,
        image_kps: Tensor,
        positive: Conditioning,
        negative: Conditioning,
        strength: float,
        start_at: float,
        end_at: float,
        mask: Tensor | None = None,
    ) -> tuple[Conditioning, Conditioning]:
        """With ``strength`` 0 the conditioning is returned unchanged. Raises ``InstantIDNodeError`` for
        ``face_embeds`` that are not InstantIDAttentionPatch's, and when the ControlNet reads a context of
        another width than the face tokens (another base model)."""
        if strength == 0:
            return (positive, negative)
        missing = [key for key in ("cond", "uncond") if key not in face_embeds]
        if missing:
            raise InstantIDNodeError(
                f"face_embeds lacks {missing}: expected the FACE_EMBEDS output of InstantIDAttentionPatch"
            )
        face_dim = int(face_embeds["cond"].shape[-1])
        check_controlnet_context(control_net, face_dim, face_source="`face_embeds` holds")
        return apply_face_controlnet(
            positive,
            negative,
            control_net,
            image_kps,
            strength,
            start_at,
            end_at,
            _controlnet_tokens(face_embeds["cond"]),
            _controlnet_tokens(face_embeds["uncond"]),
            check_mask(mask),
        )


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "InstantIDModelLoader": InstantIDModelLoader,
    "InstantIDFaceAnalysis": InstantIDFaceAnalysis,
    "ApplyInstantID": ApplyInstantID,
    "ApplyInstantIDAdvanced": ApplyInstantIDAdvanced,
    "FaceKeypointsPreprocessor": FaceKeypointsPreprocessor,
    "InstantIDAttentionPatch": InstantIDAttentionPatch,
    "ApplyInstantIDControlNet": ApplyInstantIDControlNet,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = dict(DISPLAY_NAMES)
