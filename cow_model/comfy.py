"""Copy-on-write clones of ComfyUI ``ModelPatcher`` objects.

ComfyUI's ``ModelPatcher.clone()`` runs ``copy.deepcopy(self.model_options)``, so every node that
clones a model copies whatever the attention patches in ``model_options`` hold (adapter weights,
modules, embeddings) again. This module gives the same clone with ``model_options`` copied by
:func:`cow_model.cow_copy` instead:

* :func:`cow_clone` ``(patcher, *args, **kwargs)``: one clone, for code that calls it;
* :func:`install` / :func:`uninstall` / :func:`install_from_env`: make ComfyUI's own
  ``ModelPatcher.clone`` do so for every node (opt-in, environment variable :data:`ENV_VAR`).

What changes against the stock clone: only how ``model_options`` is copied. Every container
(dicts, lists, tuples, sets) and every plain object in it is still copied, exactly as
``copy.deepcopy`` copies it, so adding, removing or replacing entries of a clone's options never
reaches the original. Payload is shared instead of copied: torch tensors, ``nn.Module`` instances,
functions, and objects whose class sets ``__cow_shared__ = True`` or was passed to
``cow_model.register_shared``. A node that mutates such payload *in place* (``tensor.add_()``,
``module.weight.data = ...``, ``shared_object.attr = ...``) after it was placed in options changes it
for every clone that shares it; ComfyUI's stock clone would have isolated that.

Every other field of the new patcher is set by the installed ComfyUI's own ``clone()`` (it runs,
with the patcher's ``model_options`` swapped for a stand-in whose ``__deepcopy__`` is
``cow_copy``), so fields added by newer ComfyUI versions keep working. Where the patcher cannot be
handled that way (its ``model_options`` is not a dict, its ``clone()`` does not deep-copy
``model_options``), the stock ``clone()`` result is returned and one warning per process is logged.
A ``clone()`` found not to deep-copy ``model_options`` has run once with the stand-in by then; that
result is dropped, the stock ``clone()`` runs again, and later calls go to it directly.

While the stock ``clone()`` runs, the original patcher's ``model_options`` attribute holds the
stand-in (a ``dict`` subclass with the same items); it is put back before ``cow_clone`` returns,
also when ``clone()`` raises. ComfyUI runs nodes on one thread, so no other node sees it.

ComfyUI is imported lazily: importing this module needs no ComfyUI; :func:`install` without an
explicit class imports ``comfy.model_patcher``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from .options import Memo, cow_copy

log = logging.getLogger(__name__)

ENV_VAR = "COW_MODEL_COMFY_CLONE"
"""Set to ``1`` (or ``true``/``yes``/``on``) to make every ``ModelPatcher.clone`` copy options with ``cow_copy``."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

# The stock clone() deep-copies model_options with this call (ComfyUI of 2024 and 2025/2026).
_DEEPCOPY_OF_OPTIONS = re.compile(r"copy\.deepcopy\(\s*self\.model_options\s*\)")

_STOCK_ATTR = "__cow_stock_clone__"
"""Attribute of an installed ``clone`` that holds the stock function it replaced."""

_warned: set[str] = set()
_unsupported: set[Callable[..., Any]] = set()
"""Stock clone functions found not to deep-copy ``model_options``; they are called directly from then on."""


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


class _CowCopiedOptions(dict[Any, Any]):
    """Stand-in for a patcher's ``model_options`` during a stock ``clone()``: deep-copied by ``cow_copy``.

    Holds the same items as the original, so a ``clone()`` that reads them sees the same values.
    """

    __slots__ = ("copied", "original")

    def __init__(self, original: dict[Any, Any]) -> None:
        super().__init__(original)
        self.original = original
        self.copied = False

    def __deepcopy__(self, memo: Memo) -> dict[Any, Any]:
        self.copied = True
        return cow_copy(self.original, memo)


def _clone_with_cow_options(stock_clone: Callable[..., Any], patcher: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``stock_clone(patcher, ...)`` with ``patcher.model_options`` deep-copied through ``cow_copy``."""
    if stock_clone in _unsupported:
        return stock_clone(patcher, *args, **kwargs)
    options = getattr(patcher, "model_options", None)
    if isinstance(options, _CowCopiedOptions):  # a nested clone() (a subclass calling super().clone())
        return stock_clone(patcher, *args, **kwargs)
    if type(options) is not dict:
        _warn_once(
            f"options:{type(patcher).__qualname__}",
            "cow_model.comfy: %s.model_options is %s, not a dict; using the stock clone(), which deep-copies it",
            type(patcher).__qualname__,
            type(options).__name__,
        )
        return stock_clone(patcher, *args, **kwargs)
    stand_in = _CowCopiedOptions(options)
    patcher.model_options = stand_in
    try:
        clone = stock_clone(patcher, *args, **kwargs)
    finally:
        patcher.model_options = options
    if stand_in.copied:
        return clone
    _unsupported.add(stock_clone)
    _warn_once(
        f"clone:{stock_clone.__qualname__}",
        "cow_model.comfy: %s does not deep-copy model_options as the ComfyUI versions this was written "
        "for do; using the stock clone() for it from now on",
        stock_clone.__qualname__,
    )
    return stock_clone(patcher, *args, **kwargs)


def _stock_clone_of(cls: type) -> Callable[..., Any]:
    """The ``clone`` function of ``cls``, unwrapped if :func:`install` replaced it."""
    method = getattr(cls, "clone", None)
    if not callable(method):
        raise TypeError(
            f"cow_clone needs a ComfyUI ModelPatcher (an object with a clone() method); got {cls.__qualname__}"
        )
    stock: Callable[..., Any] = getattr(method, _STOCK_ATTR, method)
    return stock


def cow_clone(model_patcher: Any, *args: Any, **kwargs: Any) -> Any:
    """``model_patcher.clone(*args, **kwargs)`` with ``model_options`` copied by ``cow_copy``.

    Every other field is what the installed ComfyUI's own ``clone()`` sets. Shared with the original
    (not copied): the tensors, modules, functions and declared-shareable objects inside
    ``model_options``. Copied: all containers and plain objects in it (see the module doc). Falls
    back to the stock ``clone()``, with one warning per process, for a patcher it cannot handle.
    Raises ``TypeError`` for an object without a ``clone()`` method.
    """
    return _clone_with_cow_options(_stock_clone_of(type(model_patcher)), model_patcher, *args, **kwargs)


def _model_patcher_class() -> type:
    try:
        module = importlib.import_module("comfy.model_patcher")
    except ImportError as error:
        raise ModuleNotFoundError(
            "cow_model.comfy.install() patches ComfyUI's comfy.model_patcher.ModelPatcher, "
            f"but ComfyUI is not importable here ({error})"
        ) from error
    return module.ModelPatcher


def _recognised(stock_clone: Callable[..., Any]) -> bool:
    """Whether ``stock_clone``'s source deep-copies ``self.model_options`` as the known ComfyUI versions do."""
    try:
        source = inspect.getsource(stock_clone)
    except (OSError, TypeError):
        return False
    return _DEEPCOPY_OF_OPTIONS.search(source) is not None


def is_installed(model_patcher_class: type | None = None) -> bool:
    """Whether :func:`install` has replaced ``clone`` on the class (default: ComfyUI's ``ModelPatcher``)."""
    cls = model_patcher_class or _model_patcher_class()
    return hasattr(cls.__dict__.get("clone"), _STOCK_ATTR)


def install(model_patcher_class: type | None = None) -> bool:
    """Make ``ModelPatcher.clone`` copy ``model_options`` with ``cow_copy``, for every caller (every node pack).

    Returns ``True`` when installed (also when it already was: idempotent). Returns ``False``, with
    one warning per process, and leaves the class unchanged when its ``clone`` is not one this
    recognises (it must deep-copy ``self.model_options`` as ComfyUI of 2024-2026 does). The
    isolation guarantee that changes is in the module doc.
    """
    cls = model_patcher_class or _model_patcher_class()
    current = cls.__dict__.get("clone")
    if hasattr(current, _STOCK_ATTR):
        return True
    if current is None or not _recognised(current):
        _warn_once(
            f"install:{cls.__module__}.{cls.__qualname__}",
            "cow_model.comfy: %s.%s.clone is not the ComfyUI clone() this recognises (one that runs "
            "copy.deepcopy(self.model_options)); leaving it as it is",
            cls.__module__,
            cls.__qualname__,
        )
        return False
    stock: Callable[..., Any] = current

    @functools.wraps(stock)
    def clone(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _clone_with_cow_options(stock, self, *args, **kwargs)

    setattr(clone, _STOCK_ATTR, stock)
    setattr(cls, "clone", clone)  # noqa: B010 - a class attribute replaced at run time
    log.info(
        "cow_model.comfy: %s.%s.clone now copies model_options with cow_copy",
        cls.__module__,
        cls.__qualname__,
    )
    return True


def uninstall(model_patcher_class: type | None = None) -> bool:
    """Put the stock ``clone`` back; returns whether anything was installed."""
    cls = model_patcher_class or _model_patcher_class()
    stock = getattr(cls.__dict__.get("clone"), _STOCK_ATTR, None)
    if stock is None:
        return False
    setattr(cls, "clone", stock)  # noqa: B010
    return True


def install_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """:func:`install` when :data:`ENV_VAR` is ``1``/``true``/``yes``/``on``; returns whether it is installed.

    Unset, empty, ``0``/``false``/``no``/``off``: nothing is installed. Any other value: a warning
    saying what is expected, nothing installed.
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if value in _FALSE:
        return False
    if value not in _TRUE:
        _warn_once(
            f"env:{value}",
            "cow_model.comfy: %s=%r is not understood; expected 1/true/yes/on to install or 0/false/no/off; "
            "not installing",
            ENV_VAR,
            value,
        )
        return False
    return install()
