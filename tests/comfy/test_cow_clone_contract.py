"""cow_model.comfy without ComfyUI: how the installed clone is recognised, and what clone() code sees.

The patchers here are stand-ins written the way ComfyUI writes ``ModelPatcher.clone()``: the options
are deep-copied with ``copy.deepcopy(self.model_options)`` and, as in ComfyUI since late 2024, the
``ON_CLONE`` callbacks run at the end as ``callback(self, n)``; or, as since 2026-02, copied with
``deepcopy_list_dict(self.model_options)``. Each test gets a class of its own,
since ``install()`` replaces ``clone`` on the class.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import cow_model.comfy as cow_comfy
from instantid.testing.comfy_clone_semantics import deepcopy_list_dict


class CallbackPatcher:
    """Clones as current ComfyUI does: fields, the deep copy of the options, then the ON_CLONE callbacks."""

    def __init__(self) -> None:
        self.weight = torch.ones(3)
        self.model_options: dict[str, Any] = {"transformer_options": {"weight": self.weight, "names": ["a"]}}
        self.patches: dict[str, list[Any]] = {}
        self.callbacks: list[Callable[[Any, Any], None]] = []

    def clone(self) -> Any:
        n = type(self).__new__(type(self))
        n.weight = self.weight
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.model_options = copy.deepcopy(self.model_options)
        n.callbacks = self.callbacks.copy()
        for callback in self.callbacks:
            callback(self, n)
        return n


class ReadsOptionsFirst(CallbackPatcher):
    """A clone() that reads self.model_options before deep-copying it: the stand-in would be visible."""

    def clone(self) -> Any:
        keys = list(self.model_options)
        n = type(self).__new__(type(self))
        n.model_options = copy.deepcopy(self.model_options)
        n.keys = keys
        return n


class FailingClone(CallbackPatcher):
    def clone(self) -> Any:
        raise RuntimeError("clone failed before copying")


@pytest.fixture
def patcher_class() -> Iterator[type[CallbackPatcher]]:
    cls: type[CallbackPatcher] = type("Patcher", (CallbackPatcher,), {"clone": CallbackPatcher.clone})
    yield cls
    cow_comfy.uninstall(cls)


def shares_weight(clone: Any, original: Any) -> bool:
    """Whether ``clone``'s options hold the original's tensor (a cow copy) rather than a copy of it."""
    copied = clone.model_options["transformer_options"]["weight"]
    assert torch.equal(copied, original.weight)
    return copied is original.weight


def pack_wrapper(inner: Callable[..., Any], calls: list[Any]) -> Callable[..., Any]:
    """What another node pack does to ModelPatcher.clone: a functools.wraps wrapper around what is there."""

    @functools.wraps(inner)
    def clone(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(self)
        return inner(self, *args, **kwargs)

    return clone


@pytest.mark.parametrize("path", ["cow_clone", "installed"])
def test_on_clone_callbacks_see_the_patchers_own_options(
    patcher_class: type[CallbackPatcher], path: str
) -> None:
    patcher = patcher_class()
    options = patcher.model_options
    seen: list[tuple[Any, Any]] = []

    def on_clone(old: Any, new: Any) -> None:
        seen.append((old.model_options, new.model_options))
        old.model_options["marked_by_callback"] = True  # a callback writing to the original's options

    patcher.callbacks.append(on_clone)
    if path == "installed":
        assert cow_comfy.install(patcher_class) is True
        clone = patcher.clone()
    else:
        clone = cow_comfy.cow_clone(patcher)
    assert len(seen) == 1
    old_options, new_options = seen[0]
    assert old_options is options and type(old_options) is dict, "the callback saw a stand-in"
    assert new_options is clone.model_options
    assert patcher.model_options is options and options["marked_by_callback"] is True
    assert "marked_by_callback" not in clone.model_options
    assert shares_weight(clone, patcher)


def test_the_stand_in_is_seen_only_by_the_deep_copy(patcher_class: type[CallbackPatcher]) -> None:
    """During the stock clone(), self.model_options is the stand-in until the copy, the original after it."""
    patcher = patcher_class()
    options = patcher.model_options
    observed: list[tuple[str, Any]] = []
    stock = patcher_class.clone

    def clone(self: Any) -> Any:
        observed.append(("before", type(self.model_options)))
        n = stock(self)
        observed.append(("after", self.model_options))
        return n

    patcher_class.clone = clone  # type: ignore[method-assign]
    cow_comfy.cow_clone(patcher)
    assert observed[0][0] == "before" and observed[0][1] is not dict  # cow_clone swapped before calling it
    assert observed[1] == ("after", options) and observed[1][1] is options


def test_install_refuses_a_clone_that_reads_the_options_before_copying_them(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cow_comfy, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="cow_model.comfy"):
        assert cow_comfy.install(ReadsOptionsFirst) is False
    assert "is not the ComfyUI clone() this recognises" in caplog.text
    assert ReadsOptionsFirst.__dict__["clone"] is not None and not cow_comfy.is_installed(ReadsOptionsFirst)


def test_the_original_options_come_back_when_clone_raises() -> None:
    patcher = FailingClone()
    options = patcher.model_options
    with pytest.raises(RuntimeError, match="clone failed before copying"):
        cow_comfy.cow_clone(patcher)
    assert patcher.model_options is options and type(options) is dict


def test_the_installed_function_carries_no_marker_attribute(patcher_class: type[CallbackPatcher]) -> None:
    assert cow_comfy.install(patcher_class) is True
    installed = patcher_class.__dict__["clone"]
    assert set(vars(installed)) == {"__wrapped__"}, "only what functools.wraps sets; recognised by identity"
    assert installed.__wrapped__ is CallbackPatcher.clone


def test_a_pack_wrapping_clone_after_install_keeps_its_wrapper(
    patcher_class: type[CallbackPatcher], caplog: pytest.LogCaptureFixture
) -> None:
    patcher = patcher_class()
    assert cow_comfy.install(patcher_class) is True
    installed = patcher_class.__dict__["clone"]
    calls: list[Any] = []
    wrapper = pack_wrapper(installed, calls)
    patcher_class.clone = wrapper  # type: ignore[method-assign]

    assert cow_comfy.is_installed(patcher_class)
    assert shares_weight(cow_comfy.cow_clone(patcher), patcher)
    assert calls == [patcher], "cow_clone must go through the other pack's wrapper, not around it"
    assert shares_weight(patcher.clone(), patcher) and len(calls) == 2
    assert cow_comfy.install(patcher_class) is True and patcher_class.__dict__["clone"] is wrapper, (
        "no second layer"
    )

    with caplog.at_level(logging.WARNING, logger="cow_model.comfy"):
        assert cow_comfy.uninstall(patcher_class) is True
    assert patcher_class.__dict__["clone"] is wrapper, "uninstall must not remove another pack's wrapper"
    assert "another pack's wrapper" in caplog.text and "leaving that wrapper in place" in caplog.text
    assert not cow_comfy.is_installed(patcher_class)
    assert not shares_weight(patcher.clone(), patcher), "switched off: the stock deep copy"
    assert len(calls) == 3
    assert not shares_weight(CallbackPatcher.clone(patcher), patcher)

    assert cow_comfy.install(patcher_class) is True, "switched on again, inside the same wrapper"
    assert patcher_class.__dict__["clone"] is wrapper and cow_comfy.is_installed(patcher_class)
    assert shares_weight(patcher.clone(), patcher) and len(calls) == 4
    assert cow_comfy.uninstall(patcher_class) is True
    assert cow_comfy.uninstall(patcher_class) is False, "nothing left to switch off"


def test_a_wrapper_without_functools_wraps_is_switched_off_too(
    patcher_class: type[CallbackPatcher], caplog: pytest.LogCaptureFixture
) -> None:
    patcher = patcher_class()
    assert cow_comfy.install(patcher_class) is True
    installed = patcher_class.__dict__["clone"]

    def plain_wrapper(self: Any) -> Any:
        return installed(self)

    patcher_class.clone = plain_wrapper  # type: ignore[method-assign]
    assert shares_weight(patcher.clone(), patcher)
    with caplog.at_level(logging.WARNING, logger="cow_model.comfy"):
        assert cow_comfy.uninstall(patcher_class) is True
    assert patcher_class.__dict__["clone"] is plain_wrapper and "plain_wrapper" in caplog.text
    assert not shares_weight(patcher.clone(), patcher)


def test_uninstall_puts_the_stock_clone_back(patcher_class: type[CallbackPatcher]) -> None:
    patcher = patcher_class()
    assert not cow_comfy.is_installed(patcher_class)
    assert cow_comfy.install(patcher_class) is True and cow_comfy.is_installed(patcher_class)
    assert shares_weight(patcher.clone(), patcher)
    assert cow_comfy.uninstall(patcher_class) is True
    assert patcher_class.__dict__["clone"] is CallbackPatcher.clone
    assert not cow_comfy.is_installed(patcher_class) and cow_comfy.uninstall(patcher_class) is False
    assert not shares_weight(patcher.clone(), patcher)


def test_a_function_made_to_look_like_the_installed_one_is_not_it(
    patcher_class: type[CallbackPatcher],
) -> None:
    """Copying every attribute of the installed function (what functools.wraps does) does not make a function ours."""
    assert cow_comfy.install(patcher_class) is True
    installed = patcher_class.__dict__["clone"]
    calls: list[Any] = []

    def lookalike(self: Any) -> Any:
        calls.append(self)
        return CallbackPatcher.clone(self)

    lookalike.__dict__.update(vars(installed))
    other: type[CallbackPatcher] = type("Other", (CallbackPatcher,), {"clone": lookalike})
    patcher = other()
    assert not cow_comfy.is_installed(other)
    assert cow_comfy.uninstall(other) is False and other.__dict__["clone"] is lookalike
    cow_comfy.cow_clone(patcher)
    assert calls == [patcher], "cow_clone calls the class's own clone(), not the installed one's stock"


class InPlacePatch:
    """A patch object of the ``Attn2Replace`` protocol: its ``add`` appends in place (ComfyUI_IPAdapter_plus's way)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.callback: list[Any] = [weight]

    def add(self, term: Any) -> None:
        self.callback.append(term)


class ListDictPatcher:
    """Clones as ComfyUI since 2026-02 does (PR #12382): dicts and lists copied, every other object shared; the
    newer arguments; a dynamic-VRAM flag (``is_dynamic()``, as ``ModelPatcherDynamic`` answers)."""

    def __init__(self, dynamic: bool = False) -> None:
        self.weight = torch.ones(3)
        self.dynamic = dynamic
        self.model_options: dict[str, Any] = {"transformer_options": {"attn2": {"key": InPlacePatch(self.weight)}}}
        self.calls: list[tuple[Any, ...]] = []

    def is_dynamic(self) -> bool:
        return self.dynamic

    def clone(self, disable_dynamic: bool = False, model_override: Any = None, force_deepcopy: bool = False) -> Any:
        self.calls.append((disable_dynamic, model_override, force_deepcopy))
        n = type(self).__new__(type(self))
        n.weight, n.dynamic, n.calls = self.weight, self.dynamic and not disable_dynamic, []
        n.model_options = deepcopy_list_dict(self.model_options)
        n.model_options["transformer_options"]["by_clone"] = InPlacePatch(self.weight)  # clone()'s own object
        return n


def patch_of(patcher: Any) -> InPlacePatch:
    return patcher.model_options["transformer_options"]["attn2"]["key"]  # type: ignore[no-any-return]


@pytest.fixture
def list_dict_class() -> Iterator[type[ListDictPatcher]]:
    cls: type[ListDictPatcher] = type("Patcher2026", (ListDictPatcher,), {"clone": ListDictPatcher.clone})
    assert cow_comfy.install(cls) is True, "install() must accept a deepcopy_list_dict clone()"
    yield cls
    cow_comfy.uninstall(cls)


def test_on_a_list_dict_clone_patch_objects_are_cow_copied(list_dict_class: type[ListDictPatcher]) -> None:
    original = list_dict_class()
    clone = original.clone(True, model_override="override")
    assert original.calls == [(True, "override", False)], "the newer clone() arguments are passed through"
    copied = patch_of(clone)
    assert copied is not patch_of(original) and copied.callback[0] is original.weight  # the tensor shared
    copied.add("a second term")
    assert patch_of(original).callback == [original.weight], "an in-place add reached the original"
    assert type(clone.model_options["transformer_options"]["by_clone"]) is InPlacePatch  # left as clone() made it
    assert cow_comfy.cow_clone(original).model_options["transformer_options"]["attn2"]["key"] is not patch_of(original)


@pytest.mark.parametrize("case", ["force_deepcopy", "dynamic"])
def test_force_deepcopy_and_dynamic_patchers_are_left_to_comfyuis_clone(
    list_dict_class: type[ListDictPatcher], case: str
) -> None:
    original = list_dict_class(dynamic=case == "dynamic")
    clone = original.clone(force_deepcopy=True) if case == "force_deepcopy" else original.clone()
    assert patch_of(clone) is patch_of(original), "ComfyUI's own clone() shares it; nothing else was done"
    positional = original.clone(False, None, True) if case == "force_deepcopy" else None
    assert positional is None or patch_of(positional) is patch_of(original)
