"""The pipeline view ``apply_instantid`` returns: the base pipeline's class, its own copy-on-write components.

A view is an instance of a subclass of the base pipeline's class (named as it, ``isinstance``
checks pass) with :class:`InstantIDView`'s methods first. What it holds:

- ``unet``: the identity's UNet clone (:func:`instantid.diffusers.pipeline.identity_unet`).
- every other model component (text encoders, VAE, ControlNet, image encoder): a
  :class:`cow_model.LazyClonedModel` of the base's (no tensor copied): ``vae.enable_tiling()``,
  attention slicing, LoRA and PEFT calls made through the view act on the view alone, or raise
  ``SharedWeightsError`` when they would write a shared weight in place.
- ``controlnet``: that clone behind :class:`~instantid.diffusers.pipeline.FaceTokensControlNet`
  (IdentityNet reads the face tokens); assigning ``view.controlnet = ...`` (a ControlNet or a
  ``MultiControlNetModel``) wraps the new one the same way.
- tokenizers: copies (fast tokenizers keep truncation state: threads sharing one race);
  the scheduler: a new instance of the same config; the config dict and hook lists: its own.

Identity controls, as diffusers' IP-Adapter API names them: :meth:`~InstantIDView.set_ip_adapter_scale`
(a number or diffusers' per-block dict) and, per call, ``ip_adapter_scale=``, and
``image_embeds=`` / ``ip_adapter_image_embeds=`` (a face embedding: that call runs another identity
with the view's options). Model CPU offload keeps the view's hooks on the view's components and
places the shared weights by moving the base's modules (clones follow); sequential offload is
refused. ``save_pretrained`` warns that the identity is not saved. Views pickle and deep-copy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cow_model import LazyClonedModel
from instantid.diffusers.compose import identity_of
from instantid.diffusers.identity import DiffusersIdentity
from instantid.weights import InstantIDWeights

__all__ = ["IdentityNotSavedWarning", "InstantIDView", "ViewIdentity", "is_view", "view_class"]

logger = logging.getLogger(__name__)


class IdentityNotSavedWarning(UserWarning):
    """A save of an InstantID view or clone wrote the base model's weights without the identity."""


IDENTITY_NOT_SAVED = (
    "the InstantID identity is not saved: the state dict and save_pretrained of an InstantID view or UNet clone "
    "hold the base model's weights only (the identity lives in attention processors). Keep the face embedding "
    "(or image) and the options, and call instantid.diffusers.apply_instantid again after loading"
)


def warn_identity_not_saved(module: nn.Module, state_dict: Any, prefix: str, local_metadata: Any) -> None:
    """State-dict hook of an InstantID UNet clone: :class:`IdentityNotSavedWarning`."""
    warnings.warn(IDENTITY_NOT_SAVED, IdentityNotSavedWarning, stacklevel=3)


@dataclass
class ViewIdentity:
    """What a view needs to run another identity with the same settings (per-call ``image_embeds``)."""

    adapter: InstantIDWeights
    options: dict[str, Any]
    identitynet: bool
    identity: DiffusersIdentity


_CLASSES: dict[type, type] = {}


def is_view(pipe: Any) -> bool:
    return isinstance(pipe, InstantIDView)


def view_class(pipeline_class: type) -> type:
    """The view class of ``pipeline_class`` (made once; named as it)."""
    if issubclass(pipeline_class, InstantIDView):
        return pipeline_class
    cls = _CLASSES.get(pipeline_class)
    if cls is None:
        namespace = {
            "__module__": pipeline_class.__module__,
            "__qualname__": pipeline_class.__qualname__,
            "__doc__": pipeline_class.__doc__,
        }
        cls = _CLASSES.setdefault(pipeline_class, type(pipeline_class.__name__, (InstantIDView, pipeline_class), namespace))
    return cls


def _new_view(pipeline_class: type) -> Any:
    return object.__new__(view_class(pipeline_class))


def plain_model(module: nn.Module) -> nn.Module:
    """The module whose tensors ``module`` (a clone, or a clone of a clone) shares; ``module`` itself if plain."""
    while isinstance(module, LazyClonedModel):
        module = module.base
    return module


def place(module: Any, device: torch.device | str) -> None:
    """Put ``module`` on ``device``: for a clone, the base's module moves (clones follow), then the clone's own tensors."""
    target = getattr(module, "__wrapped__", module)  # a FaceTokensControlNet
    plain = plain_model(target)
    if plain is not target:
        plain.to(device)
        target._cow.follow()  # take the base's new buffer objects now, before this forward runs
    target.to(device)


def _offload_hook(execution_device: torch.device, prev_module_hook: Any) -> Any:
    from accelerate.hooks import CpuOffload

    class ViewOffload(CpuOffload):
        """accelerate's model offload for a view's component: placement by :func:`place`."""

        def init_hook(self, module: nn.Module) -> nn.Module:
            place(module, "cpu")
            return module

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            from accelerate.utils import send_to_device

            if self.prev_module_hook is not None:
                self.prev_module_hook.offload()
            place(module, self.execution_device)
            return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    return ViewOffload(execution_device=execution_device, prev_module_hook=prev_module_hook)


class InstantIDView:
    """Methods of a pipeline view (module doc); mixed in before the pipeline's class."""

    _instantid: ViewIdentity

    # -- the identity's scale ------------------------------------------------------------------

    def _identity_processors(self) -> dict[str, Any]:
        unet: Any = self.__dict__["unet"]
        found = {key: identity_of(p) for key, p in unet.attn_processors.items()}
        return {key: p for key, p in found.items() if p is not None}

    def _scales_for(self, scale: Any) -> dict[str, float]:
        """Each identity layer's scale from a number or diffusers' per-block dict (``set_ip_adapter_scale``)."""
        processors = self._identity_processors()
        if isinstance(scale, list):
            if len(scale) != 1:
                raise ValueError(
                    f"an InstantID view has one identity adapter; give one scale (a number or a per-block dict), "
                    f"got a list of {len(scale)}"
                )
            scale = scale[0]
        if isinstance(scale, Mapping):
            from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

            try:
                expanded = _maybe_expand_lora_scales(self.__dict__["unet"], [dict(scale)], default_scale=0.0)[0]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"bad per-block InstantID scale {scale!r}: {error}. Expected diffusers' set_ip_adapter_scale "
                    "form, e.g. {'up': {'block_0': [0.0, 1.0, 0.0]}} (blocks not named get 0)"
                ) from None
            return {
                key: float(next((s for prefix, s in expanded.items() if key.startswith(prefix)), 0.0))
                for key in processors
            }
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(
                "ip_adapter_scale / set_ip_adapter_scale take a number (0 turns the identity off) or diffusers' "
                f"per-block dict such as {{'up': {{'block_0': [0.0, 1.0, 0.0]}}}}; got {type(scale).__name__}"
            )
        return dict.fromkeys(processors, float(scale))

    def set_ip_adapter_scale(self, scale: Any) -> None:
        """Scale the identity (diffusers' IP-Adapter API): a number, or a per-block dict as diffusers takes it.

        ``0`` turns the identity's attention off (IdentityNet still reads the face tokens;
        ``controlnet_conditioning_scale=0`` turns that half off). Only this view changes.
        Raises ``TypeError`` / ``ValueError`` for anything else.
        """
        processors = self._identity_processors()
        for key, value in self._scales_for(scale).items():
            processors[key].set_scale(value)

    @contextlib.contextmanager
    def _scaled(self, scale: Any) -> Iterator[None]:
        processors = self._identity_processors()
        saved = {key: p.scale for key, p in processors.items()}
        self.set_ip_adapter_scale(scale)
        try:
            yield
        finally:
            for key, value in saved.items():
                processors[key].set_scale(value)

    # -- calling -------------------------------------------------------------------------------

    def __call__(
        self,
        *args: Any,
        ip_adapter_scale: Any = None,
        image_embeds: Any = None,
        ip_adapter_image_embeds: Any = None,
        **kwargs: Any,
    ) -> Any:
        """The pipeline's ``__call__``, plus InstantID's per-call arguments.

        ``ip_adapter_scale``: the identity's scale for this call (as :meth:`set_ip_adapter_scale`).
        ``image_embeds`` (InstantX's name) or ``ip_adapter_image_embeds`` (diffusers'; a list of
        one): a face for this call instead of the view's (anything ``apply_instantid`` takes as
        ``face``), run with the view's adapter and options.
        """
        if image_embeds is not None and ip_adapter_image_embeds is not None:
            raise TypeError("give the face as image_embeds= or as ip_adapter_image_embeds=, not both")
        face = image_embeds if image_embeds is not None else ip_adapter_image_embeds
        if isinstance(face, (list, tuple)) and ip_adapter_image_embeds is not None:
            if len(face) != 1:
                raise ValueError(
                    f"ip_adapter_image_embeds for an InstantID view is a list of one face embedding, got {len(face)}"
                )
            face = face[0]
        if face is not None:
            from instantid.diffusers.pipeline import apply_instantid

            carried = self._instantid
            other = apply_instantid(self, carried.adapter, face, identitynet=carried.identitynet, **carried.options)
            return other(*args, ip_adapter_scale=ip_adapter_scale, **kwargs)
        if ip_adapter_scale is None:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        with self._scaled(ip_adapter_scale):
            return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "controlnet" and "_instantid" in self.__dict__ and value is not None:
            from instantid.diffusers.pipeline import FaceTokensControlNet, face_tokens_controlnet

            if self._instantid.identitynet and not isinstance(value, FaceTokensControlNet):
                if not isinstance(value, LazyClonedModel):
                    value = LazyClonedModel(value)
                value = face_tokens_controlnet(value, self._instantid.identity, layout_of=self)
        super().__setattr__(name, value)

    # -- offload -------------------------------------------------------------------------------

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model CPU offload, for a view: hooks on the view's own components only.

        Each component moves to ``device`` when it runs and back to the CPU when the next one
        does, as diffusers does; the weights a component shares with the base pipeline move by
        moving the base's module (every clone of it follows), so run views with offload one at a
        time. The base pipeline's and other views' components get no hook.
        """
        from accelerate.hooks import UserCpuOffloadHook, add_hook_to_module
        from diffusers.utils.torch_utils import get_device

        self.remove_all_hooks()  # type: ignore[attr-defined]
        if device is None:
            device = get_device()
            if device == "cpu":
                raise RuntimeError("`enable_model_cpu_offload` requires accelerator, but not found")
        torch_device = torch.device(device)
        if gpu_id is not None and torch_device.index is not None:
            raise ValueError(f"pass gpu_id or a device with an index, not both (gpu_id={gpu_id}, device={device})")
        self._offload_gpu_id = gpu_id or torch_device.index or getattr(self, "_offload_gpu_id", 0)
        torch_device = torch.device(f"{torch_device.type}:{self._offload_gpu_id}")
        self._offload_device = torch_device
        components = {k: v for k, v in self.components.items() if isinstance(v, nn.Module)}  # type: ignore[attr-defined]
        hooks: list[Any] = []
        previous = None
        order = [name for name in self.model_cpu_offload_seq.split("->") if name in components]  # type: ignore[attr-defined]
        for name in [*order, *(name for name in components if name not in order)]:
            model = components[name]
            if name in getattr(self, "_exclude_from_cpu_offload", []):
                place(model, torch_device)
                continue
            hook = _offload_hook(torch_device, previous if name in order else None)
            add_hook_to_module(model, hook, append=True)
            user_hook = UserCpuOffloadHook(model, hook)
            hooks.append(user_hook)
            if name in order:
                previous = user_hook
        self._all_hooks = hooks

    def enable_sequential_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        """Refused on a view: it moves every shared weight to ``meta``, taking it from the base and every view."""
        raise RuntimeError(
            "enable_sequential_cpu_offload() on an InstantID view would move the weights it shares with the base "
            "pipeline to the meta device (the base and every other view could no longer run). Use "
            "view.enable_model_cpu_offload(), or call enable_sequential_cpu_offload() on the base pipeline before "
            "apply_instantid (views follow the base)"
        )

    # -- LoRA ----------------------------------------------------------------------------------

    def load_lora_weights(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``load_lora_weights`` with the text encoders' layers going into this view's clones.

        diffusers injects text-encoder LoRA layers with library functions that edit the module
        they are handed; here that runs inside each text-encoder clone's ``patch_block("")``, so
        the layers are the view's own (the UNet's go through its scoped PEFT methods).
        """
        encoders = [
            module
            for name, module in self.__dict__.items()
            if name.startswith("text_encoder") and isinstance(module, LazyClonedModel)
        ]
        return _inside_patches(encoders, lambda: super(InstantIDView, self).load_lora_weights(*args, **kwargs))  # type: ignore[misc]

    # -- saving, copying -----------------------------------------------------------------------

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """The pipeline's ``save_pretrained``, with :class:`IdentityNotSavedWarning`: the identity is not saved."""
        warnings.warn(IDENTITY_NOT_SAVED, IdentityNotSavedWarning, stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IdentityNotSavedWarning)  # once for the view, not per component
            return super().save_pretrained(*args, **kwargs)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        base_class = next(c for c in type(self).__mro__[1:] if not issubclass(c, InstantIDView))
        return (_new_view, (base_class,), dict(self.__dict__))


def _inside_patches(clones: list[LazyClonedModel], fn: Any) -> Any:
    """``fn()`` run inside ``clone.patch_block("")`` of every clone in ``clones`` (nested)."""
    if not clones:
        return fn()
    result: list[Any] = []

    def patch(_: nn.Module) -> None:
        result.append(_inside_patches(clones[1:], fn))

    clones[0].patch_block("", patch)
    return result[0]


def copy_attributes(view: Any) -> None:
    """Give ``view`` its own copies of the lists, dicts and sets it got from ``copy.copy`` of a pipeline."""
    for name, value in list(view.__dict__.items()):
        if isinstance(value, (list, dict, set)):
            view.__dict__[name] = copy.copy(value)


def install_lazy_hooks(model: nn.Module) -> None:
    """Install on ``model`` the output-capturing hooks transformers (>= 5) installs at a model's first forward.

    transformers installs them on the submodules of the model it is called on and marks only
    that object: a clone called first would put them on the submodules it shares with the base,
    and the base's own first call would install them a second time (``hidden_states`` then holds
    every layer twice). Installed on the base before cloning, the clone inherits the mark.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    if isinstance(model, PreTrainedModel):
        maybe_install_capturing_hooks(model)


def own_components(view: Any, pipe: Any, skip: tuple[str, ...]) -> None:
    """Clones of ``pipe``'s model components and copies of its tokenizers on ``view`` (``skip``: set by the caller)."""
    from instantid.diffusers.pipeline import plain_controlnet

    for name, component in dict(pipe.components).items():
        if name in skip or component is None:
            continue
        if isinstance(component, nn.Module):
            install_lazy_hooks(component)
            view.__dict__[name] = LazyClonedModel(plain_controlnet(component))
        elif "Tokenizer" in type(component).__name__:
            view.__dict__[name] = copy.deepcopy(component)
