"""The attn2 replace patches the nodes install, built to stay cheap under ComfyUI's deep copies.

ComfyUI calls an attn2 replace patch as ``patch(q, k, v, extra_options)`` with ``q``, ``k``, ``v``
already projected by the layer, and every ``ModelPatcher.clone()`` runs
``copy.deepcopy(model_options)`` over all installed patches. So:

- ``IdentityTerm`` is one face's identity attention for one layer: it holds that layer's
  precomputed K/V (``instantid.attention.IdentityKV``), the weight and the mask. It is immutable
  and ``copy.deepcopy`` returns it unchanged: its tensors are shared by every copy.
- ``InstantIDAttn2Patch`` is what sits at a patch key: the layer's own attention plus a list of
  sigma-gated terms. Its deep copy is a new patch with new lists sharing the terms (microseconds),
  so a later node that adds a term to its clone's patch never changes the upstream model's patch.

The patch follows the ``Attn2Replace`` protocol of ComfyUI_InstantID and ComfyUI_IPAdapter_plus
(``callback``/``kwargs`` lists, ``add(callback, **kwargs)``, terms called as
``callback(out, q, k, v, extra_options, **kwargs)`` and gated on ``kwargs["sigma_start"]`` /
``kwargs["sigma_end"]``), so an IP-Adapter applied after InstantID on the same model adds its own
term to this patch as it does to its own. Terms of other packs are deep-copied with their
arguments, exactly as the stock deep copy would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from instantid.attention import IdentityKV, LayerMasks, identity_attention, sigma_in_range

AttentionFn = Callable[..., Tensor]
Term = Callable[..., Tensor]

NO_SIGMA = 999999999.9
"""The sigma assumed when ComfyUI passes none (no gating), as the stock pack does."""


def comfy_attention() -> AttentionFn:
    """ComfyUI's attention backend as chosen at start-up (``--use-pytorch-cross-attention``, xformers, ...)."""
    from comfy.ldm.modules import attention

    return attention.optimized_attention


@dataclass(frozen=True, eq=False)
class IdentityTerm:
    """``w * attention(q, K_ip, V_ip)`` for one face on one layer, masked; immutable, shared by copies.

    ``kv`` holds the layer's K/V for the conditional and unconditional face tokens; ``weight`` a
    number (or what ``identity_attention`` accepts); ``mask`` ``None`` or a mask in image space
    (``[H, W]`` / ``[B, H, W]``, or a ``LayerMasks`` holding one, which resizes it once per layer grid).
    """

    kv: IdentityKV
    weight: Any
    mask: Tensor | LayerMasks | None
    __cow_shared__ = True

    def __deepcopy__(self, memo: dict[int, Any]) -> IdentityTerm:
        return self

    def __call__(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, extra_options: dict[str, Any], **_: Any) -> Tensor:
        return identity_attention(
            q,
            self.kv,
            heads=extra_options["n_heads"],
            weight=self.weight,
            cond_or_uncond=extra_options["cond_or_uncond"],
            mask=self.mask,
            original_shape=extra_options["original_shape"],
            attention=comfy_attention(),
        )


class _SigmaReader:
    """The current sigma as a float, read once per forward pass rather than once per layer.

    ComfyUI passes the same ``sigmas`` tensor to every layer of one model call, a tensor its
    samplers make anew for each call and never change in place; reading it (``.item()``)
    synchronises with the device, so the last tensor and its value are kept.
    """

    def __init__(self) -> None:
        self._last: tuple[Tensor | None, float] = (None, NO_SIGMA)

    def __call__(self, extra_options: dict[str, Any]) -> float:
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return NO_SIGMA
        tensor, value = self._last  # one tuple, so concurrent callers never pair a tensor with another's value
        if sigmas is not tensor:
            value = float(sigmas.detach().reshape(-1)[0].item())
            self._last = (sigmas, value)
        return value


current_sigma = _SigmaReader()


class InstantIDAttn2Patch:
    """An attn2 replace: the layer's attention (or the patch it replaced) plus sigma-gated terms.

    ``callback[i]`` is called as ``callback[i](out, q, k, v, extra_options, **kwargs[i])`` when
    ``kwargs[i]["sigma_end"] <= sigma <= kwargs[i]["sigma_start"]`` and its result is added.
    ``base``, when set, is the replace patch that was at this key before (another pack's), called
    instead of plain attention for the layer's own output.

    Deep copies (ComfyUI's ``clone()``) get new ``callback``/``kwargs`` lists; ``IdentityTerm``
    entries and their small numeric kwargs are shared or copied in microseconds, any other
    pack's entries and ``base`` are deep-copied as the stock deep copy would.
    """

    def __init__(self, base: Callable[..., Tensor] | None = None) -> None:
        self.base = base
        self.callback: list[Term] = []
        self.kwargs: list[dict[str, Any]] = []

    def add(self, callback: Term, **kwargs: Any) -> None:
        """Append a term (the ``Attn2Replace.add`` protocol); ``kwargs`` must hold ``sigma_start``/``sigma_end``."""
        for name in ("sigma_start", "sigma_end"):
            if name not in kwargs:
                raise TypeError(f"InstantIDAttn2Patch.add needs {name!r} among its keyword arguments")
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def add_identity(self, term: IdentityTerm, sigma_start: float, sigma_end: float) -> None:
        """Append one face's identity term, active for ``sigma_end <= sigma <= sigma_start``."""
        self.add(term, sigma_start=float(sigma_start), sigma_end=float(sigma_end))

    @property
    def identities(self) -> list[IdentityTerm]:
        """This patch's own identity terms, in the order they were added."""
        return [c for c in self.callback if isinstance(c, IdentityTerm)]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict[str, Any]) -> Tensor:
        dtype = q.dtype
        if self.base is not None:
            out = self.base(q, k, v, extra_options)
        else:
            out = comfy_attention()(q, k, v, extra_options["n_heads"])
        sigma = current_sigma(extra_options)
        for callback, kwargs in zip(self.callback, self.kwargs, strict=True):
            if sigma_in_range(sigma, kwargs["sigma_start"], kwargs["sigma_end"]):
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(dtype=dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> InstantIDAttn2Patch:
        new = InstantIDAttn2Patch.__new__(InstantIDAttn2Patch)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name not in ("callback", "kwargs"):
                setattr(new, name, copy.deepcopy(value, memo))
        new.callback = []
        new.kwargs = []
        for callback, kwargs in zip(self.callback, self.kwargs, strict=True):
            if isinstance(callback, IdentityTerm):
                new.callback.append(callback)
                new.kwargs.append(dict(kwargs))
            else:
                new.callback.append(copy.deepcopy(callback, memo))
                new.kwargs.append(copy.deepcopy(kwargs, memo))
        return new


def attn2_patches(model_options: dict[str, Any]) -> dict[Any, Any]:
    """A copy of the attn2 replace patch table in ``model_options`` (empty when there is none)."""
    replace = model_options.get("transformer_options", {}).get("patches_replace", {})
    return dict(replace.get("attn2", {}))


def add_identity_patch(
    model: Any, key: tuple[str, int, int], term: IdentityTerm, sigma_start: float, sigma_end: float
) -> None:
    """Add ``term`` at ``key`` to ``model``, a ComfyUI ``ModelPatcher`` fresh from ``clone()``.

    The patch at ``key`` in a fresh clone is the clone's own copy, so adding to it leaves the
    model it was cloned from unchanged. Our own patch gets the term; a foreign patch following
    the ``Attn2Replace`` protocol (``add``) gets it as the stock pack gives it; any other patch at
    ``key``, or else a block-wide patch at ``key[:2]``, becomes the base of a new
    ``InstantIDAttn2Patch`` installed at ``key``.
    """
    patches = attn2_patches(model.model_options)
    existing = patches.get(key)
    if isinstance(existing, InstantIDAttn2Patch):
        existing.add_identity(term, sigma_start, sigma_end)
    elif existing is not None and callable(getattr(existing, "add", None)):
        existing.add(term, sigma_start=float(sigma_start), sigma_end=float(sigma_end))
    else:
        # ComfyUI prefers the (block, number, index) key to a block-wide (block, number) one, so a
        # block-wide patch becomes the base here rather than being shadowed for this layer.
        patch = InstantIDAttn2Patch(base=existing if existing is not None else patches.get(key[:2]))
        patch.add_identity(term, sigma_start, sigma_end)
        model.set_model_attn2_replace(patch, *key)
