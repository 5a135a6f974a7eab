"""One identity for a diffusers UNet: face embedding -> tokens -> per-layer keys/values -> processors.

:func:`prepare_identity` does everything an identity costs once: it reads the face (an
embedding, insightface results, or images with a face analysis app), runs the adapter's
Resampler (:func:`instantid.attention.face_tokens`), projects the tokens through every
layer's ``to_k_ip``/``to_v_ip`` (:func:`instantid.attention.precompute_kv`) on the UNet's
device and dtype, and makes one :class:`IdentityAttnProcessor` per cross-attention layer. It
reads the UNet and the adapter and changes neither; the result holds no adapter weight. The face
analysis, the tokens and the K/V go through ``instantid.cache`` (kept per image pixels, embedding
contents, adapter, dtype and device), so applying the same face again costs only the processors.

Adapter layers are matched to the UNet's cross-attention modules in ``attn_processors`` order
(the order the InstantID checkpoint was saved in), and every layer's widths are checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor, nn

from cow_model.diffusers import attention_paths, cross_attention_keys
from instantid.cache import caches
from instantid.diffusers.processor import BatchLayout, IdentityAttnProcessor, TimestepGate
from instantid.face import CombineMode, FaceResult, analyze_faces, face_embeddings
from instantid.layout import ARCHS
from instantid.weight_schedules import layer_weights
from instantid.weights import FACE_EMBEDDING_DIM, InstantIDWeights

__all__ = [
    "DiffusersIdentity",
    "FaceInput",
    "check_adapter",
    "face_embedding",
    "payload_bytes",
    "prepare_identity",
    "unet_cross_attention",
]

FaceInput = Any
"""A face embedding (``[512]``, ``[B, 512]`` or ``[B, N, 512]`` float tensor or array), an
``instantid.face.FaceResult`` or a sequence of them, or images (a PIL image, an ``HxWx3``
``uint8`` RGB array, or a sequence of those) together with a face analysis app."""


@dataclass(frozen=True, eq=False)
class DiffusersIdentity:
    """What one identity holds: processors by ``attn_processors`` key, the gate, the face tokens.

    ``cond_tokens`` / ``uncond_tokens`` (float32 ``[n, 16, cross_attention_dim]``) are what an
    IdentityNet ControlNet receives instead of the text; ``gate`` is ``None`` when start/end
    cover the whole schedule.
    """

    processors: dict[str, IdentityAttnProcessor]
    gate: TimestepGate | None
    cond_tokens: Tensor
    uncond_tokens: Tensor

    @property
    def payload_bytes(self) -> int:
        """Bytes of the keys and values the processors hold (the identity's share of a clone)."""
        return payload_bytes(self.processors.values())


def payload_bytes(processors: Iterable[Any]) -> int:
    """Bytes of the distinct K/V storages held by the :class:`IdentityAttnProcessor` among ``processors``
    (others are skipped), e.g. ``payload_bytes(unet.attn_processors.values())``."""
    storages = {}
    for processor in processors:
        if isinstance(processor, IdentityAttnProcessor):
            for tensor in (processor.kv.k, processor.kv.v):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def check_adapter(adapter: Any) -> None:
    """Raise ``TypeError`` unless ``adapter`` is loaded ``InstantIDWeights`` (a path or ``None`` is named)."""
    if isinstance(adapter, InstantIDWeights):
        return
    if isinstance(adapter, (str, os.PathLike)):
        raise TypeError(
            f"adapter must be loaded InstantID weights, got the path {os.fspath(adapter)!r}: pass "
            "instantid.load_instantid(path) (an ip-adapter.bin or .safetensors file)"
        )
    raise TypeError(
        f"adapter must be InstantID weights from instantid.load_instantid(path), got {type(adapter).__name__}"
        + (" (None)" if adapter is None else "")
    )


def _is_image(item: Any) -> bool:
    if isinstance(item, np.ndarray):
        return item.dtype == np.uint8
    return type(item).__module__.startswith("PIL.")


def face_embedding(
    face: FaceInput, *, face_analysis: Any | None = None, combine: CombineMode = "average"
) -> Tensor:
    """The face embedding(s) for ``face`` as a float32 tensor (``[B, 512]`` or ``[B, N, 512]``).

    Images (one, a list, or an ``N x H x W x 3`` array) go through ``face_analysis`` (``instantid.face.load_face_analysis``'s app: the
    largest face of each image) and, like ``FaceResult`` lists, are combined by ``combine``
    (``instantid.face.face_embeddings``). Float arrays and tensors are embeddings; ``uint8``
    arrays are images. Raises ``ValueError`` for an embedding whose last dimension is not 512
    or an image without a face analysis app, ``TypeError`` for anything else.
    """
    items = list(face) if isinstance(face, (list, tuple)) else [face]
    if items and all(isinstance(item, FaceResult) for item in items):
        return face_embeddings(items, combine)
    if items and all(_is_image(item) for item in items):
        if face_analysis is None:
            raise ValueError(
                "got a face image but no face analysis: pass face_analysis=instantid.face.load_face_analysis(root), "
                "or a 512-d face embedding instead"
            )
        images = [item if isinstance(item, np.ndarray) else np.asarray(item.convert("RGB")) for item in items]
        batch = face if isinstance(face, np.ndarray) else images  # an array may hold a batch: N x H x W x 3
        return face_embeddings(analyze_faces(face_analysis, batch, analyze=caches().analyze_face), combine)
    if isinstance(face, (Tensor, np.ndarray)):
        _check_embedding_kind(face)
        embeds = torch.as_tensor(face).detach().to(dtype=torch.float32)
        if embeds.shape[-1:] != (FACE_EMBEDDING_DIM,) or embeds.ndim > 3:
            raise ValueError(
                f"a face embedding must be [{FACE_EMBEDDING_DIM}], [B, {FACE_EMBEDDING_DIM}] or "
                f"[B, N, {FACE_EMBEDDING_DIM}] (insightface's antelopev2 recognizer output), got {list(embeds.shape)}"
            )
        return embeds.unsqueeze(0) if embeds.ndim == 1 else embeds
    raise TypeError(
        f"cannot read a face from a {type(face).__name__}; expected a 512-d embedding (tensor or float array), "
        "instantid.face.FaceResult(s), or image(s) (PIL or HxWx3 uint8 RGB) with face_analysis"
    )


def _check_embedding_kind(face: Tensor | np.ndarray) -> None:
    """Refuse integer / bool arrays (not embeddings) and float images (``H x W x 3`` with values in 0..1)."""
    dtype = face.dtype
    floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.issubdtype(dtype, np.floating)
    if not floating:
        raise TypeError(
            f"face: a {type(face).__name__} of {dtype} is neither an image (HxWx3 uint8 RGB) nor a face embedding "
            f"(float [{FACE_EMBEDDING_DIM}], [B, {FACE_EMBEDDING_DIM}] or [B, N, {FACE_EMBEDDING_DIM}])"
        )
    if face.ndim in (3, 4) and face.shape[-1] in (3, 4) and face.shape[-1] != FACE_EMBEDDING_DIM:
        raise TypeError(
            f"face: a float array of shape {list(face.shape)} looks like an image (values 0..1?); give images as "
            "HxWx3 uint8 RGB arrays or PIL images with face_analysis=, or a float face embedding "
            f"[{FACE_EMBEDDING_DIM}] / [B, {FACE_EMBEDDING_DIM}]"
        )


def unet_cross_attention(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(processor key, attention module)`` for each cross-attention layer of ``unet``, in adapter order.

    Raises ``ValueError`` when the model has none (a UNet without text conditioning).
    """
    keys = cross_attention_keys(unet)
    if not keys:
        raise ValueError(
            f"{type(unet).__name__} has no cross-attention layers (attention modules with is_cross_attention); "
            "InstantID adds its identity to the text cross-attention of a UNet such as SD1.5's or SDXL's"
        )
    modules = dict(unet.named_modules())
    paths = attention_paths(unet)
    return [(key, modules[paths[key]]) for key in keys]


def _check_fit(layers: list[tuple[str, nn.Module]], adapter: InstantIDWeights) -> None:
    """Raise ``ValueError`` unless the adapter has one layer of matching widths per UNet cross-attention layer."""
    if len(layers) != adapter.num_layers:
        unet_arch = next((a for a, f in ARCHS.items() if f["num_layers"] == len(layers)), None)
        unet_kind = f" (an {unet_arch} UNet)" if unet_arch else ""
        raise ValueError(
            f"the InstantID adapter has {adapter.num_layers} cross-attention layers (an {adapter.arch} adapter) but "
            f"this UNet has {len(layers)}{unet_kind}; use the adapter made for this base model"
        )
    for index, (key, attn) in enumerate(layers):
        to_k: Any = attn.to_k
        width, context = to_k.out_features, to_k.in_features
        expected = (adapter.hidden_sizes[index], adapter.cross_attention_dim)
        if (width, context) != expected:
            raise ValueError(
                f"adapter layer {index} projects {expected[1]}-d tokens to width {expected[0]}, but the UNet's "
                f"{key.removesuffix('.processor')} has width {width} and takes {context}-d context; "
                f"the {adapter.arch} adapter does not fit this UNet"
            )


def _multipliers(
    adapter: InstantIDWeights, weight: float | Mapping[int, float] | Tensor, weight_type: str
) -> list[float]:
    """Each layer's weight: ``layer_weights`` for SD1.5/SDXL layouts; other layouts take a number or a tensor."""
    if any(f["num_layers"] == adapter.num_layers for f in ARCHS.values()):
        return [float(w) for w in layer_weights(weight, weight_type, adapter.num_layers)]
    if weight_type != "linear" or isinstance(weight, Mapping):
        raise ValueError(
            f"weight types and per-transformer weights are defined for SD1.5 and SDXL layouts; this adapter has "
            f"{adapter.num_layers} layers: give weight as a number or a tensor of {adapter.num_layers} values"
        )
    values = torch.as_tensor(weight, dtype=torch.float32).flatten()
    if values.numel() == 1:
        values = values.expand(adapter.num_layers)
    if values.numel() != adapter.num_layers:
        raise ValueError(
            f"a per-layer weight tensor must have {adapter.num_layers} values, got {values.numel()}"
        )
    return [float(w) for w in values]


def _model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensor = next(model.parameters())
    return tensor.device, tensor.dtype


class IdentityOptions(TypedDict, total=False):
    """Per-identity options of ``apply_instantid`` and ``instantid_hooks``, defaults as in :func:`prepare_identity`."""

    weight: float | Mapping[int, float] | Tensor
    weight_type: str
    start: float
    end: float
    noise: float
    embeds_scaling: str
    face_analysis: Any
    combine: CombineMode


def prepare_identity(
    unet: nn.Module,
    adapter: InstantIDWeights,
    face: FaceInput,
    *,
    layout: BatchLayout,
    weight: float | Mapping[int, float] | Tensor = 0.8,
    weight_type: str = "linear",
    start: float = 0.0,
    end: float = 1.0,
    noise: float = 0.0,
    embeds_scaling: str = "V only",
    face_analysis: Any | None = None,
    combine: CombineMode = "average",
    num_train_timesteps: int = 1000,
    owner: int | None = None,
) -> DiffusersIdentity:
    """Compute one identity's processors for ``unet`` (which is only read).

    ``weight``/``weight_type`` as in :func:`instantid.weight_schedules.layer_weights`; ``start``/
    ``end`` the denoising window (:class:`TimestepGate`); ``noise`` the unconditional
    embedding's noise (:func:`instantid.attention.uncond_embeds`); ``embeds_scaling`` as in
    :func:`instantid.attention.identity_attention`; ``owner`` as in :class:`IdentityAttnProcessor`.
    Keys and values are computed in float32 and stored in the UNet's dtype on its device.

    Raises ``ValueError`` for a UNet without cross-attention, an adapter whose layers do not
    match the UNet's, a bad face embedding or weight, and ``start``/``end`` out of order.
    """
    layers = unet_cross_attention(unet)
    _check_fit(layers, adapter)
    multipliers = _multipliers(adapter, weight, weight_type)
    gate = TimestepGate(start, end, num_train_timesteps)
    device, dtype = _model_placement(unet)
    embeds = face_embedding(face, face_analysis=face_analysis, combine=combine)
    cond_tokens, uncond_tokens = caches().face_tokens(adapter, embeds, noise=noise, device=device)
    kvs = caches().precompute_kv(adapter, cond_tokens, uncond_tokens, dtype=dtype, device=device)
    active_gate = None if gate.always else gate
    processors = {
        key: IdentityAttnProcessor(
            kv, multiplier, layout, gate=active_gate, embeds_scaling=embeds_scaling, owner=owner
        )
        for (key, _), kv, multiplier in zip(layers, kvs, multipliers, strict=True)
    }
    return DiffusersIdentity(processors, active_gate, cond_tokens, uncond_tokens)
