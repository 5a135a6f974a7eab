"""The IdentityNet ControlNet on ComfyUI conditioning, as ComfyUI_InstantID sets it up.

Each conditioning entry ``[tensor, dict]`` gets a copy of its dict with ``control`` set to a copy
of the ControlNet holding the keypoint image (chained to the entry's previous ControlNet, one
copy per distinct previous one), ``control_apply_to_uncond`` False and ``cross_attn_controlnet``
set to the face tokens: the conditional tokens on the positive side, the unconditional ones on
the negative side, which is what the IdentityNet takes as its text context. A mask goes on the
positive entries only (``mask``, ``set_area_to_bounds`` False). The input lists and dicts are
never changed; tensors are shared.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from instantid.comfy.errors import InstantIDNodeError

Conditioning = list[list[Any]]


def check_mask(mask: Tensor | None) -> Tensor | None:
    """``mask`` unchanged when it is ``[H, W]`` or ``[B, H, W]`` (of any size: it is resized where used).

    Raises ``InstantIDNodeError`` for any other rank.
    """
    if mask is not None and mask.dim() not in (2, 3):
        raise InstantIDNodeError(f"mask has shape {tuple(mask.shape)}; expected a MASK of shape [H, W] or [B, H, W]")
    return mask


def conditioning_mask(mask: Tensor | None) -> Tensor | None:
    """A MASK as ComfyUI conditioning takes it: ``[B, H, W]`` (a ``[H, W]`` mask gets a batch of 1)."""
    mask = check_mask(mask)
    return mask.unsqueeze(0) if mask is not None and mask.dim() == 2 else mask


def apply_face_controlnet(
    positive: Conditioning,
    negative: Conditioning,
    control_net: Any,
    keypoints: Tensor,
    strength: float,
    start_at: float,
    end_at: float,
    face_tokens: Tensor,
    uncond_face_tokens: Tensor,
    mask: Tensor | None,
) -> tuple[Conditioning, Conditioning]:
    """New positive and negative conditioning with the face ControlNet applied (see the module doc).

    ``keypoints`` is an IMAGE ``[B, H, W, 3]``; the face tokens ``[B, 16, C]`` are moved to
    ComfyUI's intermediate device in the dtype of the ControlNet's hint.
    """
    import comfy.model_management

    hint = keypoints.movedim(-1, 1)
    mask = conditioning_mask(mask)
    device = comfy.model_management.intermediate_device()
    controlnets: dict[Any, Any] = {}
    out: list[Conditioning] = []
    for conditioning, tokens, is_positive in ((positive, face_tokens, True), (negative, uncond_face_tokens, False)):
        entries = []
        for embedding, options in conditioning:
            options = options.copy()
            previous = options.get("control", None)
            if previous not in controlnets:
                controlnet = control_net.copy().set_cond_hint(hint, strength, (start_at, end_at))
                controlnet.set_previous_controlnet(previous)
                controlnets[previous] = controlnet
            controlnet = controlnets[previous]
            options["control"] = controlnet
            options["control_apply_to_uncond"] = False
            options["cross_attn_controlnet"] = tokens.to(device, dtype=controlnet.cond_hint_original.dtype)
            if mask is not None and is_positive:
                options["mask"] = mask
                options["set_area_to_bounds"] = False
            entries.append([embedding, options])
        out.append(entries)
    return out[0], out[1]
