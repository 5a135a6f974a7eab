"""The attn2 replace patches the nodes install: values, right and cheap under every ComfyUI clone().

ComfyUI calls an attn2 replace patch as ``patch(q, k, v, extra_options)`` with ``q``, ``k``, ``v``
already projected by the layer. ``ModelPatcher.clone()`` runs ``copy.deepcopy(model_options)``
over all installed patches in ComfyUI before 2026-02; since ComfyUI PR #12382 it copies only the
dicts and lists and shares every patch object with the model it was cloned from. So patches are
values: nothing here changes a patch object once it is in a model; adding a face puts a new patch
object into the clone's own dict (:func:`add_identity_patch`). And:

- ``IdentityTerm`` is one face's identity attention for one layer: it holds that layer's
  precomputed K/V (``instantid.attention.IdentityKV``), the weight and the mask. It is immutable
  and ``copy.deepcopy`` returns it unchanged: its tensors are shared by every copy.
- ``InstantIDAttn2Patch`` is what sits at a patch key: the layer's own attention plus a tuple of
  sigma-gated terms. Its deep copy is a new patch sharing the terms (microseconds).

The patch follows the ``Attn2Replace`` protocol of ComfyUI_InstantID and ComfyUI_IPAdapter_plus
(``callback``/``kwargs`` lists, ``add(callback, **kwargs)``, terms called as
``callback(out, q, k, v, extra_options, **kwargs)`` and gated on ``kwargs["sigma_start"]`` /
``kwargs["sigma_end"]``), so an IP-Adapter applied after InstantID on the same model adds its own
term to this patch as it does to its own (in place: that pack's isolation is the clone's, see
``cow_model.comfy``). Terms of other packs are deep-copied with their arguments by a deep copy,
exactly as the stock deep copy would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from cow_model import cow_copy
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
    """An attn2 replace: the layer's attention (or the patch it replaced) plus sigma-gated terms; a value.

    ``callback[i]`` is called as ``callback[i](out, q, k, v, extra_options, **kwargs[i])`` when
    ``kwargs[i]["sigma_end"] <= sigma <= kwargs[i]["sigma_start"]`` and its result is added.
    ``base``, when set, is the replace patch that was at this key before (another pack's), called
    instead of plain attention for the layer's own output; it is shared, never changed.

    ``callback`` and ``kwargs`` are tuples, and nothing here changes a patch, a tuple or a kwargs
    dict once it may be in a model: :meth:`with_identity` / :meth:`with_term` return a new patch
    (new tuples, the terms shared). :meth:`add` is the ``Attn2Replace`` protocol other packs call
    (ComfyUI_IPAdapter_plus adds its term to whatever patch sits at its key): it replaces this
    patch's tuples with longer ones in place, as the protocol requires; this pack never calls it.

    Deep copies (ComfyUI's ``clone()`` before 2026-02) get a new patch: ``IdentityTerm`` entries
    and their kwargs dicts are shared (immutable), any other pack's entries and ``base`` are
    deep-copied as the stock deep copy would.
    """

    def __init__(
        self,
        base: Callable[..., Tensor] | None = None,
        callback: tuple[Term, ...] = (),
        kwargs: tuple[dict[str, Any], ...] = (),
    ) -> None:
        if len(callback) != len(kwargs):
            raise ValueError(f"InstantIDAttn2Patch needs one kwargs dict per callback; got {len(callback)} and {len(kwargs)}")
        self.base = base
        self.callback: tuple[Term, ...] = tuple(callback)
        self.kwargs: tuple[dict[str, Any], ...] = tuple(kwargs)

    @staticmethod
    def _checked(kwargs: dict[str, Any]) -> dict[str, Any]:
        for name in ("sigma_start", "sigma_end"):
            if name not in kwargs:
                raise TypeError(f"InstantIDAttn2Patch.add needs {name!r} among its keyword arguments")
        return kwargs

    def with_term(self, callback: Term, **kwargs: Any) -> InstantIDAttn2Patch:
        """A new patch: this one's terms and ``callback`` (``kwargs`` must hold ``sigma_start``/``sigma_end``)."""
        kwargs = self._checked(kwargs)
        new = copy.copy(self)  # the same base and attributes, this patch unchanged
        new.callback = (*self.callback, callback)
        new.kwargs = (*self.kwargs, kwargs)
        return new

    def with_identity(self, term: IdentityTerm, sigma_start: float, sigma_end: float) -> InstantIDAttn2Patch:
        """A new patch: this one's terms and one face's identity term, active for ``sigma_end <= sigma <= sigma_start``."""
        return self.with_term(term, sigma_start=float(sigma_start), sigma_end=float(sigma_end))

    def add(self, callback: Term, **kwargs: Any) -> None:
        """Append a term in place (the ``Attn2Replace.add`` protocol of other packs); ``kwargs`` must hold
        ``sigma_start``/``sigma_end``. The tuples are replaced, never changed: a copy made before keeps its terms."""
        kwargs = self._checked(kwargs)
        self.callback = (*self.callback, callback)
        self.kwargs = (*self.kwargs, kwargs)

    @property
    def identities(self) -> tuple[IdentityTerm, ...]:
        """This patch's own identity terms, in the order they were added."""
        return tuple(c for c in self.callback if isinstance(c, IdentityTerm))

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
        if all(isinstance(callback, IdentityTerm) for callback in self.callback):
            new.callback, new.kwargs = self.callback, self.kwargs  # immutable: shared
            return new
        callbacks: list[Term] = []
        kwargs_list: list[dict[str, Any]] = []
        for callback, kwargs in zip(self.callback, self.kwargs, strict=True):
            if isinstance(callback, IdentityTerm):
                callbacks.append(callback)
                kwargs_list.append(kwargs)
            else:
                callbacks.append(copy.deepcopy(callback, memo))
                kwargs_list.append(copy.deepcopy(kwargs, memo))
        new.callback, new.kwargs = tuple(callbacks), tuple(kwargs_list)
        return new


def attn2_patches(model_options: dict[str, Any]) -> dict[Any, Any]:
    """A copy of the attn2 replace patch table in ``model_options`` (empty when there is none)."""
    replace = model_options.get("transformer_options", {}).get("patches_replace", {})
    return dict(replace.get("attn2", {}))


def add_identity_patch(
    model: Any, key: tuple[str, int, int], term: IdentityTerm, sigma_start: float, sigma_end: float
) -> None:
    """Put ``term`` at ``key`` on ``model``, a ComfyUI ``ModelPatcher`` fresh from ``clone()``, changing no patch object.

    Whatever ``clone()`` shares with the model it was cloned from (every patch object, since ComfyUI
    PR #12382 of 2026-02), a new patch object goes into the clone's own ``patches_replace`` dict:
    our own patch at ``key`` becomes a new one with the term added (its terms shared); a foreign
    patch following the ``Attn2Replace`` protocol (``add``, as ComfyUI_InstantID's and
    ComfyUI_IPAdapter_plus's) is copied with ``cow_model.cow_copy`` (containers and plain objects
    copied, tensors, modules and functions shared) and the copy gets the term as the stock pack
    gives it; any other patch at ``key``, or else a block-wide patch at ``key[:2]``, becomes the
    (shared, unchanged) base of a new ``InstantIDAttn2Patch``.
    """
    patches = attn2_patches(model.model_options)
    existing = patches.get(key)
    patch: Any
    if isinstance(existing, InstantIDAttn2Patch):
        patch = existing.with_identity(term, sigma_start, sigma_end)
    elif existing is not None and callable(getattr(existing, "add", None)):
        patch = cow_copy(existing)
        patch.add(term, sigma_start=float(sigma_start), sigma_end=float(sigma_end))
    else:
        # ComfyUI prefers the (block, number, index) key to a block-wide (block, number) one, so a
        # block-wide patch becomes the base here rather than being shadowed for this layer.
        base = existing if existing is not None else patches.get(key[:2])
        patch = InstantIDAttn2Patch(base=base).with_identity(term, sigma_start, sigma_end)
    model.set_model_attn2_replace(patch, *key)
