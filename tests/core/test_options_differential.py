"""``cow_copy`` against ``copy.deepcopy`` as the oracle, on random option trees and operation sequences.

Two worlds are built from the same random recipe: one copies with ``copy.deepcopy``, the other
with ``cow_copy``. The same random operations (set, delete, nested mutation, append, in-place
change of a patch object, clone of a clone, mutating the original after cloning) run on both;
after every operation all roots of both worlds must render identically, aliasing included
(each mutable object is numbered at its first appearance across all roots).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cow_model import cow_copy


class PatchObject:
    """A plain mutable object, like the patch objects in ComfyUI's model_options."""

    def __init__(self, name: str, items: list[Any], payload: torch.Tensor) -> None:
        self.name = name
        self.items = items
        self.payload = payload


class SlottedPatch:
    __slots__ = ("scale", "table")

    def __init__(self, scale: int, table: dict[str, Any]) -> None:
        self.scale = scale
        self.table = table


class SharedPayload:
    """Declares itself shareable: cow_copy returns it as is; it is never mutated in place."""

    __cow_shared__ = True

    def __init__(self, value: int) -> None:
        self.value = value


def patch_function(q: Any) -> Any:
    return q


PAYLOAD_KINDS = ("tensor", "shared", "function")

leaves = st.one_of(
    st.integers(-5, 5),
    st.text("abc", max_size=3),
    st.sampled_from(PAYLOAD_KINDS).map(lambda kind: ("payload", kind)),
)


def recipes() -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4).map(lambda xs: ("list", xs)),
            st.lists(children, max_size=4).map(lambda xs: ("tuple", xs)),
            st.dictionaries(st.text("kvw", min_size=1, max_size=2), children, max_size=4).map(
                lambda d: ("dict", d)
            ),
            st.lists(st.integers(0, 9), max_size=4).map(lambda xs: ("set", xs)),
            st.tuples(st.text("p", max_size=2), st.lists(children, max_size=3)).map(lambda t: ("object", t)),
            st.dictionaries(st.text("t", min_size=1, max_size=2), children, max_size=3).map(
                lambda d: ("slotted", d)
            ),
        ),
        max_leaves=20,
    )


def build(recipe: Any, counter: list[int]) -> Any:
    """Turn a recipe into a fresh object tree (payload values numbered deterministically)."""
    if not isinstance(recipe, tuple):
        return recipe
    kind, body = recipe
    if kind == "payload":
        counter[0] += 1
        if body == "tensor":
            return torch.full((2,), float(counter[0]))
        return SharedPayload(counter[0]) if body == "shared" else patch_function
    if kind == "list":
        return [build(x, counter) for x in body]
    if kind == "tuple":
        return tuple(build(x, counter) for x in body)
    if kind == "dict":
        return {k: build(v, counter) for k, v in body.items()}
    if kind == "set":
        return set(body)
    if kind == "object":
        name, items = body
        counter[0] += 1
        return PatchObject(name, [build(x, counter) for x in items], torch.arange(3.0) + counter[0])
    return SlottedPatch(len(body), {k: build(v, counter) for k, v in body.items()})


def mutables(root: Any) -> list[Any]:
    """Mutable containers and objects reachable from ``root``, in a deterministic order."""
    found: list[Any] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if isinstance(obj, (dict, list, set, PatchObject, SlottedPatch)):
            if id(obj) in seen:
                return
            seen.add(id(obj))
            found.append(obj)
        for child in children(obj):
            visit(child)

    visit(root)
    return found


def children(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [obj[k] for k in sorted(obj, key=repr)]
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if isinstance(obj, PatchObject):
        return [obj.items]
    if isinstance(obj, SlottedPatch):
        return [obj.table]
    return []


def render(roots: list[Any]) -> list[Any]:
    """Values and aliasing of all roots: mutable objects are numbered at their first appearance."""
    numbers: dict[int, int] = {}

    def show(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return ("tensor", tuple(obj.tolist()))
        if isinstance(obj, SharedPayload):
            return ("shared", obj.value)
        if callable(obj) and not isinstance(obj, (PatchObject, SlottedPatch)):
            return ("function", obj.__name__)
        if isinstance(obj, (int, str)):
            return obj
        if isinstance(obj, tuple):
            return ("tuple", tuple(show(x) for x in obj))
        if isinstance(obj, set):
            tag: Any = ("set", tuple(sorted(obj)))
        else:
            tag = None
        if id(obj) in numbers:
            return ("ref", numbers[id(obj)])
        numbers[id(obj)] = len(numbers)
        if tag is not None:
            return (*tag, numbers[id(obj)])
        if isinstance(obj, dict):
            return ("dict", numbers[id(obj)], tuple((k, show(obj[k])) for k in sorted(obj, key=repr)))
        if isinstance(obj, list):
            return ("list", numbers[id(obj)], tuple(show(x) for x in obj))
        if isinstance(obj, PatchObject):
            return ("object", numbers[id(obj)], obj.name, show(obj.items), show(obj.payload))
        return ("slotted", numbers[id(obj)], obj.scale, show(obj.table))

    return [show(root) for root in roots]


operations = st.lists(
    st.tuples(
        st.sampled_from(["set", "delete", "append", "object", "alias", "clone"]),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(-9, 9),
    ),
    max_size=12,
)


def apply(roots: list[Any], copier: Any, op: tuple[str, int, int, int]) -> None:
    kind, where, pick, value = op
    root_index = where % len(roots)
    if kind == "clone":
        roots.append(copier(roots[root_index]))
        return
    targets = mutables(roots[root_index])
    if not targets:
        return
    target = targets[pick % len(targets)]
    if kind == "alias":  # make another reachable container appear a second time
        others = [t for t in targets if not isinstance(t, set)]
        if isinstance(target, (list, dict)) and others:
            other = others[value % len(others)]
            target.append(other) if isinstance(target, list) else target.__setitem__("alias", other)
        return
    if isinstance(target, set):
        (target.add if kind != "delete" else target.discard)(value)
    elif isinstance(target, list):
        if kind == "delete" and target:
            del target[value % len(target)]
        elif kind == "set" and target:
            target[value % len(target)] = value
        else:
            target.append([value])
    elif isinstance(target, dict):
        keys = sorted(target, key=repr)
        if kind == "delete" and keys:
            del target[keys[value % len(keys)]]
        else:
            target[f"k{value}"] = {"nested": [value]}
    elif isinstance(target, PatchObject):
        target.name = f"{target.name}{value}" if kind == "object" else target.name
        target.items.append(value)
    else:
        target.scale += value
        target.table[f"s{value}"] = value


@settings(max_examples=2000)
@given(recipe=recipes(), ops=operations)
def test_cow_copy_is_observationally_deepcopy(recipe: Any, ops: list[tuple[str, int, int, int]]) -> None:
    worlds = []
    for copier in (copy.deepcopy, cow_copy):
        original = build(recipe, [0])
        worlds.append((copier, [original, copier(original)]))
    (_, deep_roots), (_, cow_roots) = worlds
    assert render(deep_roots) == render(cow_roots)
    for op in ops:
        for copier, roots in worlds:
            apply(roots, copier, op)
        assert render(deep_roots) == render(cow_roots), op


@settings(max_examples=300)
@given(recipe=recipes())
def test_cow_copy_shares_payload_and_copies_containers(recipe: Any) -> None:
    original = build(recipe, [0])
    copied = cow_copy(original)

    def payload(root: Any) -> list[int]:
        found: list[int] = []

        def visit(obj: Any) -> None:
            if isinstance(obj, (torch.Tensor, SharedPayload)):
                found.append(id(obj))
            for child in children(obj):
                visit(child)
            if isinstance(obj, PatchObject):
                found.append(id(obj.payload))

        visit(root)
        return found

    assert payload(copied) == payload(original)
    original_ids = {id(m) for m in mutables(original)}
    assert not any(id(m) in original_ids for m in mutables(copied))
