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
environment variable ``COW_MODEL_COMFY_CLONE`` asks for it (off by default).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import folder_paths
import torch
from torch import Tensor

from cow_model.comfy import install_from_env
from instantid.attention import face_tokens
from instantid.comfy.apply import apply_identity
from instantid.comfy.conditioning import Conditioning, apply_face_controlnet, check_mask
from instantid.comfy.errors import InstantIDNodeError
from instantid.comfy.faces import embeddings, keypoint_images
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


def _float(default: float, low: float, high: float, step: float) -> tuple[str, dict[str, float]]:
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step})


START_AT = _float(0.0, 0.0, 1.0, 0.001)
END_AT = _float(1.0, 0.0, 1.0, 0.001)
NOISE = _float(0.0, 0.0, 1.0, 0.1)


class InstantIDModelLoader:
    """Load an InstantID adapter (``ip-adapter.bin`` or ``.safetensors``) from ``models/instantid``."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"instantid_file": (folder_paths.get_filename_list(MODELS_FOLDER),)}}

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
        return {"required": {"provider": (PROVIDERS,)}}

    RETURN_TYPES = ("FACEANALYSIS",)
    FUNCTION = "load_insight_face"
    CATEGORY = CATEGORY

    def load_insight_face(self, provider: str) -> tuple[Any]:
        return (load_face_analysis(INSIGHTFACE_DIR, provider),)


class FaceKeypointsPreprocessor:
    """Draw the 5-point keypoint image of the largest face of each image (black where none is found)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"faceanalysis": ("FACEANALYSIS",), "image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "preprocess_image"
    CATEGORY = CATEGORY

    def preprocess_image(self, faceanalysis: Any, image: Tensor) -> tuple[Tensor]:
        drawn = keypoint_images(faceanalysis, image)
        return (torch.zeros_like(image) if drawn is None else drawn,)


def _identity_tokens(
    weights: InstantIDWeights, insightface: Any, image: Tensor, noise: float, combine: CombineMode, device: Any
) -> tuple[Tensor, Tensor]:
    """Conditional and unconditional face tokens ``[n, 16, C]`` for the faces in ``image``."""
    return face_tokens(weights, embeddings(insightface, image, combine), noise=noise, device=device)


def _controlnet_tokens(tokens: Tensor) -> Tensor:
    """Face tokens as the ControlNet's cross-attention context: several identity sets side by side."""
    return tokens.reshape(1, -1, tokens.shape[-1])


class ApplyInstantID:
    """Identity attention on the model and the IdentityNet ControlNet on the conditioning, for one face."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
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
            "optional": {"image_kps": ("IMAGE",), "mask": ("MASK",)},
        }

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
        first reference image. Raises ``NoFaceDetectedError`` when no reference image holds a face."""
        mask = check_mask(mask)
        cond, uncond = _identity_tokens(instantid, insightface, image, noise, combine_embeds, model.load_device)
        keypoints = keypoint_images(insightface, image_kps if image_kps is not None else image[:1])
        if keypoints is None:
            logger.warning("No face detected in the keypoints image: the ControlNet gets a black image")
            keypoints = torch.zeros_like(image[:1]) if image_kps is None else image_kps
        work_model = apply_identity(
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
        return {
            "required": {
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
            "optional": {"image_kps": ("IMAGE",), "mask": ("MASK",)},
        }


class InstantIDAttentionPatch:
    """Identity attention only (no ControlNet); also outputs the face tokens for ApplyInstantIDControlNet."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "instantid": ("INSTANTID",),
                "insightface": ("FACEANALYSIS",),
                "image": ("IMAGE",),
                "model": ("MODEL",),
                "weight": _float(1.0, -1.0, 3.0, 0.01),
                "start_at": START_AT,
                "end_at": END_AT,
                "noise": NOISE,
            },
            "optional": {"mask": ("MASK",)},
        }

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
        work_model = apply_identity(
            model, instantid, cond, uncond, weight=weight, start_at=start_at, end_at=end_at, mask=mask
        )
        return (work_model, face_embeds)


class ApplyInstantIDControlNet:
    """The IdentityNet ControlNet on the conditioning, with the face tokens of InstantIDAttentionPatch."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "face_embeds": ("FACE_EMBEDS",),
                "control_net": ("CONTROL_NET",),
                "image_kps": ("IMAGE",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "strength": _float(1.0, 0.0, 10.0, 0.01),
                "start_at": START_AT,
                "end_at": END_AT,
            },
            "optional": {"mask": ("MASK",)},
        }

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
        """With ``strength`` 0 the conditioning is returned unchanged."""
        if strength == 0:
            return (positive, negative)
        missing = [key for key in ("cond", "uncond") if key not in face_embeds]
        if missing:
            raise InstantIDNodeError(
                f"face_embeds lacks {missing}: expected the FACE_EMBEDS output of InstantIDAttentionPatch"
            )
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

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "InstantIDModelLoader": "Load InstantID Model",
    "InstantIDFaceAnalysis": "InstantID Face Analysis",
    "ApplyInstantID": "Apply InstantID",
    "ApplyInstantIDAdvanced": "Apply InstantID Advanced",
    "FaceKeypointsPreprocessor": "Face Keypoints Preprocessor",
    "InstantIDAttentionPatch": "InstantID Patch Attention",
    "ApplyInstantIDControlNet": "InstantID Apply ControlNet",
}
