"""``instantid_hooks``: InstantID installed in place for the duration of a ``with`` block, no clone.

For users who want one identity at a time and no copy at all: the identity's processors go
on the UNet's own cross-attention modules (and, for a start/end window, a step-recording
pre-hook on its ``time_proj``; for a pipeline with a ControlNet, the pipeline's ``controlnet``
becomes a :class:`FaceTokensControlNet`). On exit, normal or by exception, everything is put
back exactly: each attention module's processor attribute and child-module dict, the hook
dict, the pipeline's ``controlnet`` attribute and config dict (the same objects as before).

Thread safety: the installed processors remember the thread that entered the block. A call
of the UNet from any other thread while the block is active raises
:class:`~instantid.diffusers.processor.OwnerThreadError` instead of mixing that thread's
generation with this identity; entering a second block on a UNet that has one active raises
``RuntimeError``. For concurrent identities use :func:`instantid.diffusers.apply_instantid`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from diffusers import DiffusionPipeline
from torch import nn
from typing_extensions import Unpack

from cow_model import LazyClonedModel
from cow_model.diffusers import attention_paths
from instantid.diffusers.identity import FaceInput, IdentityOptions, check_adapter
from instantid.diffusers.pipeline import face_tokens_controlnet, prepare_for
from instantid.diffusers.processor import IdentityAttnProcessor
from instantid.weights import InstantIDWeights

__all__ = ["instantid_hooks"]

_INSTALL_LOCK = threading.Lock()
_MISSING = object()


def _install_processor(attn: nn.Module, processor: Any) -> Callable[[], None]:
    """Set ``processor`` on ``attn`` in place; return the function that restores the previous state exactly."""
    saved_attr = attn.__dict__.get("processor", _MISSING)
    saved_modules = dict(attn._modules)
    set_processor: Any = attn.set_processor
    set_processor(processor)

    def restore() -> None:
        attn._modules.clear()
        attn._modules.update(saved_modules)
        if saved_attr is _MISSING:
            attn.__dict__.pop("processor", None)
        else:
            attn.__dict__["processor"] = saved_attr

    return restore


def _swap_pipeline_attribute(pipe: Any, name: str, value: Any) -> Callable[[], None]:
    """``setattr(pipe, name, value)`` (diffusers re-registers it in the config); the restore puts back both objects."""
    saved_value, saved_config = pipe.__dict__[name], pipe.__dict__["_internal_dict"]
    setattr(pipe, name, value)

    def restore() -> None:
        pipe.__dict__[name] = saved_value
        pipe.__dict__["_internal_dict"] = saved_config

    return restore


def _check_not_hooked(unet: Any) -> None:
    owners = {
        p.owner
        for p in unet.attn_processors.values()
        if isinstance(p, IdentityAttnProcessor) and p.owner is not None
    }
    if owners:
        raise RuntimeError(
            f"this UNet already has InstantID processors installed in place by instantid_hooks() in thread "
            f"{owners.pop()}; leave that block first, or use apply_instantid() for a copy-on-write UNet per identity"
        )


@contextmanager
def instantid_hooks(
    pipe_or_unet: Any,
    adapter: InstantIDWeights,
    face: FaceInput,
    *,
    identitynet: bool = True,
    cfg: bool = True,
    num_train_timesteps: int = 1000,
    **options: Unpack[IdentityOptions],
) -> Iterator[Any]:
    """Install InstantID on ``pipe_or_unet`` in place for the block; yields ``pipe_or_unet`` itself.

    Options as :func:`instantid.diffusers.apply_instantid`, with the same results. Restores the
    previous processors, hooks and pipeline attributes exactly on exit, exceptions included.
    Raises ``TypeError`` for a copy-on-write clone (in-place changes would reach the modules it
    shares with its base: use ``apply_instantid`` on it), ``RuntimeError`` when the UNet has an
    active block already, and what ``apply_instantid`` raises for bad input (before anything
    is installed).
    """
    check_adapter(adapter)
    is_pipeline = isinstance(pipe_or_unet, DiffusionPipeline)
    unet: Any = pipe_or_unet.unet if is_pipeline else pipe_or_unet
    if isinstance(unet, LazyClonedModel):
        raise TypeError(
            "instantid_hooks installs processors in place, which on a copy-on-write clone would reach the modules "
            "it shares with its base; use apply_instantid() on the clone instead"
        )
    if not isinstance(unet, nn.Module):
        raise TypeError(
            f"instantid_hooks takes a diffusers pipeline or UNet; got a {type(pipe_or_unet).__name__}"
        )
    identity = prepare_for(
        pipe_or_unet,
        adapter,
        face,
        options=options,
        cfg=cfg,
        num_train_timesteps=num_train_timesteps,
        owner=threading.get_ident(),
    )
    modules = dict(unet.named_modules())
    paths = attention_paths(unet)
    restores = ExitStack()
    with _INSTALL_LOCK:
        try:
            _check_not_hooked(unet)
            for key, processor in identity.processors.items():
                restores.callback(_install_processor(modules[paths[key]], processor))
            if identity.gate is not None:
                time_proj: Any = unet.time_proj
                restores.callback(time_proj.register_forward_pre_hook(identity.gate.record).remove)
            if is_pipeline and identitynet and getattr(pipe_or_unet, "controlnet", None) is not None:
                proxy = face_tokens_controlnet(pipe_or_unet.controlnet, identity, layout_of=pipe_or_unet)
                restores.callback(_swap_pipeline_attribute(pipe_or_unet, "controlnet", proxy))
        except BaseException:
            restores.close()
            raise
    try:
        yield pipe_or_unet
    finally:
        with _INSTALL_LOCK:
            restores.close()
