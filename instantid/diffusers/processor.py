"""The diffusers attention processor that adds InstantID's identity term, and its step gate.

:class:`IdentityAttnProcessor` computes a cross-attention layer as diffusers'
``AttnProcessor2_0`` does, plus ``w * attention(q, K_ip, V_ip)`` from keys and values
precomputed once per identity (:func:`instantid.attention.precompute_kv`); the math of that
term is :func:`instantid.attention.identity_attention`. It is the counterpart of diffusers'
``IPAdapterAttnProcessor2_0`` that holds K/V instead of the ``to_k_ip``/``to_v_ip`` weights and
takes nothing extra through ``encoder_hidden_states``. It is a plain object, not an
``nn.Module``: installing it adds no child module, and it is never copied.

**Which chunks are conditional.** A processor gets its batch layout (``cond_or_uncond``, see
:mod:`instantid.attention`) from a :data:`BatchLayout` callable asked once per call: for a
pipeline, whether the pipeline is running classifier-free guidance (``[1, 0]``: diffusers puts
the negative half first) or not (``[0]``).

**Start and end.** A processor cannot see the denoising step, so a :class:`TimestepGate`
watches the UNet's ``time_proj`` module (a forward pre-hook on a private copy of it, or on the
UNet itself for in-place hooks) and records, per thread, whether the timestep being run lies
in the window; the processors of that UNet read the record. ``start``/``end`` are fractions of
the denoising schedule as ComfyUI defines them: the step at timestep ``t`` of ``T`` training
timesteps is at ``1 - t / (T - 1)``, and the identity applies when ``start <= that <= end``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instantid.attention import EMBEDS_SCALINGS, IdentityKV, identity_attention

__all__ = [
    "BatchLayout",
    "FixedLayout",
    "IdentityAttnProcessor",
    "OwnerThreadError",
    "PipelineLayout",
    "TimestepGate",
    "fixed_layout",
    "pipeline_layout",
]

BatchLayout = Callable[[], Sequence[int]]
"""Returns the ``cond_or_uncond`` codes of the batch being run (1 = unconditional chunk)."""


class FixedLayout:
    """A :data:`BatchLayout` that is always the same (picklable, unlike a lambda)."""

    def __init__(self, codes: Sequence[int]) -> None:
        self.codes = tuple(codes)

    def __call__(self) -> Sequence[int]:
        return self.codes

    def __repr__(self) -> str:
        return f"FixedLayout({list(self.codes)})"


def fixed_layout(cfg: bool) -> BatchLayout:
    """``[1, 0]`` (diffusers' classifier-free guidance batch: negative half first) when ``cfg``, else ``[0]``."""
    return FixedLayout((1, 0) if cfg else (0,))


class PipelineLayout:
    """The layout of the batch ``pipe`` is running: ``[1, 0]`` while ``pipe.do_classifier_free_guidance``.

    Holds ``pipe`` weakly. Asked outside the pipeline's ``__call__`` (the UNet called directly)
    or after the pipeline is gone, it raises ``RuntimeError`` saying so. Pickled with its
    pipeline; deep-copied along with a pipeline it follows the copy (``copy.deepcopy`` memo).
    """

    def __init__(self, pipe: Any) -> None:
        self._ref = weakref.ref(pipe)

    def __call__(self) -> Sequence[int]:
        owner = self._ref()
        if owner is None:
            raise RuntimeError(
                "this UNet's InstantID processors belong to a pipeline that no longer exists; keep the pipeline "
                "returned by apply_instantid, or apply InstantID to the UNet itself (apply_instantid(unet, ...))"
            )
        try:
            return (1, 0) if owner.do_classifier_free_guidance else (0,)
        except AttributeError:
            raise RuntimeError(
                "this UNet's InstantID processors read the batch layout from their pipeline while it runs; call "
                "the pipeline, or apply InstantID to the UNet itself (apply_instantid(unet, ..., cfg=...)) to "
                "call it directly"
            ) from None

    def __reduce__(self) -> tuple[Any, ...]:
        return (PipelineLayout, (self._ref(),))

    def __deepcopy__(self, memo: dict[int, Any]) -> PipelineLayout:
        pipe = self._ref()
        return PipelineLayout(memo.get(id(pipe), pipe))


def pipeline_layout(pipe: Any) -> BatchLayout:
    """:class:`PipelineLayout` of ``pipe``."""
    return PipelineLayout(pipe)


class TimestepGate:
    """Whether the identity applies at the step a UNet is running, from ``start``/``end`` in ``[0, 1]``.

    :meth:`record` (installed as a forward pre-hook on the UNet's ``time_proj``) stores, for the
    calling thread, whether the timestep lies in ``[(1 - end) * (T - 1), (1 - start) * (T - 1)]``;
    :meth:`active` reads it. Threads do not see each other's record, so one gated UNet can run
    several generations at once. The first timestep of the batch decides (pipelines run one
    timestep per call). Raises ``ValueError`` unless ``0 <= start <= end <= 1``.

    One gate is the channel between a clone's ``time_proj`` and its processors, so copies of the
    clone's modules share it (``__cow_shared__``): a copy of the gate would record steps no processor reads.
    """

    __cow_shared__ = True

    def __init__(self, start: float, end: float, num_train_timesteps: int = 1000) -> None:
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"start and end must satisfy 0 <= start <= end <= 1, got start={start}, end={end}"
            )
        self.start, self.end = float(start), float(end)
        self._num_train_timesteps = int(num_train_timesteps)
        last = num_train_timesteps - 1
        self._high, self._low = (1.0 - self.start) * last, (1.0 - self.end) * last
        self._local = threading.local()

    @property
    def always(self) -> bool:
        """True when the window is the whole schedule (no gate is needed)."""
        return self.start == 0.0 and self.end == 1.0

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook for ``time_proj``: remember whether ``args[0]`` (the timesteps) is in the window.

        Eager: one host read of the first timestep per UNet call, kept per thread. Under
        ``torch.compile`` the window is a 0-d bool tensor (no host sync, no graph break), kept on
        the gate: a compiled gated UNet runs one generation at a time.
        """
        timestep = args[0].detach().flatten()[0]
        if torch.compiler.is_compiling():
            self._traced = (timestep >= self._low) & (timestep <= self._high)
            return
        value = float(timestep.item())
        self._local.active = self._low <= value <= self._high

    def active(self) -> bool:
        """Whether the step this thread's UNet is running is in the window (``RuntimeError`` if no step was seen)."""
        active = getattr(self._local, "active", None)
        if active is None:
            raise RuntimeError(
                "InstantID's start/end gate saw no timestep in this thread: its processors ran without the UNet's "
                "time_proj (which records the step) running first. Call the whole UNet these processors were "
                "installed on, or use start=0, end=1"
            )
        return bool(active)

    def traced(self) -> Tensor:
        """Under ``torch.compile``: the 0-d bool tensor :meth:`record` traced for this call."""
        return self._traced

    def __reduce__(self) -> tuple[Any, ...]:
        return (TimestepGate, (self.start, self.end, self._num_train_timesteps))


class OwnerThreadError(RuntimeError):
    """A UNet with InstantID processors installed in place was run from a thread other than the one that installed them."""


class IdentityAttnProcessor:
    """Cross-attention with InstantID's identity term, from precomputed keys and values.

    ``kv`` holds this layer's identity keys/values (:class:`instantid.attention.IdentityKV`),
    ``weight`` its multiplier (already shaped by the weight type), ``layout`` tells the batch's
    conditional chunks, ``gate`` (optional) the step window. ``owner`` (a thread id) makes every
    call from another thread raise :class:`OwnerThreadError`: in-place hooks set it so that a
    second thread cannot run one identity's processors by mistake.

    Shares ``kv`` with every other holder; holds no weight of the adapter.
    """

    def __init__(
        self,
        kv: IdentityKV,
        weight: float,
        layout: BatchLayout,
        *,
        gate: TimestepGate | None = None,
        embeds_scaling: str = "V only",
        owner: int | None = None,
    ) -> None:
        if embeds_scaling not in EMBEDS_SCALINGS:
            raise ValueError(
                f"unknown embeds scaling {embeds_scaling!r}; expected one of {', '.join(EMBEDS_SCALINGS)}"
            )
        self.kv = kv
        self.weight = float(weight)
        self.layout = layout
        self.gate = gate
        self.embeds_scaling = embeds_scaling
        self.owner = owner
        self.scale = 1.0

    def __repr__(self) -> str:
        return (
            f"IdentityAttnProcessor(weight={self.weight:g}, scale={self.scale:g}, tokens={self.kv.k.shape[2]}, "
            f"width={self.kv.k.shape[-1]})"
        )

    def _check_thread(self) -> None:
        if self.owner is None:  # no thread read at all: torch.compile traces this without a break
            return
        caller = threading.get_ident()
        if caller != self.owner:
            raise OwnerThreadError(
                f"this UNet has InstantID processors installed in place by instantid_hooks() in thread {self.owner}, "
                f"and thread {caller} ran it: that would mix identities. Use apply_instantid() for a copy-on-write "
                "UNet per identity (they run concurrently), or run the UNet inside the hooks' thread only"
            )

    def identity_term(self, query: Tensor, heads: int) -> Tensor | None:
        """The term to add to the attention output before ``to_out`` (``None`` when off at this step).

        Scaled by ``weight * scale`` (``scale``: :meth:`set_scale`, diffusers' ``set_ip_adapter_scale``).
        """
        weight = self.weight * self.scale
        if weight == 0.0:
            return None
        compiling = self.gate is not None and torch.compiler.is_compiling()
        if self.gate is not None and not compiling and not self.gate.active():
            return None
        term = identity_attention(
            query,
            self.kv,
            heads=heads,
            weight=weight,
            cond_or_uncond=self.layout(),
            embeds_scaling=self.embeds_scaling,
        )
        if compiling:
            assert self.gate is not None
            term = term * self.gate.traced().to(term.dtype)
        return term

    def set_scale(self, scale: float) -> None:
        """Multiply this layer's identity term by ``scale`` (1.0 restores the weight it was made with)."""
        self.scale = _checked_scale(scale)

    def output_term(self, attn: Any, hidden_states: Tensor, temb: Tensor | None = None) -> Tensor | None:
        """What the identity adds to the output of ``attn`` (an ``Attention`` module) for ``hidden_states``.

        For composing with another processor (:class:`instantid.diffusers.compose.ComposedIdentityProcessor`):
        the query is computed again from ``attn.to_q`` and the term goes through ``to_out``'s linear
        map without its bias (the other processor's output already holds the bias).
        """
        hidden_states, image_shape = _as_tokens(attn, hidden_states, temb)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        term = self.identity_term(query, attn.heads)
        if term is None:
            return None
        out = F.linear(term.to(query.dtype), attn.to_out[0].weight)
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        result: Tensor = out / attn.rescale_output_factor
        return result

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        """diffusers' processor protocol: ``attn`` is the ``Attention`` module; returns its output."""
        self._check_thread()
        residual = hidden_states
        hidden_states, image_shape = _as_tokens(attn, hidden_states, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        term = self.identity_term(query, attn.heads)
        if term is not None:
            out = out + term

        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        result: Tensor = out / attn.rescale_output_factor
        return result


def _as_tokens(attn: Any, hidden_states: Tensor, temb: Tensor | None) -> tuple[Tensor, torch.Size | None]:
    """``hidden_states`` after ``attn``'s spatial norm, as ``[B, tokens, C]``; the ``[B, C, H, W]`` shape to
    restore when it came as an image, else ``None`` (diffusers' processors' opening steps)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim != 4:
        return hidden_states, None
    batch, channel, height, width = hidden_states.shape
    return hidden_states.view(batch, channel, height * width).transpose(1, 2), hidden_states.shape


def _checked_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(
            f"an InstantID scale must be a number (0 turns the identity off, 1 keeps its weight); got "
            f"{type(scale).__name__} {scale!r}"
        )
    return float(scale)
