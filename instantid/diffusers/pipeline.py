"""``apply_instantid``: a copy-on-write UNet per identity, and a pipeline view that uses it.

What is shared and what is copied:

- The UNet: a :class:`cow_model.LazyClonedModel` of the pipeline's UNet with the identity's
  processors on its cross-attention modules (and, for a start/end window, a step-recording
  hook on a private copy of ``time_proj``). Every weight is shared; the clone owns only the
  path-copied module shells and the identity's keys/values. The base UNet is never mutated.
  Its identity layers keep the identity when diffusers replaces their processors
  (:mod:`instantid.diffusers.compose`); its ``state_dict()`` (and so ``save_pretrained``) warns
  :class:`~instantid.diffusers.view.IdentityNotSavedWarning`.
- The pipeline view (:mod:`instantid.diffusers.view`): an instance of the pipeline's class with
  its own attribute dict, copy-on-write clones of the other model components, copies of the
  tokenizers, a new scheduler instance of the same config, and a ``controlnet`` that hands the
  face tokens to the ControlNet.
- IdentityNet: InstantID's ControlNet takes the face tokens as its ``encoder_hidden_states``
  where a stock ControlNet pipeline passes the text; :class:`FaceTokensControlNet` is a
  transparent proxy of the ControlNet (``isinstance`` checks pass) that swaps them in, in the
  pipeline's batch layout (unconditional tokens for the negative half).

A view runs one generation at a time (as any diffusers pipeline: its scheduler is stateful);
views of several identities run concurrently, each from its own thread. Moving a view to
another device or dtype would move the weights it shares: move the base pipeline first, then
apply (or use the view's ``enable_model_cpu_offload``). diffusers' own VAE upcast
(``force_upcast`` with an fp16 VAE) is refused on a view's VAE clone for the same reason: use
an fp32 VAE or upcast the base's.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import wrapt
from diffusers import DiffusionPipeline
from torch import Tensor, nn
from typing_extensions import Unpack

from cow_model import LazyClonedModel
from cow_model.diffusers import attention_paths
from instantid.diffusers.compose import install_identity
from instantid.diffusers.identity import (
    DiffusersIdentity,
    FaceInput,
    IdentityOptions,
    check_adapter,
    prepare_identity,
)
from instantid.diffusers.processor import BatchLayout, TimestepGate, fixed_layout, pipeline_layout
from instantid.diffusers.view import (
    ViewIdentity,
    copy_attributes,
    own_components,
    view_class,
    warn_identity_not_saved,
)
from instantid.weights import InstantIDWeights

__all__ = ["FaceTokensControlNet", "apply_instantid", "identity_unet"]


class FaceTokensControlNet(wrapt.CallableObjectProxy):
    """A ControlNet (or MultiControlNetModel) that receives InstantID's face tokens instead of the text.

    Calls pass through to the wrapped ControlNet with ``encoder_hidden_states`` replaced by the
    face tokens: per chunk of the batch's layout, the conditional or unconditional tokens of
    every identity set (concatenated), repeated over the chunk. In ``guess_mode`` the pipeline
    runs the ControlNet on the conditional half only, so every sample gets the conditional
    tokens. Everything else (attributes, ``isinstance``, config) is the wrapped ControlNet's;
    the wrapped one is never changed.
    """

    def __init__(
        self, controlnet: nn.Module, cond_tokens: Tensor, uncond_tokens: Tensor, layout: BatchLayout
    ) -> None:
        super().__init__(controlnet)
        self._self_args = (cond_tokens, uncond_tokens, layout)
        self._self_tokens = (cond_tokens.flatten(0, 1).unsqueeze(0), uncond_tokens.flatten(0, 1).unsqueeze(0))
        self._self_layout = layout

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (FaceTokensControlNet, (self.__wrapped__, *self._self_args))

    def __deepcopy__(self, memo: dict[int, Any]) -> FaceTokensControlNet:
        return FaceTokensControlNet(*copy.deepcopy((self.__wrapped__, *self._self_args), memo))

    def _self_face_context(self, text: Tensor, guess_mode: bool) -> Tensor:
        codes = (0,) if guess_mode else tuple(self._self_layout())
        if text.shape[0] % len(codes):
            raise ValueError(
                f"a ControlNet batch of {text.shape[0]} does not split into {len(codes)} chunks (cond_or_uncond={codes})"
            )
        chunk = text.shape[0] // len(codes)
        parts = [self._self_tokens[1 if code == 1 else 0].expand(chunk, -1, -1) for code in codes]
        return torch.cat(parts).to(device=text.device, dtype=text.dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        guess_mode = bool(kwargs.get("guess_mode", False))
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = self._self_face_context(
                kwargs["encoder_hidden_states"], guess_mode
            )
        elif len(args) >= 3:
            args = (*args[:2], self._self_face_context(args[2], guess_mode), *args[3:])
        return self.__wrapped__(*args, **kwargs)


def plain_controlnet(controlnet: Any) -> Any:
    """``controlnet`` without a face-token proxy (a view of a view hands the new identity's tokens to the real one)."""
    while isinstance(controlnet, FaceTokensControlNet):
        controlnet = controlnet.__wrapped__
    return controlnet


def _add_gate(time_proj: nn.Module, gate: TimestepGate) -> None:
    time_proj.register_forward_pre_hook(gate.record)


def _warn_on_save(root: nn.Module) -> None:
    root._register_state_dict_hook(warn_identity_not_saved)


class BaseTreeCheck:
    """Forward pre-hook of an InstantID clone: refuse to run once the base replaced a child of a module the clone copied.

    The clone's copies of the identity layers (and their ancestors) hold their own child dicts:
    a module the base puts in their place later (e.g. PEFT's LoRA layers on ``attn2.to_q``,
    loaded into the base after the view was made) would reach the clone only partly. Checked
    per call in eager mode (a dict comparison per copied module); skipped under ``torch.compile``.
    Copies and pickles of the clone carry no check (they are plain models).
    """

    def __init__(self, base: nn.Module, paths: list[str]) -> None:
        modules = dict(base.named_modules())
        self._children = [(path, modules[path], dict(modules[path]._modules)) for path in paths]

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        for path, original, children in self._children:
            if original._modules != children:
                changed = sorted(k for k in {*children, *original._modules} if children.get(k) is not original._modules.get(k))
                raise RuntimeError(
                    f"the base UNet's module {path or '(root)'} changed its children {changed[:5]} after this InstantID "
                    "clone was made (e.g. a LoRA loaded into the base): the clone would follow it only partly. Make the "
                    "change before apply_instantid (apply again now), or load the LoRA through the view"
                )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_no_check, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _no_check()


def _no_check() -> Any:
    return _skip


def _skip(module: nn.Module, args: Any) -> None:
    return None


def identity_unet(unet: nn.Module, identity: DiffusersIdentity) -> LazyClonedModel:
    """A copy-on-write clone of ``unet`` carrying ``identity``'s processors (and gate hook); ``unet`` is untouched."""
    clone = LazyClonedModel(unet)
    paths = attention_paths(clone)
    for key, processor in identity.processors.items():
        clone.patch_block(paths[key], functools.partial(install_identity, processor=processor))
    gate = identity.gate
    if gate is not None:
        clone.patch_block("time_proj", functools.partial(_add_gate, gate=gate))
    clone.patch_block("", _warn_on_save)
    check = BaseTreeCheck(clone.base, clone.private_paths)

    def hook_check(root: nn.Module) -> None:
        root.register_forward_pre_hook(check)

    clone.patch_block("", hook_check)
    return clone


def _pipeline_view(pipe: Any) -> Any:
    """A view of ``pipe`` (module doc of :mod:`instantid.diffusers.view`), without its UNet and identity yet."""
    view = copy.copy(pipe)
    view.__class__ = view_class(type(pipe))
    copy_attributes(view)
    own_components(view, pipe, skip=("unet", "scheduler"))
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        view.__dict__["scheduler"] = type(scheduler).from_config(scheduler.config)
    return view


def prepare_for(
    pipe_or_unet: Any,
    adapter: InstantIDWeights,
    face: FaceInput,
    *,
    options: IdentityOptions,
    layout_of: Any = None,
    cfg: bool = True,
    num_train_timesteps: int = 1000,
    owner: int | None = None,
) -> DiffusersIdentity:
    """:func:`prepare_identity` for a pipeline or a UNet.

    For a pipeline, the batch layout follows ``layout_of`` (the pipeline, or a view of it, that
    will run) and the step window its scheduler's ``num_train_timesteps``; for a UNet, ``cfg``
    and ``num_train_timesteps`` say so.
    """
    if isinstance(pipe_or_unet, DiffusionPipeline):
        pipe: Any = pipe_or_unet
        return prepare_identity(
            pipe.unet,
            adapter,
            face,
            layout=pipeline_layout(layout_of if layout_of is not None else pipe),
            num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps),
            owner=owner,
            **options,
        )
    return prepare_identity(
        pipe_or_unet,
        adapter,
        face,
        layout=fixed_layout(cfg),
        num_train_timesteps=num_train_timesteps,
        owner=owner,
        **options,
    )


def face_tokens_controlnet(controlnet: Any, identity: DiffusersIdentity, *, layout_of: Any) -> FaceTokensControlNet:
    """``controlnet`` fed ``identity``'s face tokens, in the batch layout of ``layout_of`` (a pipeline)."""
    return FaceTokensControlNet(
        plain_controlnet(controlnet),
        identity.cond_tokens,
        identity.uncond_tokens,
        pipeline_layout(layout_of),
    )


def apply_instantid(
    pipe_or_unet: Any,
    adapter: InstantIDWeights,
    face: FaceInput,
    *,
    identitynet: bool = True,
    cfg: bool = True,
    num_train_timesteps: int = 1000,
    **options: Unpack[IdentityOptions],
) -> Any:
    """InstantID on a copy-on-write UNet: returns a pipeline view for a pipeline, a UNet clone for a UNet.

    ``options`` (:class:`~instantid.diffusers.identity.IdentityOptions`): ``weight=0.8``,
    ``weight_type="linear"``, ``start=0.0``, ``end=1.0``, ``noise=0.0``, ``embeds_scaling="V only"``,
    ``face_analysis=None``, ``combine="average"``.

    ``face``: a 512-d embedding, ``FaceResult``(s), or image(s) with ``face_analysis`` (see
    :func:`instantid.diffusers.identity.face_embedding`; ``combine`` merges several).
    ``weight`` (a number, a per-transformer dict or a per-layer tensor) and ``weight_type`` as
    in :func:`instantid.weight_schedules.layer_weights`; ``start``/``end``: the fraction of the
    denoising schedule where the identity applies; ``noise``: noise in the unconditional
    embedding; ``embeds_scaling``: see :func:`instantid.attention.identity_attention`.

    For a pipeline (any ``DiffusionPipeline`` with a ``unet``): the batch layout follows the
    pipeline's classifier-free guidance, the step window uses its scheduler's
    ``num_train_timesteps``, and with ``identitynet`` its ControlNet (if any) receives the
    face tokens. Call the view as the pipeline (e.g. ``image=`` the keypoint image from
    ``instantid.keypoints.draw_kps``). For a UNet: ``cfg`` says whether callers pass diffusers'
    classifier-free guidance batch (negative half first) or conditional samples only.

    The base pipeline and UNet are never mutated. Raises ``ValueError`` for a UNet without
    cross-attention, an adapter whose layers do not match the UNet's, a face embedding of the
    wrong size, and bad weights or windows; ``TypeError`` for an argument that is neither a
    pipeline nor a UNet.
    """
    check_adapter(adapter)
    if isinstance(pipe_or_unet, DiffusionPipeline):
        pipe: Any = pipe_or_unet
        if getattr(pipe, "unet", None) is None:
            raise TypeError(
                f"{type(pipe).__name__} has no UNet; InstantID needs a UNet-based pipeline (SD1.5 or SDXL)"
            )
        view = _pipeline_view(pipe)
        identity = prepare_for(pipe, adapter, face, layout_of=view, options=options)
        view.unet = identity_unet(pipe.unet, identity)
        view.__dict__["_instantid"] = ViewIdentity(adapter, dict(options), identitynet, identity)
        if identitynet and getattr(view, "controlnet", None) is not None:
            view.controlnet = face_tokens_controlnet(view.controlnet, identity, layout_of=view)
        return view
    if isinstance(pipe_or_unet, nn.Module):
        identity = prepare_for(
            pipe_or_unet, adapter, face, cfg=cfg, num_train_timesteps=num_train_timesteps, options=options
        )
        return identity_unet(pipe_or_unet, identity)
    raise TypeError(
        f"apply_instantid takes a diffusers pipeline or UNet; got a {type(pipe_or_unet).__name__}"
    )
