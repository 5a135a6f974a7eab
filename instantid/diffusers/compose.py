"""The identity stays when diffusers replaces the processors of an InstantID clone.

diffusers' processor-replacing methods (``set_attn_processor``, ``set_default_attn_processor``,
``set_attention_slice`` / ``enable_attention_slicing``, ``fuse_qkv_projections``, xformers,
``load_ip_adapter``) all end in ``Attention.set_processor`` on each attention module. On an
InstantID clone each identity layer is the clone's private copy of its ``Attention`` module;
:func:`install_identity` gives that copy the class :class:`IdentityAttention` (a subclass of
its own class, so ``isinstance`` checks pass) whose ``set_processor`` composes whatever is
installed with the layer's identity: a processor without the identity becomes
:class:`ComposedIdentityProcessor` (that processor's output plus the identity term). The base
model's modules keep their class and processors.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from instantid.diffusers.processor import IdentityAttnProcessor

__all__ = ["ComposedIdentityProcessor", "carries_identity", "identity_of", "install_identity"]

_IDENTITY_ATTR = "_instantid_identity"
_CLASSES: dict[type, type] = {}


class ComposedIdentityProcessor:
    """Another attention processor plus the identity term of an :class:`IdentityAttnProcessor`.

    ``inner`` computes the layer as it would alone (sliced, fused, xformers, IP-Adapter ...);
    the identity's term (:meth:`IdentityAttnProcessor.output_term`) is added to its output.
    Equal to the identity processor alone, up to float rounding, when ``inner`` is plain attention.
    """

    def __init__(self, inner: Any, identity: IdentityAttnProcessor) -> None:
        self.inner = inner
        self.identity = identity

    def __repr__(self) -> str:
        return f"ComposedIdentityProcessor({type(self.inner).__name__}, {self.identity!r})"

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        if temb is not None:  # not every processor takes temb (SlicedAttnProcessor does not)
            kwargs["temb"] = temb
        out: Tensor = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        term = self.identity.output_term(attn, hidden_states, temb)
        return out if term is None else out + term


def identity_of(processor: Any) -> IdentityAttnProcessor | None:
    """The :class:`IdentityAttnProcessor` in ``processor`` (itself or composed), else ``None``."""
    if isinstance(processor, IdentityAttnProcessor):
        return processor
    if isinstance(processor, ComposedIdentityProcessor):
        return processor.identity
    return None


def carries_identity(processor: Any) -> bool:
    return identity_of(processor) is not None


class _IdentityAttentionMixin:
    """``set_processor`` keeps this layer's identity (module doc)."""

    def set_processor(self, processor: Any) -> None:
        identity = self.__dict__.get(_IDENTITY_ATTR)
        if identity is not None and not carries_identity(processor):
            processor = ComposedIdentityProcessor(processor, identity)
        elif carries_identity(processor):
            self.__dict__[_IDENTITY_ATTR] = identity_of(processor)
        super().set_processor(processor)  # type: ignore[misc]


def _identity_class(cls: type) -> type:
    """``cls`` with the identity-keeping ``set_processor``; one per class, importable by name (pickle)."""
    if issubclass(cls, _IdentityAttentionMixin):
        return cls
    made = _CLASSES.get(cls)
    if made is None:
        name = f"IdentityAttention_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        made = type(cls.__name__, (_IdentityAttentionMixin, cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, made)
        _CLASSES[cls] = made
    return made


def install_identity(attn: nn.Module, processor: IdentityAttnProcessor) -> None:
    """Make ``attn`` (a clone's private copy of an ``Attention`` module) keep ``processor``'s identity.

    Only for modules the caller owns: the module's class changes (module doc).
    """
    attn.__dict__[_IDENTITY_ATTR] = processor
    attn.__class__ = _identity_class(type(attn))
    attn.set_processor(processor)  # type: ignore[operator]
