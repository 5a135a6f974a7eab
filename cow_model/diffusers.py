"""Attention processors on copy-on-write clones of diffusers models.

diffusers installs attention processors in place: ``unet.set_attn_processor(...)`` or
``attn.set_processor(p)`` change the model every pipeline holding it sees. Here the same
operations are scoped to a :class:`~cow_model.LazyClonedModel`:

- :func:`set_attn_processor` (``clone``, one processor or a dict keyed like
  ``model.attn_processors``) path-copies each named attention module and sets the processor
  on the copy: only those modules and their ancestors are copied, as shells; no tensor is.
- :func:`clone_with_attn_processor` makes the clone and sets the processors in one call.
- :func:`attention_paths` and :func:`cross_attention_keys` list a model's attention modules
  in ``attn_processors`` order (the order diffusers' IP-Adapter checkpoints number layers by).
- Importing this module makes diffusers' and PEFT's in-place methods act on a clone alone
  (``cow_model.register_scoped_method``): called on a clone, each runs diffusers' own code in a
  scope over the clone's tree, so what it changes is copied into the clone and what it would
  write in place into a shared tensor raises ``SharedWeightsError`` naming the method, with the
  clone unchanged. The methods are listed in :data:`SCOPED_METHODS`: processor setters
  (``set_attn_processor`` keeps diffusers' own checks, e.g. its count check on a dict),
  attention slicing, FreeU, fused QKV projections, gradient checkpointing, layerwise casting,
  forward chunking, IP-Adapter and LoRA loading, and PEFT's adapter methods (a LoRA added to a
  clone is that clone's; ``fuse_lora`` writes the base weights in place and is refused).

An ``nn.Module`` processor becomes a child named ``processor`` of the attention module; that
happens on the clone's private copy of the module only. The base model, and every pipeline
holding it, keep their processors and module trees.

diffusers' hook registry (``module._diffusers_hook``, which layerwise casting, group offloading and
the caches install) points back at its module and wraps its ``forward``. Every shell of such a
module gets its own registry (``cow_model.tree.register_shell_attribute``): the same hooks, copied,
chained around the shell's own ``forward``, so a shell runs its own children and processors and a
hook registered on the clone (``clone.enable_group_offload()``) lands on the clone's shells.

Works with any model whose attention modules have diffusers' ``set_processor`` /
``get_processor`` methods (``UNet2DConditionModel``, ``ControlNetModel``, transformers ...);
diffusers itself is not imported here.
"""

from __future__ import annotations

import copy
import difflib
import functools
import types
from collections.abc import Mapping
from typing import Any

from torch import nn

from .clone import LazyClonedModel, register_scoped_method
from .tree import rebind, register_shell_attribute

__all__ = [
    "attention_paths",
    "clone_with_attn_processor",
    "cross_attention_keys",
    "set_attn_processor",
]

_SUFFIX = ".processor"


def attention_paths(model: nn.Module) -> dict[str, str]:
    """``processor key -> module path`` for every attention module of ``model``, in ``attn_processors`` order.

    Keys are diffusers' (``"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"``),
    paths the dotted module paths that ``LazyClonedModel.patch_block`` takes. An attention
    module is one with a ``get_processor`` method, as diffusers defines it.
    """
    return {
        f"{name}{_SUFFIX}": name
        for name, module in model.named_modules()
        if name and callable(getattr(module, "get_processor", None))
    }


def cross_attention_keys(model: nn.Module) -> list[str]:
    """Processor keys of ``model``'s cross-attention modules (``is_cross_attention``), in ``attn_processors`` order.

    For a Stable Diffusion UNet these are the ``attn2`` modules: 16 for SD1.5, 70 for SDXL.
    """
    modules = dict(model.named_modules())
    return [
        key
        for key, path in attention_paths(model).items()
        if getattr(modules[path], "is_cross_attention", False)
    ]


def _unknown_keys(unknown: list[str], valid: list[str]) -> str:
    shown = []
    for key in unknown[:5]:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        shown.append(f"{key!r} (closest: {', '.join(close) or 'none'})")
    return (
        f"{len(unknown)} processor key(s) name no attention module: {'; '.join(shown)}. "
        f"Keys are those of model.attn_processors ({len(valid)} here), e.g. {valid[0] if valid else '(none)'}"
    )


def _set_processor(attn: nn.Module, processor: Any) -> None:
    attn.set_processor(processor)  # type: ignore[operator]


def set_attn_processor(clone: LazyClonedModel, processor: Any | Mapping[str, Any]) -> None:
    """Set attention processors on ``clone`` only, touching only the named modules.

    ``processor`` is one processor, set on every attention module (as diffusers does), or a
    mapping from ``attn_processors`` keys to processors, set on those modules only (a subset is
    allowed; diffusers requires every key). Each named module is path-copied with
    ``clone.patch_block`` and gets the processor through its own ``set_processor``; the base
    model is untouched. A processor object is installed as given, not copied: when the same
    object goes into several clones they share it (and its state).

    Raises ``TypeError`` when ``clone`` is not a ``LazyClonedModel`` (use diffusers'
    ``set_attn_processor`` to change a model in place), ``KeyError`` naming the unknown keys
    and their closest valid ones before anything is changed, and ``ValueError`` when the model
    has no attention module at all.
    """
    if not isinstance(clone, LazyClonedModel):
        raise TypeError(
            f"set_attn_processor scopes processors to a copy-on-write clone; got a {type(clone).__name__}. "
            "Wrap the model with cow_model.LazyClonedModel(model) (or call clone_with_attn_processor), or use "
            "the model's own set_attn_processor to change it in place"
        )
    paths = attention_paths(clone)
    if not paths:
        raise ValueError(
            f"{type(clone).__name__} has no attention modules (modules with diffusers' get_processor/set_processor)"
        )
    if isinstance(processor, Mapping):
        unknown = [key for key in processor if key not in paths]
        if unknown:
            raise KeyError(_unknown_keys(unknown, list(paths)))
        chosen = dict(processor)
    else:
        chosen = dict.fromkeys(paths, processor)
    for key, value in chosen.items():
        clone.patch_block(paths[key], functools.partial(_set_processor, processor=value))


def clone_with_attn_processor(model: nn.Module, processor: Any | Mapping[str, Any]) -> LazyClonedModel:
    """A new ``LazyClonedModel(model)`` with ``processor`` set on it as :func:`set_attn_processor` does.

    ``model`` is never changed; the clone shares every tensor with it.
    """
    clone = LazyClonedModel(model)
    set_attn_processor(clone, processor)
    return clone


SCOPED_METHODS = (
    "set_attn_processor",
    "set_default_attn_processor",
    "set_attention_slice",
    "enable_freeu",
    "disable_freeu",
    "fuse_qkv_projections",
    "unfuse_qkv_projections",
    "enable_gradient_checkpointing",
    "disable_gradient_checkpointing",
    "enable_layerwise_casting",
    "enable_forward_chunking",
    "disable_forward_chunking",
    "set_use_npu_flash_attention",
    "set_use_memory_efficient_attention_xformers",
    "enable_xformers_memory_efficient_attention",
    "disable_xformers_memory_efficient_attention",
    "load_attn_procs",
    "_load_ip_adapter_weights",
    "unload_ip_adapter",
    "add_adapter",
    "set_adapter",
    "set_adapters",
    "delete_adapters",
    "enable_adapters",
    "disable_adapters",
    "enable_lora",
    "disable_lora",
    "fuse_lora",
    "unfuse_lora",
    "unload_lora",
    "load_lora_adapter",
    "compile_repeated_blocks",
    "enable_group_offload",
    "set_attention_backend",
    "reset_attention_backend",
    "enable_npu_flash_attention",
    "enable_xla_flash_attention",
    "disable_xla_flash_attention",
    "set_use_xla_flash_attention",
)
"""Methods of diffusers models (and PEFT's mixins on them) that change the model in place."""

for _name in SCOPED_METHODS:
    register_scoped_method(_name)

_REGISTRY = "_diffusers_hook"


def _rewrapped(wrapper: Any, reference: Any, shell: nn.Module, inner: Any) -> Any:
    """diffusers' ``partial(new_forward, module)`` around a hook, rebuilt around ``reference`` for ``shell``."""
    closure = wrapper.func
    cells = tuple(
        types.CellType(reference) if type(cell.cell_contents).__name__ == "HookFunctionReference" else cell
        for cell in closure.__closure__ or ()
    )
    function = types.FunctionType(closure.__code__, closure.__globals__, closure.__name__, closure.__defaults__, cells)
    return functools.update_wrapper(functools.partial(function, shell), inner)


def _cast_for_forward(hook: Any, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Layerwise casting's ``pre_forward`` on a shell: the forward sees its floating tensors converted to the
    compute dtype, put in the shell's own dicts (diffusers' hook converts the tensor objects in place with
    ``module.to()``, and on a shell those are shared with the base)."""
    saved = hook.__dict__.setdefault("_cow_saved", {})
    for kind in ("_parameters", "_buffers"):
        held = module.__dict__[kind]
        for name, tensor in list(held.items()):
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != hook.compute_dtype:
                saved[(id(module), kind, name)] = tensor
                converted = tensor.detach().to(hook.compute_dtype, non_blocking=hook.non_blocking)
                if isinstance(tensor, nn.Parameter):
                    converted = nn.Parameter(converted, requires_grad=tensor.requires_grad)
                held[name] = converted
    return args, kwargs


def _uncast_after_forward(hook: Any, module: nn.Module, output: Any) -> Any:
    """Layerwise casting's ``post_forward`` on a shell: the shell's own tensors back in its dicts."""
    saved = hook.__dict__.get("_cow_saved", {})
    for key in [key for key in saved if key[0] == id(module)]:
        _, kind, name = key
        module.__dict__[kind][name] = saved.pop(key)
    return output


def _rebuild_registry(registry: Any, original: nn.Module, shell: nn.Module) -> dict[str, Any]:
    """A copy of diffusers' ``HookRegistry`` for ``shell``: its hooks copied and chained around the shell's forward.

    Follows ``HookRegistry.register_hook`` without calling ``initialize_hook`` again (what it did to the
    module, such as casting its weights, the shell shares already). A registry in a shape this does not
    know is returned as a copy pointing at the shell, its hooks shared.
    """
    made = copy.copy(registry)
    made._module_ref = shell
    made._child_registries_cache = None
    refs = list(getattr(registry, "_fn_refs", ()))
    order = list(getattr(registry, "_hook_order", ()))
    wrappers = [refs[i + 1].original_forward or refs[i + 1].forward for i in range(len(refs) - 1)]
    wrappers.append(original.__dict__.get("forward"))
    if not refs or len(order) != len(refs) or not all(
        isinstance(w, functools.partial) and w.args[:1] == (original,) for w in wrappers
    ):
        made.hooks = dict(registry.hooks)
        return {_REGISTRY: made}
    forward = rebind(refs[0].original_forward or refs[0].forward, original, shell)
    made.hooks, made._fn_refs, made._hook_order = {}, [], order
    for name, ref, wrapper in zip(order, refs, wrappers, strict=True):
        hook = copy.copy(registry.hooks[name])
        mine = copy.copy(ref)
        mine.pre_forward = rebind(ref.pre_forward, registry.hooks[name], hook)
        mine.post_forward = rebind(ref.post_forward, registry.hooks[name], hook)
        if type(hook).__name__ == "LayerwiseCastingHook" and mine.pre_forward.__func__ is type(hook).pre_forward:
            mine.pre_forward = functools.partial(_cast_for_forward, hook)
            mine.post_forward = functools.partial(_uncast_after_forward, hook)
        if ref.original_forward is not None:
            mine.original_forward = forward
            mine.forward = functools.update_wrapper(functools.partial(hook.new_forward, shell), hook.new_forward)
        else:
            mine.forward = forward
        hook.fn_ref = mine
        made.hooks[name] = hook
        made._fn_refs.append(mine)
        forward = _rewrapped(wrapper, mine, shell, forward)
    return {_REGISTRY: made, "forward": forward}


register_shell_attribute(_REGISTRY, _rebuild_registry)
