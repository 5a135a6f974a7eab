"""Identity attention: the term InstantID adds to a cross-attention layer's output.

``out = attention(q, k, v) + identity_attention(q, kv, ...)`` where the second term is
``w * attention(q, K_ip, V_ip)`` (for the default "V only" scaling) over the 16 identity tokens.

The steps, once per apply: :func:`face_tokens` runs the Resampler on the face embedding (and
on the unconditional one), :func:`precompute_kv` projects both token sets through every
layer's ``to_k_ip``/``to_v_ip`` into :class:`IdentityKV` holders; the patch keeps those, not
the adapter. Per step and layer: :func:`sigma_in_range` gates, :func:`identity_attention`
computes the term. Weights per layer come from :func:`instantid.weight_schedules.layer_weights`,
masks are resized by :func:`instantid.masks.resize_mask` (once per layer grid with a :class:`instantid.masks.LayerMasks`).

Batches follow ComfyUI's layout: ``q`` holds ``len(cond_or_uncond)`` chunks of equal size, chunk
``i`` conditional when ``cond_or_uncond[i] != 1`` and unconditional when it is 1. diffusers'
classifier-free guidance batch ``[negative, positive]`` is ``cond_or_uncond=[1, 0]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from instantid.masks import LayerMasks
from instantid.weight_schedules import WEIGHT_TYPES, layer_weights
from instantid.weights import FACE_EMBEDDING_DIM, InstantIDWeights

__all__ = [
    "EMBEDS_SCALINGS",
    "WEIGHT_TYPES",
    "AttentionFn",
    "IdentityKV",
    "LayerMasks",
    "default_attention",
    "face_tokens",
    "identity_attention",
    "layer_weights",
    "precompute_kv",
    "sigma_in_range",
    "uncond_embeds",
]

EMBEDS_SCALINGS = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
_C_PENALTY_WIDTH = 1280.0

AttentionFn = Callable[..., Tensor]
"""``attention(q, k, v, heads, mask=None) -> Tensor`` on ``[B, N, heads * dim_head]`` tensors (ComfyUI's
``optimized_attention`` signature)."""


def default_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention on ``[B, N, heads * dim_head]`` tensors with torch's scaled_dot_product_attention."""
    batch = q.shape[0]
    q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3])


@dataclass(frozen=True, eq=False)
class IdentityKV:
    """Keys and values of the identity tokens for one layer.

    ``k`` and ``v`` are ``[2, n, T, inner_dim]``: row 0 from the conditional tokens, row 1 from the
    unconditional ones (so ComfyUI's ``cond_or_uncond`` codes index them), ``n`` identity sets
    (face images), ``T`` tokens each (16). Treated as immutable: ``copy``/``deepcopy`` return the
    holder itself, and ``__cow_shared__`` lets ``cow_model.cow_copy`` share it.
    """

    k: Tensor
    v: Tensor
    __cow_shared__ = True

    def __copy__(self) -> IdentityKV:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> IdentityKV:
        return self

    @property
    def num_sets(self) -> int:
        return self.k.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> IdentityKV:
        """This holder on ``device`` in ``dtype`` (itself when nothing changes)."""
        k, v = self.k.to(device=device, dtype=dtype), self.v.to(device=device, dtype=dtype)
        return self if k is self.k and v is self.v else IdentityKV(k, v)


def _check_embeds(embeds: Tensor) -> Tensor:
    if not isinstance(embeds, Tensor) or embeds.ndim not in (2, 3) or embeds.shape[-1] != FACE_EMBEDDING_DIM:
        shape = list(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
        raise ValueError(
            f"expected face embeddings of shape [B, {FACE_EMBEDDING_DIM}] or [B, N, {FACE_EMBEDDING_DIM}], got {shape}"
        )
    if embeds.shape[0] == 0:
        raise ValueError("got no face embedding (batch of 0); expected at least one")
    flat = embeds.detach().float().reshape(embeds.shape[0], -1)
    bad = (~torch.isfinite(flat)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"face embedding {bad} has NaN or infinite values; expected a finite insightface embedding"
        )
    zero = (flat == 0).all(dim=1).nonzero().flatten().tolist()
    if zero:
        raise ValueError(
            f"face embedding {zero} is all zeros; expected an insightface embedding of a detected face"
        )
    return embeds


def uncond_embeds(embeds: Tensor, noise: float = 0.0) -> Tensor:
    """The unconditional embedding InstantID pairs with ``embeds``: zeros, or with ``noise > 0`` uniform
    noise in ``[0, noise)`` drawn on the CPU from a seed derived from ``embeds`` (as ComfyUI_InstantID's
    ``noise`` input does), so the same face gives the same noise."""
    if noise <= 0:
        return torch.zeros_like(embeds)
    seed = int(torch.sum(embeds).item()) % 1000000007
    generator = torch.Generator().manual_seed(seed)
    sample = torch.rand(
        embeds.shape, generator=generator, dtype=embeds.dtype if embeds.is_floating_point() else None
    )
    return (noise * sample).to(device=embeds.device, dtype=embeds.dtype)


@torch.no_grad()
def face_tokens(
    weights: InstantIDWeights,
    embeds: Tensor,
    *,
    noise: float = 0.0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(cond_tokens, uncond_tokens)``, each float32 ``[B, 16, cross_attention_dim]`` on ``device``
    (default: the embeddings' device).

    ``embeds`` is ``[B, 512]`` or ``[B, N, 512]``: B identity sets (one per face image, or one
    combined). The Resampler runs in float32 (a float32 copy of ``image_proj`` exists only for
    the call when the adapter holds another dtype). Raises ``ValueError`` for a wrong shape or a
    NaN, infinite or all-zero embedding.
    """
    embeds = _check_embeds(embeds)
    device = embeds.device if device is None else torch.device(device)
    resampler = weights.resampler().to(device=device, dtype=torch.float32)
    embeds = embeds.to(device=device, dtype=torch.float32)
    return resampler(embeds), resampler(uncond_embeds(embeds, noise))


@torch.no_grad()
def precompute_kv(
    weights: InstantIDWeights,
    cond_tokens: Tensor,
    uncond_tokens: Tensor,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[IdentityKV, ...]:
    """One :class:`IdentityKV` per adapter layer (adapter order), computed in float32 and stored in ``dtype``.

    ``cond_tokens`` and ``uncond_tokens`` are ``[n, T, cross_attention_dim]`` (or ``[T, C]`` for one
    set). The adapter's tensors are only read (moved to ``device`` one layer at a time); the
    results share nothing with them. Raises ``ValueError`` for tokens of another shape.
    """
    tokens = []
    for name, t in (("cond", cond_tokens), ("uncond", uncond_tokens)):
        t = t.unsqueeze(0) if t.ndim == 2 else t
        if t.ndim != 3 or t.shape[-1] != weights.cross_attention_dim:
            raise ValueError(
                f"{name}_tokens must be [n, T, {weights.cross_attention_dim}] for this {weights.arch} adapter, "
                f"got {list(t.shape)}"
            )
        tokens.append(t)
    if tokens[0].shape != tokens[1].shape:
        raise ValueError(
            f"cond and uncond tokens differ in shape: {list(tokens[0].shape)} vs {list(tokens[1].shape)}"
        )
    stacked = torch.stack(tokens).to(device=device, dtype=torch.float32)
    out = []
    for w_k, w_v in zip(weights.to_k_ip, weights.to_v_ip, strict=True):
        k = stacked @ w_k.to(device=device, dtype=torch.float32).T
        v = stacked @ w_v.to(device=device, dtype=torch.float32).T
        out.append(IdentityKV(k.to(dtype), v.to(dtype)))
    return tuple(out)


def sigma_in_range(sigma: float | Tensor, sigma_start: float, sigma_end: float) -> bool:
    """Whether a step at noise level ``sigma`` (a number or ComfyUI's ``sigmas`` tensor: its first
    value) lies in ``[sigma_end, sigma_start]``; sigmas fall as sampling runs, so ``sigma_start``
    is the larger. ComfyUI gets both from ``model_sampling.percent_to_sigma(start_at / end_at)``."""
    value = float(sigma.detach().flatten()[0].item()) if isinstance(sigma, Tensor) else float(sigma)
    return sigma_end <= value <= sigma_start


def _fit(t: Tensor, size: int) -> Tensor:
    """``t`` along dim 0 cut to ``size`` or padded by repeating its last entry."""
    if t.shape[0] >= size:
        return t[:size]
    return torch.cat([t, t[-1:].expand(size - t.shape[0], *t.shape[1:])])


def identity_attention(
    q: Tensor,
    kv: IdentityKV,
    *,
    heads: int,
    weight: float | Tensor,
    cond_or_uncond: Sequence[int] | None = None,
    mask: Tensor | LayerMasks | None = None,
    original_shape: Sequence[int] | None = None,
    embeds_scaling: str = "V only",
    attention: AttentionFn | None = None,
    unfold_batch: bool = False,
) -> Tensor:
    """The identity term to add to a cross-attention layer's output (``[B, N, inner_dim]``, ``q``'s dtype).

    ``q`` is the layer's projected query ``[B, N, heads * dim_head]``. ``weight`` is this layer's
    multiplier: a number, or a tensor of one value per image of a chunk (cut or padded by
    repeating the last). ``cond_or_uncond`` lists the chunks of ``q`` (``None``: one
    conditional chunk). Without ``unfold_batch`` every image attends to the tokens of all of
    ``kv``'s identity sets (concatenated); with it, image ``i`` of each chunk attends to set ``i``
    (the last set repeats when there are fewer sets than images). ``mask`` (``[H, W]`` or
    ``[M, H, W]``, one per image, cut or padded likewise; or a :class:`~instantid.masks.LayerMasks`,
    which resizes once per layer grid instead of on every call) multiplies the term after
    resizing to the layer's grid, which needs ``original_shape`` (the latent's ``[B, C, H, W]``).
    ``embeds_scaling`` is one of :data:`EMBEDS_SCALINGS`:

    * ``V only``: ``w * attn(q, K, V)``
    * ``K+V``: ``attn(q, w K, w V)``
    * ``K+V w/ C penalty``: as K+V with ``w * inner_dim / 1280``
    * ``K+mean(V) w/ C penalty``: ``w' = w * inner_dim / 1280``; ``attn(q, w' K, V - mean(V) + w' mean(V))``,
      the mean over the tokens

    ``attention`` defaults to :func:`default_attention`. A zero weight returns zeros without
    attending. Raises ``ValueError`` for a batch not divisible into the chunks, a width other
    than ``kv``'s, an unknown scaling or a mask without ``original_shape``.
    """
    if embeds_scaling not in EMBEDS_SCALINGS:
        raise ValueError(
            f"unknown embeds scaling {embeds_scaling!r}; expected one of {', '.join(EMBEDS_SCALINGS)}"
        )
    codes = [1 if c == 1 else 0 for c in (cond_or_uncond if cond_or_uncond is not None else [0])]
    batch, num_tokens, width = q.shape
    if batch % len(codes):
        raise ValueError(
            f"a batch of {batch} queries does not split into {len(codes)} chunks (cond_or_uncond={codes})"
        )
    if width != kv.k.shape[-1]:
        raise ValueError(f"queries of width {width} do not match identity keys of width {kv.k.shape[-1]}")
    if mask is not None and original_shape is None:
        raise ValueError(
            "a mask needs original_shape (the latent's [B, C, H, W]) to find the layer's token grid"
        )
    per_chunk = batch // len(codes)

    scale: float | Tensor
    if isinstance(weight, Tensor) and weight.numel() > 1:
        scale = _fit(weight.detach().flatten().to(device=q.device, dtype=torch.float32), per_chunk)
        if not bool(scale.any()):
            return q.new_zeros(q.shape)
        scale = scale.repeat(len(codes)).view(batch, 1, 1).to(q.dtype)
    else:
        scale = float(weight)
        if scale == 0:
            return q.new_zeros(q.shape)

    kv = kv.to(device=q.device, dtype=q.dtype)
    if unfold_batch:  # image i of a chunk gets identity set i: [per_chunk, T, C] per chunk
        k = torch.cat([_fit(kv.k[code], per_chunk) for code in codes])
        v = torch.cat([_fit(kv.v[code], per_chunk) for code in codes])
    else:  # every image gets all sets' tokens: [per_chunk, n * T, C] per chunk
        k = torch.cat([kv.k[code].flatten(0, 1).expand(per_chunk, -1, -1) for code in codes])
        v = torch.cat([kv.v[code].flatten(0, 1).expand(per_chunk, -1, -1) for code in codes])

    attend = attention or default_attention
    if embeds_scaling == "V only":
        out = attend(q, k, v, heads) * scale
    else:
        if embeds_scaling != "K+V":
            scale = scale * (width / _C_PENALTY_WIDTH)
        if embeds_scaling == "K+mean(V) w/ C penalty":
            v_mean = v.mean(dim=1, keepdim=True)
            v = v - v_mean + v_mean * scale
        else:
            v = v * scale
        out = attend(q, k * scale, v, heads)

    if mask is not None and original_shape is not None:
        masks = mask if isinstance(mask, LayerMasks) else LayerMasks(mask)
        grid = _fit(masks.for_layer(num_tokens, original_shape, out), per_chunk)
        out = out * grid.repeat(len(codes), 1).unsqueeze(-1)
    return out.to(q.dtype)
