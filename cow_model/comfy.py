"""Copy-on-write clones of ComfyUI ``ModelPatcher`` objects, isolated under either generation of ``clone()``.

ComfyUI's ``ModelPatcher.clone()`` copies ``model_options`` in one of two ways:

* before 2026-02 (ComfyUI of 2024 and 2025): ``copy.deepcopy(self.model_options)``, so every node
  that clones a model copies whatever the attention patches in ``model_options`` hold (adapter
  weights, modules, embeddings) again;
* since Comfy-Org/ComfyUI PR #12382 (2026-02-10): ``comfy.utils.deepcopy_list_dict(self.model_options)``,
  which copies dicts and lists and shares every other object, patch objects included, so a node
  that changes a patch object it found in its clone in place (``Attn2Replace.add`` in
  ComfyUI_InstantID and ComfyUI_IPAdapter_plus) changes it in the model it was cloned from too.

This module gives, on both, the same clone with ``model_options`` copied as :func:`cow_model.cow_copy`
copies it:

* :func:`cow_clone` ``(patcher, *args, **kwargs)``: one clone, for code that calls it;
* :func:`install` / :func:`uninstall` / :func:`install_from_env`: make ComfyUI's own
  ``ModelPatcher.clone`` do so for every node (opt-in, environment variable :data:`ENV_VAR`).

What the copy is: every container (dicts, lists, tuples, sets) and every plain object in
``model_options`` is copied, exactly as ``copy.deepcopy`` copies it, so adding, removing or
replacing entries of a clone's options, or changing a patch object of a clone in place, never
reaches the original. Payload is shared instead of copied: torch tensors, ``nn.Module`` instances,
functions, and objects whose class sets ``__cow_shared__ = True`` or was passed to
``cow_model.register_shared``. A node that mutates such payload *in place* (``tensor.add_()``,
``module.weight.data = ...``, ``shared_object.attr = ...``) after it was placed in options changes it
for every clone that shares it; ``copy.deepcopy`` would have isolated that. Against the stock clone
this is cheaper before 2026-02 (payload shared, not copied) and gives back isolation since (patch
objects copied, not shared), at microseconds per patch object.

Every other field of the new patcher is set by the installed ComfyUI's own ``clone()``, so fields
added by newer ComfyUI versions keep working, and its arguments (``disable_dynamic``,
``model_override``, ``force_deepcopy`` of 2026 ComfyUI, any other) are passed through unchanged.

On a ``clone()`` that deep-copies, it runs with the patcher's ``model_options`` swapped
for a stand-in: a ``dict`` subclass with the same items whose ``__deepcopy__`` first puts the
patcher's own ``model_options`` back, then copies it with ``cow_copy``. The stand-in is therefore
seen only by that ``copy.deepcopy(self.model_options)``: everything ``clone()`` does after the copy
(the rest of its fields, ``on_model_patcher_clone`` of attachments, the clones of additional models,
and the ``CallbacksMP.ON_CLONE`` callbacks that ComfyUI since late 2024 runs at the end of
``clone()`` as ``callback(self, n)``) sees the patcher's own options object, and what a callback
writes into it stays there. :func:`install` accepts only a ``clone()`` whose source reads
``self.model_options`` first in that deep copy, and swaps right before calling it, so nothing reads
the options between the swap and the copy. (:func:`cow_clone` on a class whose ``clone`` is a
subclass override or another pack's wrapper swaps before calling that: code of theirs that reads
``self.model_options`` before the copy sees the stand-in, with the same items.) The patcher's own
options are put back also when ``clone()`` raises or never copies. ComfyUI runs nodes on one
thread, so no other node sees the stand-in.

On a ``clone()`` whose source copies with ``deepcopy_list_dict(self.model_options)``, the stock
``clone()`` runs unchanged; then, in the new patcher's ``model_options`` (its dicts and lists are
its own), every object that is still the very object at the same place in the original's (what
the list-dict copy shared: patch objects, tuples, ...) is replaced by its ``cow_copy``, with one memo
for the whole copy (an object at two places stays one object). Objects that ``clone()`` itself put
there (an ``ON_CLONE`` callback's) are left as they are; such callbacks, run inside ``clone()``,
see the shared objects, as on the stock clone. Left to ComfyUI's own ``clone()`` unchanged: a call
with ``force_deepcopy=True`` (it deep-copies), and a dynamic-VRAM patcher (``ModelPatcherDynamic``:
``is_dynamic()`` true), whose clone the cow copy is not proven right for.

Where the patcher cannot be handled in either way (its ``model_options`` is not a dict, its
``clone()`` copies ``model_options`` neither way), the stock ``clone()`` result is returned and one
warning per process is logged. A ``clone()`` found not to deep-copy ``model_options`` has run once
with the stand-in by then; that result is dropped, the stock ``clone()`` runs again, and later calls
go to it directly.

The installed ``clone`` is recognised by identity (a registry of the functions :func:`install`
made), never by an attribute: ``functools.wraps`` copies a function's attributes, so another node
pack wrapping ``ModelPatcher.clone`` after :func:`install` must not pass for it. :func:`cow_clone`
then calls that pack's wrapper (which reaches the installed function inside, which sees the
stand-in and lets the stock ``clone()`` copy through it, or copies the patch objects after it).
:func:`uninstall` removes only its own function: when another pack's wrapper sits around it, it
leaves the wrapper in place, switches the cow copy inside it off (the stock ``clone()`` runs there)
and says so in a warning.

ComfyUI is imported lazily: importing this module needs no ComfyUI; :func:`install` without an
explicit class imports ``comfy.model_patcher``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .options import Memo, cow_copy

log = logging.getLogger(__name__)

ENV_VAR = "COW_MODEL_COMFY_CLONE"
"""Set to ``1`` (or ``true``/``yes``/``on``) to make every ``ModelPatcher.clone`` copy options with ``cow_copy``."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

# The stock clone() deep-copies model_options with this call (ComfyUI of 2024 and 2025).
_DEEPCOPY_OF_OPTIONS = re.compile(r"copy\.deepcopy\(\s*self\.model_options\s*\)")

# ...and since ComfyUI PR #12382 (2026-02) copies only its dicts and lists with this one.
_LIST_DICT_OF_OPTIONS = re.compile(r"deepcopy_list_dict\(\s*self\.model_options\s*\)")

DEEPCOPY = "deepcopy"
LIST_DICT = "list-dict"

# The first read of self.model_options in a recognised clone() is that deep copy.
_FIRST_OPTIONS_READ = re.compile(r"self\.model_options\b")


@dataclasses.dataclass(eq=False)
class _Installed:
    """A ``clone`` function that :func:`install` made: the stock one it replaced, and whether it is on."""

    cls: type
    stock: Callable[..., Any]
    kind: str = DEEPCOPY
    function: Callable[..., Any] | None = None
    active: bool = True


_installed: dict[int, _Installed] = {}
"""``id(function)`` -> its record, for every function :func:`install` made (the record keeps it alive)."""

_warned: set[str] = set()
_unsupported: set[Callable[..., Any]] = set()
"""Stock clone functions found not to deep-copy ``model_options``; they are called directly from then on."""


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


class _CowCopiedOptions(dict[Any, Any]):
    """Stand-in for a patcher's ``model_options`` until the stock ``clone()`` deep-copies it.

    Holds the same items as the original. Its ``__deepcopy__`` puts the original back on the
    patcher first, so nothing after the copy sees the stand-in, then copies it with ``cow_copy``.
    """

    __slots__ = ("copied", "original", "patcher")

    def __init__(self, patcher: Any, original: dict[Any, Any]) -> None:
        super().__init__(original)
        self.patcher = patcher
        self.original = original
        self.copied = False

    def restore(self) -> None:
        """Put the patcher's own ``model_options`` back, if this stand-in is still in its place."""
        if getattr(self.patcher, "model_options", None) is self:
            self.patcher.model_options = self.original

    def __deepcopy__(self, memo: Memo) -> dict[Any, Any]:
        self.restore()
        self.copied = True
        return cow_copy(self.original, memo)


def _clone_with_cow_options(stock_clone: Callable[..., Any], patcher: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``stock_clone(patcher, ...)`` with ``patcher.model_options`` deep-copied through ``cow_copy``."""
    if stock_clone in _unsupported:
        return stock_clone(patcher, *args, **kwargs)
    options = getattr(patcher, "model_options", None)
    if isinstance(options, _CowCopiedOptions):  # a nested clone(): a wrapper or subclass around this one
        return stock_clone(patcher, *args, **kwargs)
    if type(options) is not dict:
        _warn_once(
            f"options:{type(patcher).__qualname__}",
            "cow_model.comfy: %s.model_options is %s, not a dict; using the stock clone(), which deep-copies it",
            type(patcher).__qualname__,
            type(options).__name__,
        )
        return stock_clone(patcher, *args, **kwargs)
    stand_in = _CowCopiedOptions(patcher, options)
    patcher.model_options = stand_in
    try:
        clone = stock_clone(patcher, *args, **kwargs)
    finally:
        stand_in.restore()
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


def _leave_to_comfyui(stock_clone: Callable[..., Any], patcher: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call goes to the stock ``clone()`` as it is: ``force_deepcopy=True``, or a dynamic-VRAM patcher."""
    if "force_deepcopy" in kwargs or args:
        try:
            bound = inspect.signature(stock_clone).bind(patcher, *args, **kwargs)
        except TypeError:
            return True  # the stock clone() raises its own error for these arguments
        if bound.arguments.get("force_deepcopy"):
            return True
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return callable(is_dynamic) and bool(is_dynamic())


def _pairs(copied: Any, original: Any) -> Iterator[tuple[Any, Any, Any]]:
    """``(place, copy's object, original's object)`` for the places a dict or list and its copy share."""
    if isinstance(copied, dict) and isinstance(original, dict):
        for key in copied:
            if key in original:
                yield key, copied[key], original[key]
    elif isinstance(copied, list) and isinstance(original, list) and len(copied) == len(original):
        yield from zip(range(len(copied)), copied, original, strict=True)


def _shares_a_container(copied: Any, original: Any) -> bool:
    """Whether a dict or list of ``original`` is also in ``copied`` at the same place (not a list-dict copy)."""
    for _, now, before in _pairs(copied, original):
        if isinstance(now, (dict, list)) and (now is before or _shares_a_container(now, before)):
            return True
    return False


def _isolate_shared(copied: Any, original: Any, memo: Memo) -> None:
    """In ``copied`` (a list-dict copy of ``original``), replace what is still ``original``'s object at the same
    place by its ``cow_copy``; descend into the copy's own dicts and lists."""
    for place, now, before in list(_pairs(copied, original)):
        if now is before:
            copied[place] = cow_copy(now, memo)
        elif type(now) is type(before) and isinstance(now, (dict, list)):
            _isolate_shared(now, before, memo)


def _clone_isolating_patches(stock_clone: Callable[..., Any], patcher: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``stock_clone(patcher, ...)`` (it copies with ``deepcopy_list_dict``), then ``cow_copy`` what it shared."""
    if _leave_to_comfyui(stock_clone, patcher, args, kwargs):
        return stock_clone(patcher, *args, **kwargs)
    original = getattr(patcher, "model_options", None)
    clone = stock_clone(patcher, *args, **kwargs)
    copied = getattr(clone, "model_options", None)
    if not isinstance(original, dict) or not isinstance(copied, dict):
        _warn_once(
            f"options:{type(patcher).__qualname__}",
            "cow_model.comfy: %s.model_options is %s in the original and %s in its clone, not two dicts; "
            "keeping the stock clone(), which shares the objects in it",
            type(patcher).__qualname__,
            type(original).__name__,
            type(copied).__name__,
        )
        return clone
    if copied is original or _shares_a_container(copied, original):
        _warn_once(
            f"clone:{stock_clone.__qualname__}",
            "cow_model.comfy: %s does not deep-copy model_options, nor copy its dicts and lists as ComfyUI since "
            "2026-02 does; keeping the stock clone(), which shares them",
            stock_clone.__qualname__,
        )
        return clone
    _isolate_shared(copied, original, {})
    return clone


@functools.lru_cache(maxsize=64)
def _clone_kind(stock_clone: Callable[..., Any]) -> str | None:
    """How a stock ``clone()`` copies ``model_options`` by its source: :data:`LIST_DICT` when it calls
    ``deepcopy_list_dict(self.model_options)`` (whatever else it copies for ``force_deepcopy``), else
    :data:`DEEPCOPY` (reading it nowhere before: the stand-in would be seen), or ``None``."""
    try:
        source = inspect.getsource(stock_clone)
    except (OSError, TypeError):
        return None
    if _LIST_DICT_OF_OPTIONS.search(source) is not None:
        return LIST_DICT
    copy_call = _DEEPCOPY_OF_OPTIONS.search(source)
    first_read = _FIRST_OPTIONS_READ.search(source)
    if copy_call is not None and first_read is not None and copy_call.start() < first_read.start() < copy_call.end():
        return DEEPCOPY
    return None


def _kind_in_class(cls: type, stock_clone: Callable[..., Any]) -> str | None:
    """:func:`_clone_kind` of ``stock_clone``, or, for a subclass override or wrapper this does not recognise,
    :data:`LIST_DICT` when a base class's ``clone()`` copies that way (the override calls it underneath)."""
    kind = _clone_kind(stock_clone)
    if kind is not None:
        return kind
    for base in cls.__mro__[1:]:
        function = base.__dict__.get("clone")
        if function is not None:
            record = _record_of(function)
            if _clone_kind(function if record is None else record.stock) == LIST_DICT:
                return LIST_DICT
    return None


def _record_of(function: object) -> _Installed | None:
    """The record of ``function`` if :func:`install` made it (by identity), else ``None``."""
    record = _installed.get(id(function))
    return record if record is not None and record.function is function else None


def _installed_inside(function: object) -> _Installed | None:
    """The record of an installed function that ``function`` is or wraps (``functools.wraps``' ``__wrapped__``)."""
    seen: set[int] = set()
    current: object = function
    while current is not None and id(current) not in seen:
        record = _record_of(current)
        if record is not None:
            return record
        seen.add(id(current))
        current = getattr(current, "__wrapped__", None)
    return None


def _stock_clone_of(cls: type) -> Callable[..., Any]:
    """The ``clone`` function of ``cls``, unwrapped if :func:`install` replaced it."""
    method = getattr(cls, "clone", None)
    if not callable(method):
        raise TypeError(
            f"cow_clone needs a ComfyUI ModelPatcher (an object with a clone() method); got {cls.__qualname__}"
        )
    record = _record_of(method)
    return method if record is None else record.stock


def cow_clone(model_patcher: Any, *args: Any, **kwargs: Any) -> Any:
    """``model_patcher.clone(*args, **kwargs)`` with ``model_options`` copied by ``cow_copy``.

    Every other field is what the installed ComfyUI's own ``clone()`` sets, its arguments passed
    through. Shared with the original (not copied): the tensors, modules, functions and
    declared-shareable objects inside ``model_options``. Copied: all containers and plain objects in
    it, patch objects included (see the module doc, also for what is left to ComfyUI's own clone).
    Falls back to the stock ``clone()``, with one warning per process, for a patcher it cannot handle.
    Raises ``TypeError`` for an object without a ``clone()`` method.
    """
    stock = _stock_clone_of(type(model_patcher))
    if _kind_in_class(type(model_patcher), stock) == LIST_DICT:
        return _clone_isolating_patches(stock, model_patcher, *args, **kwargs)
    return _clone_with_cow_options(stock, model_patcher, *args, **kwargs)


def _model_patcher_class() -> type:
    try:
        module = importlib.import_module("comfy.model_patcher")
    except ImportError as error:
        raise ModuleNotFoundError(
            "cow_model.comfy.install() patches ComfyUI's comfy.model_patcher.ModelPatcher, "
            f"but ComfyUI is not importable here ({error})"
        ) from error
    return module.ModelPatcher


def is_installed(model_patcher_class: type | None = None) -> bool:
    """Whether the class's ``clone`` copies options through :func:`install`'s function (default: ComfyUI's ``ModelPatcher``).

    True when ``clone`` is that function, or a ``functools.wraps`` wrapper of another pack around
    it (found through ``__wrapped__``), and it is switched on.
    """
    cls = model_patcher_class or _model_patcher_class()
    record = _installed_inside(cls.__dict__.get("clone"))
    return record is not None and record.active


def install(model_patcher_class: type | None = None) -> bool:
    """Make ``ModelPatcher.clone`` copy ``model_options`` with ``cow_copy``, for every caller (every node pack).

    Returns ``True`` when installed (also when it already was: idempotent, also when another pack
    has wrapped the installed function since; one switched off by :func:`uninstall` inside such a
    wrapper is switched on again). Returns ``False``, with one warning per process, and leaves the
    class unchanged when its ``clone`` is not one this recognises: it must deep-copy
    ``self.model_options`` as ComfyUI of 2024-2025 does, reading it nowhere before, or copy it with
    ``deepcopy_list_dict`` as ComfyUI since 2026-02 does. The isolation guarantee is in the module doc.
    """
    cls = model_patcher_class or _model_patcher_class()
    current = cls.__dict__.get("clone")
    record = _installed_inside(current)
    if record is not None:
        record.active = True
        return True
    kind = None if current is None else _clone_kind(current)
    if current is None or kind is None:
        _warn_once(
            f"install:{cls.__module__}.{cls.__qualname__}",
            "cow_model.comfy: %s.%s.clone is not the ComfyUI clone() this recognises (one that runs "
            "copy.deepcopy(self.model_options) or deepcopy_list_dict(self.model_options)); leaving it as it is",
            cls.__module__,
            cls.__qualname__,
        )
        return False
    stock: Callable[..., Any] = current
    record = _Installed(cls=cls, stock=stock, kind=kind)
    copy_through = _clone_isolating_patches if kind == LIST_DICT else _clone_with_cow_options

    @functools.wraps(stock)
    def clone(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not record.active:  # uninstalled while another pack's wrapper holds it
            return stock(self, *args, **kwargs)
        return copy_through(stock, self, *args, **kwargs)

    record.function = clone
    _installed[id(clone)] = record
    setattr(cls, "clone", clone)  # noqa: B010 - a class attribute replaced at run time
    log.info(
        "cow_model.comfy: %s.%s.clone now copies model_options with cow_copy (its stock clone: %s)",
        cls.__module__,
        cls.__qualname__,
        kind,
    )
    return True


def uninstall(model_patcher_class: type | None = None) -> bool:
    """Put the stock ``clone`` back; returns whether anything installed was removed or switched off.

    Removes only the function :func:`install` made, recognised by identity. When another pack has
    wrapped it since, that wrapper is left in place and every function :func:`install` made for
    the class is switched off (it calls the stock ``clone()`` directly), with a warning.
    """
    cls = model_patcher_class or _model_patcher_class()
    current = cls.__dict__.get("clone")
    own = _record_of(current)
    if own is not None:
        setattr(cls, "clone", own.stock)  # noqa: B010
        del _installed[id(current)]
    held = [
        record for record in _installed.values() if record.cls is cls and record.active and record is not own
    ]
    for record in held:
        record.active = False
    if held:
        log.warning(
            "cow_model.comfy: %s.%s.clone is another pack's wrapper (%s) around the clone() that cow_model.comfy "
            "installed; leaving that wrapper in place, with the cow copy inside it switched off",
            cls.__module__,
            cls.__qualname__,
            getattr(current, "__qualname__", type(current).__qualname__),
        )
    return own is not None or bool(held)


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
