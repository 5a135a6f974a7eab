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

import torch
from torch import Tensor

from instantid.comfy.blocks import context_dim
from instantid.comfy.errors import InstantIDNodeError
from instantid.layout import ARCH_NAMES, ARCHS, arch_for_context_dim, describe_context_dim

Conditioning = list[list[Any]]


def check_mask(mask: Tensor | None) -> Tensor | None:
    """``mask`` unchanged when it is ``[H, W]`` or ``[B, H, W]`` (of any size: it is resized where used).

    Raises ``InstantIDNodeError`` for any other rank, or for a mask with no pixels (a crop outside it).
    """
    if mask is not None and (mask.dim() not in (2, 3) or mask.numel() == 0):
        raise InstantIDNodeError(
            f"input `mask` has shape {tuple(mask.shape)}; expected a non-empty MASK of shape [H, W] or [B, H, W]"
        )
    return mask


def conditioning_mask(mask: Tensor | None) -> Tensor | None:
    """A MASK as ComfyUI conditioning takes it: ``[B, H, W]`` (a ``[H, W]`` mask gets a batch of 1)."""
    mask = check_mask(mask)
    return mask.unsqueeze(0) if mask is not None and mask.dim() == 2 else mask


def controlnet_context_dim(control_net: Any) -> int | None:
    """The width of the context (the face tokens, for IdentityNet) a ComfyUI CONTROL_NET's cross-attention
    reads: 768 for an SD1.5 ControlNet, 2048 for SDXL. ``None`` when it cannot be read: ControlNet kinds
    without a UNet-style ``control_model`` (T2I adapters, a ControlLoRA before sampling, other model
    families) are not checked."""
    control_model = getattr(control_net, "control_model", None)
    return context_dim(control_model) if isinstance(control_model, torch.nn.Module) else None


def _same_base_model_hint(controlnet_dim: int, face_dim: int) -> str:
    widths = ", ".join(f"{name} {ARCHS[arch]['cross_attention_dim']}" for arch, name in ARCH_NAMES.items())
    wanted = arch_for_context_dim(face_dim)
    fix = (
        f"; load the IdentityNet ControlNet made for {ARCH_NAMES[wanted]}"
        if controlnet_dim != face_dim and wanted
        else ""
    )
    return f"the ControlNet, the InstantID adapter and the model must all be for the same base model ({widths}){fix}"


def check_controlnet_context(
    control_net: Any, face_dim: int, *, face_source: str = "`instantid` makes", model_dim: int | None = None
) -> None:
    """Raise ``InstantIDNodeError`` before anything runs when ``control_net`` reads a context of another
    width than the ``face_dim``-wide face tokens it will be given (which ``face_source`` makes), or than the
    ``model_dim``-wide text tokens of the model (when known). The message names every width and its
    architecture. A ControlNet whose width cannot be read (see ``controlnet_context_dim``) passes."""
    controlnet_dim = controlnet_context_dim(control_net)
    if controlnet_dim is None or (controlnet_dim == face_dim and model_dim in (None, controlnet_dim)):
        return
    parts = [
        f"`control_net` reads {describe_context_dim(controlnet_dim)} context",
        f"{face_source} {describe_context_dim(face_dim)} face tokens",
    ]
    if model_dim is not None:
        parts.append(f"`model` reads {describe_context_dim(model_dim)} text tokens")
    raise InstantIDNodeError(
        f"the ControlNet does not fit: {', '.join(parts)}; {_same_base_model_hint(controlnet_dim, face_dim)}"
    )


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
    for conditioning, tokens, is_positive in (
        (positive, face_tokens, True),
        (negative, uncond_face_tokens, False),
    ):
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
