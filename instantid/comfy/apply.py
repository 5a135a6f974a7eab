"""Put one face's identity attention on a clone of a ComfyUI model.

``apply_identity`` clones the ``ModelPatcher`` (ComfyUI's own ``clone()``), precomputes the
identity K/V of every cross-attention layer once, and puts one ``IdentityTerm`` per layer into
new attn2 replace patches of the clone (the K/V kept in ``instantid.cache``'s ``kv`` layer). The
model it was given is never changed, under either generation of ``clone()``, and the adapter's
tensors are only read: the patches hold the K/V (a few MiB), not the adapter.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from instantid.attention import LayerMasks
from instantid.cache import caches
from instantid.comfy.blocks import (
    CrossAttentionSite,
    cross_attention_sites,
    describe_layout,
    diffusion_model_of,
)
from instantid.comfy.conditioning import check_mask
from instantid.comfy.errors import InstantIDNodeError
from instantid.comfy.patch import IdentityTerm, add_identity_patch
from instantid.weights import InstantIDWeights

logger = logging.getLogger(__name__)


def model_sampling(model: Any) -> Any:
    """The model's sampling object: ``get_model_object("model_sampling")`` where ComfyUI has it
    (since mid 2024, honouring object patches such as ModelSamplingDiscrete), else
    ``model.model.model_sampling`` (ComfyUI before that)."""
    get_model_object = getattr(model, "get_model_object", None)
    if callable(get_model_object):
        return get_model_object("model_sampling")
    return model.model.model_sampling


def sigma_range(model: Any, start_at: float, end_at: float) -> tuple[float, float]:
    """``(sigma_start, sigma_end)`` for sampling progress ``start_at``..``end_at`` (0..1), as floats.

    ``start_at`` after ``end_at`` gives an empty range (the identity never applies), as in
    ComfyUI_InstantID, so saved workflows keep running; it is logged as a warning.
    """
    if start_at > end_at:
        logger.warning("start_at (%s) is after end_at (%s): the identity attention will never apply", start_at, end_at)
    sampling = model_sampling(model)
    return float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at))


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the model's attention runs in: its manual-cast dtype when set, else its weights' dtype."""
    base = model.model
    manual = getattr(base, "manual_cast_dtype", None)
    dtype = manual if manual is not None else base.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float16


def matching_sites(model: Any, weights: InstantIDWeights) -> list[CrossAttentionSite]:
    """The model's cross-attention layers, checked against the adapter's (count and widths).

    Raises ``NoCrossAttentionError`` for a model without cross-attention and ``InstantIDNodeError``
    when the adapter was made for another architecture.
    """
    sites = cross_attention_sites(diffusion_model_of(model))
    context = {site.context_dim for site in sites}
    if len(sites) != weights.num_layers or context != {weights.cross_attention_dim}:
        raise InstantIDNodeError(
            f"this InstantID adapter is for {weights.arch} ({weights.num_layers} cross-attention layers reading "
            f"{weights.cross_attention_dim}-d text tokens) but the model has {len(sites)} cross-attention layers "
            f"reading {sorted(context)}-d tokens ({describe_layout(sites)}); use the adapter made for this model"
        )
    wrong = [
        f"{site.key}: {site.hidden_size} (adapter layer {site.module_key}: {width})"
        for site, width in zip(sites, weights.hidden_sizes, strict=True)
        if site.hidden_size != width
    ]
    if wrong:
        raise InstantIDNodeError(
            f"the model's cross-attention widths differ from this {weights.arch} adapter's at {len(wrong)} of "
            f"{len(sites)} layers, e.g. " + "; ".join(wrong[:3]) + "; use the adapter made for this model"
        )
    return sites


def apply_identity(
    model: Any,
    weights: InstantIDWeights,
    cond_tokens: Tensor,
    uncond_tokens: Tensor,
    *,
    weight: float,
    start_at: float,
    end_at: float,
    mask: Tensor | None = None,
) -> Any:
    """A clone of ``model`` with this identity added to every cross-attention layer.

    ``cond_tokens``/``uncond_tokens`` are the Resampler's outputs ``[n, 16, C]``. Patches already
    on ``model`` (an earlier face, another pack's) stay: the clone gets new patch objects holding
    their terms and this identity's (``add_identity_patch``); no patch object ``model`` holds is
    changed, whether ComfyUI's ``clone()`` copies them or shares them.
    """
    sites = matching_sites(model, weights)
    mask = check_mask(mask)
    sigma_start, sigma_end = sigma_range(model, start_at, end_at)
    device = model.load_device
    kv = caches().precompute_kv(weights, cond_tokens, uncond_tokens, dtype=compute_dtype(model), device=device)
    layer_masks = None if mask is None else LayerMasks(mask.to(device))  # each grid resized once, for all layers
    work_model = model.clone()
    for site in sites:
        term = IdentityTerm(kv[site.adapter_layer], weight, layer_masks)
        add_identity_patch(work_model, site.key, term, sigma_start, sigma_end)
    return work_model
