"""``cow_copy`` against ``copy.deepcopy`` as the oracle, on random option trees and operation sequences.

Two worlds are built from the same random recipe: one copies with ``copy.deepcopy``, the other
with ``cow_copy``. The same random operations (set, delete, nested mutation, append, in-place
change of a patch object, clone of a clone, mutating the original after cloning) run on both;
after every operation all roots of both worlds must render identically, aliasing included
(each mutable object is numbered at its first appearance across all roots; tensors are numbered
within each root, so a copy that splits one tensor into two, or joins two, differs).

Object kinds beyond plain containers: objects copied through ``__reduce_ex__`` (with and without
``__slots__``), objects whose own ``__deepcopy__`` calls ``copy.deepcopy(value, memo)``, objects
whose ``__reduce_ex__`` returns a reduce tuple of any length (0 to 6 items: ``copy`` raises for
fewer than 2 or a 6th ``state_setter``, and ``cow_copy`` must raise the same error) or a string,
one tensor appearing at many places, dicts built in a shuffled order, and deep nesting.
"""

from __future__ import annotations

import copy
import random
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
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


class DeepcopiedPatch:
    """Copies itself with its own ``__deepcopy__``, each attribute through ``copy.deepcopy(value, memo)``."""

    def __init__(self, items: list[Any], payload: torch.Tensor) -> None:
        self.items = items
        self.payload = payload

    def __deepcopy__(self, memo: dict[int, Any]) -> DeepcopiedPatch:
        result = type(self).__new__(type(self))
        memo[id(self)] = result
        for name, value in self.__dict__.items():
            setattr(result, name, copy.deepcopy(value, memo))
        return result


def _set_state(obj: Reduced, state: Any) -> None:  # pragma: no cover - copy never calls a state_setter
    obj.__dict__.update(state)


class Reduced(dict[str, Any]):
    """Reduces to the first ``length`` items of (class, args, state, listiter, dictiter, state_setter).

    ``length == -1``: ``__reduce_ex__`` returns a string (the object is then its own copy).
    """

    def __init__(self, length: int, payload: list[Any]) -> None:
        super().__init__()
        self.length = length
        self.payload = payload
        self.log: list[Any] = []

    def append(self, item: Any) -> None:
        self.log.append(item)

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.length == -1:
            return "Reduced"
        state = {"payload": self.payload}
        full = (Reduced, (self.length, []), state, iter(self.log), iter(self.items()), _set_state)
        return full[: self.length]


class Holder:
    def __init__(self, value: Any) -> None:
        self.value = value

    def method(self) -> Any:
        return self.value


def patch_function(q: Any) -> Any:
    return q


PAYLOAD_KINDS = ("tensor", "shared", "function", "common")
"""``common``: the one tensor of a build, wherever it appears (aliasing across object kinds)."""
REDUCE_LENGTHS = (-1, 0, 1, 2, 3, 4, 5, 5, 5, 6)

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
            st.lists(children, max_size=3).map(lambda xs: ("deepcopied", xs)),
            st.tuples(
                st.sampled_from(REDUCE_LENGTHS),
                st.lists(children, max_size=2),
                st.dictionaries(st.text("r", min_size=1, max_size=2), children, max_size=2),
            ).map(lambda t: ("reduced", t)),
        ),
        max_leaves=20,
    )


@dataclass
class Build:
    """State of one build: payload numbering, the build's common tensor, an optional dict-order shuffle."""

    counter: int = 0
    common: torch.Tensor = field(default_factory=lambda: torch.full((2,), -1.0))
    rng: random.Random | None = None

    def next(self) -> int:
        self.counter += 1
        return self.counter

    def ordered(self, items: dict[Any, Any]) -> dict[Any, Any]:
        """``items`` re-inserted in a shuffled order when shuffling (values already built)."""
        if self.rng is None:
            return items
        keys = list(items)
        self.rng.shuffle(keys)
        return {k: items[k] for k in keys}


def build(recipe: Any, ctx: Build) -> Any:
    """Turn a recipe into a fresh object tree (payload values numbered deterministically)."""
    if not isinstance(recipe, tuple):
        return recipe
    kind, body = recipe
    if kind == "payload":
        if body == "common":
            return ctx.common
        number = ctx.next()
        if body == "tensor":
            return torch.full((2,), float(number))
        return SharedPayload(number) if body == "shared" else patch_function
    if kind == "list":
        return [build(x, ctx) for x in body]
    if kind == "tuple":
        return tuple(build(x, ctx) for x in body)
    if kind == "dict":
        return ctx.ordered({k: build(v, ctx) for k, v in body.items()})
    if kind == "set":
        return set(body)
    if kind == "object":
        name, items = body
        number = ctx.next()
        return PatchObject(name, [build(x, ctx) for x in items], torch.arange(3.0) + number)
    if kind == "deepcopied":
        items = [build(x, ctx) for x in body]
        return DeepcopiedPatch(items, ctx.common)
    if kind == "reduced":
        length, payload, entries = body
        if (
            length == -1
        ):  # its own copy in both worlds: holding a tensor, it would show the documented sharing
            return Reduced(length, [])
        reduced = Reduced(length, [build(x, ctx) for x in payload])
        reduced.log.append(ctx.common)
        reduced.update(ctx.ordered({k: build(v, ctx) for k, v in entries.items()}))
        return reduced
    return SlottedPatch(len(body), ctx.ordered({k: build(v, ctx) for k, v in body.items()}))


def mutables(root: Any, own_copies: bool = True) -> list[Any]:
    """Mutable containers and objects reachable from ``root``, in a deterministic order.

    ``own_copies=False``: leaving out objects that are their own copy (in ``copy.deepcopy`` too) and
    what they hold.
    """
    found: list[Any] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if not own_copies and isinstance(obj, Reduced) and obj.length == -1:
            return
        if isinstance(obj, (dict, list, set, PatchObject, SlottedPatch, DeepcopiedPatch)):
            if id(obj) in seen:
                return
            seen.add(id(obj))
            found.append(obj)
        for child in children(obj):
            visit(child)

    visit(root)
    return found


def children(obj: Any) -> list[Any]:
    if isinstance(obj, Reduced):
        return [obj.payload, obj.log, *(obj[k] for k in sorted(obj))]
    if isinstance(obj, DeepcopiedPatch):
        return [obj.items, obj.payload]
    if isinstance(obj, dict):
        return [obj[k] for k in sorted(obj, key=repr)]
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if isinstance(obj, PatchObject):
        return [obj.items]
    if isinstance(obj, SlottedPatch):
        return [obj.table]
    return []


def render(roots: list[Any], tensors_across_roots: bool = False) -> list[Any]:
    """Values and aliasing of all roots: mutable objects are numbered at their first appearance.

    Tensors are numbered at their first appearance within each root (``tensors_across_roots``:
    across all roots, which shows what a copy shares with its original).
    """
    numbers: dict[int, int] = {}
    tensors: dict[int, int] = {}

    def show(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            number = tensors.setdefault(id(obj), len(tensors))
            return ("tensor", tuple(obj.tolist()), number)
        if isinstance(obj, SharedPayload):
            return ("shared", obj.value)
        if isinstance(obj, types.FunctionType):
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
        number = numbers[id(obj)] = len(numbers)
        if tag is not None:
            return (*tag, number)
        if isinstance(obj, Reduced):
            entries = tuple((k, show(obj[k])) for k in sorted(obj))
            return ("reduced", number, obj.length, show(obj.payload), show(obj.log), entries)
        if isinstance(obj, dict):
            return ("dict", number, tuple((k, show(obj[k])) for k in sorted(obj, key=repr)))
        if isinstance(obj, list):
            return ("list", number, tuple(show(x) for x in obj))
        if isinstance(obj, PatchObject):
            return ("object", number, obj.name, show(obj.items), show(obj.payload))
        if isinstance(obj, DeepcopiedPatch):
            return ("deepcopied", number, show(obj.items), show(obj.payload))
        return ("slotted", number, obj.scale, show(obj.table))

    rendered = []
    for root in roots:
        if not tensors_across_roots:
            tensors.clear()
        rendered.append(show(root))
    return rendered


def attempt(copier: Any, obj: Any) -> tuple[Any, str | None]:
    """``(copier(obj), None)``, or ``(None, "ExceptionType: message")`` when it raises."""
    try:
        return copier(obj), None
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"


operations = st.lists(
    st.tuples(
        st.sampled_from(["set", "delete", "append", "object", "alias", "clone"]),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(-9, 9),
    ),
    max_size=12,
)


def apply(roots: list[Any], copier: Any, op: tuple[str, int, int, int], errors: list[str]) -> None:
    kind, where, pick, value = op
    root_index = where % len(roots)
    if kind == "clone":
        copied, error = attempt(copier, roots[root_index])
        if error is None:
            roots.append(copied)
        else:
            errors.append(error)
        return
    targets = mutables(roots[root_index], own_copies=False)  # objects shared by all roots stay as built
    if not targets:
        return
    target = targets[pick % len(targets)]
    if kind == "alias":  # make another reachable container appear a second time
        others = [t for t in targets if not isinstance(t, set)]
        if isinstance(target, (list, dict)) and others:
            other = others[value % len(others)]
            target.append(other) if isinstance(target, list) else target.__setitem__("alias", other)
        return
    if isinstance(target, Reduced):
        target.log.append(value)
        target[f"r{value}"] = [value]
    elif isinstance(target, DeepcopiedPatch):
        target.items.append(value)
    elif isinstance(target, set):
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
        original = build(recipe, Build())
        copied, error = attempt(copier, original)
        errors = [] if error is None else [error]
        worlds.append((copier, [original] if error else [original, copied], errors))
    (_, deep_roots, deep_errors), (_, cow_roots, cow_errors) = worlds
    assert cow_errors == deep_errors
    assert render(deep_roots) == render(cow_roots)
    for op in ops:
        for copier, roots, errors in worlds:
            apply(roots, copier, op, errors)
        assert cow_errors == deep_errors, op
        assert render(deep_roots) == render(cow_roots), op


def payload_ids(root: Any) -> list[int]:
    """Identities of the tensors and declared-shared objects reachable from ``root``, in a fixed order."""
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


@settings(max_examples=300)
@given(recipe=recipes())
def test_cow_copy_shares_payload_and_copies_containers(recipe: Any) -> None:
    original = build(recipe, Build())
    copied, error = attempt(cow_copy, original)
    if error is not None:
        assert error == attempt(copy.deepcopy, original)[1]
        return
    shared = payload_ids(copied)
    assert len(shared) == len(payload_ids(copy.deepcopy(original))), "payload at the places deepcopy puts it"
    assert set(shared) <= set(payload_ids(original)), "every tensor and shared object is the original's"
    original_ids = {id(m) for m in mutables(original)}
    assert not any(id(m) in original_ids for m in mutables(copied, own_copies=False))


@settings(max_examples=500)
@given(recipe=recipes(), seed=st.integers(0, 2**32 - 1))
def test_cow_copy_does_not_depend_on_dict_order(recipe: Any, seed: int) -> None:
    """The same tree with every dict built in another order: the same copy, the same sharing."""
    recipe = ("dict", {"c": ("payload", "common"), "t": recipe, "d": ("deepcopied", [("payload", "common")])})
    results = []
    for rng in (None, random.Random(seed)):
        original = build(recipe, Build(rng=rng))
        copied, error = attempt(cow_copy, original)
        results.append((error, None if error else render([original, copied], tensors_across_roots=True)))
    assert results[0] == results[1]


def test_deepcopy_inside_an_object_shares_and_keeps_aliasing_in_either_order() -> None:
    """An object whose __deepcopy__ calls copy.deepcopy(value, memo) shares the tensor cow_copy shares."""
    tensor = torch.ones(2)
    patch = DeepcopiedPatch([tensor], tensor)
    for options in ({"patch": patch, "ids": tensor}, {"ids": tensor, "patch": patch}):
        copied = cow_copy(options)
        assert copied["patch"] is not patch and copied["patch"].items is not patch.items
        assert copied["patch"].payload is tensor and copied["patch"].items[0] is tensor
        assert copied["ids"] is tensor


@pytest.mark.parametrize("length", range(8))
def test_reduce_tuples_of_every_length_behave_as_in_deepcopy(length: int) -> None:
    class Exact:
        def __init__(self, payload: list[Any]) -> None:
            self.payload = payload

        def append(self, item: Any) -> None:
            self.payload.append(item)

        def __setitem__(self, key: str, value: Any) -> None:
            setattr(self, key, value)

        def __reduce_ex__(self, protocol: Any) -> Any:
            full = (Exact, ([],), {"payload": self.payload}, iter([1]), iter([("k", [2])]), _set_state, None)
            return full[:length]

    outcomes = [attempt(copier, Exact([torch.ones(1)])) for copier in (copy.deepcopy, cow_copy)]
    (deep, deep_error), (cow, cow_error) = outcomes
    assert cow_error == deep_error
    assert (deep_error is None) == (2 <= length <= 5)
    if deep_error is None:
        assert vars(cow).keys() == vars(deep).keys()
        assert [repr(x) for x in cow.payload] == [repr(x) for x in deep.payload]


def test_an_object_without_any_reduce_method_raises_copy_error() -> None:
    class Opaque:
        __reduce_ex__ = None
        __reduce__ = None

    for copier in (copy.deepcopy, cow_copy):
        with pytest.raises(copy.Error, match="un\\(deep\\)copyable object of type"):
            copier(Opaque())


NESTERS: dict[str, Any] = {
    "list": lambda x: [x],
    "dict": lambda x: {"k": x},
    "tuple": lambda x: (x, []),
    "object": lambda x: PatchObject("p", [x], torch.zeros(1)),
    "slotted": lambda x: SlottedPatch(1, {"t": x}),
    "deepcopied": lambda x: DeepcopiedPatch([x], torch.zeros(1)),
    "reduced": lambda x: Reduced(5, [x]),
    "method": lambda x: Holder(x).method,
}


def nested(pattern: list[str], depth: int) -> Any:
    value: Any = [0]
    for level in range(depth):
        value = NESTERS[pattern[level % len(pattern)]](value)
    return value


def copies(copier: Any, obj: Any) -> bool:
    """Whether ``copier(obj)`` succeeds; ``False`` on ``RecursionError``. Called at the same depth for both."""
    try:
        copier(obj)
    except RecursionError:
        return False
    return True


def deepest(copier: Any, pattern: list[str], high: int) -> int:
    """The largest nesting depth ``copier`` copies (binary search; copying is monotonic in depth)."""
    low = 0
    while low < high:
        middle = (low + high + 1) // 2
        if copies(copier, nested(pattern, middle)):
            low = middle
        else:
            high = middle - 1
    return low


@pytest.mark.parametrize("kind", sorted(NESTERS))
def test_cow_copy_nests_as_deep_as_deepcopy(kind: str) -> None:
    """Under the default recursion limit: as deep as deepcopy, kind by kind (lists were ~248 vs 498)."""
    deep = deepest(copy.deepcopy, [kind], 2 * sys.getrecursionlimit())
    assert deep > 50
    assert copies(cow_copy, nested([kind], deep)), f"{kind}: deepcopy copies {deep} levels, cow_copy does not"


@settings(max_examples=40)
@given(pattern=st.lists(st.sampled_from(sorted(NESTERS)), min_size=2, max_size=4))
def test_cow_copy_nests_as_deep_as_deepcopy_mixed(pattern: list[str]) -> None:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 300)  # a lower limit: fewer levels to build and copy
    try:
        deep = deepest(copy.deepcopy, pattern, 300)
        assert copies(cow_copy, nested(pattern, deep)), (
            f"{pattern}: deepcopy copies {deep} levels, cow_copy does not"
        )
    finally:
        sys.setrecursionlimit(limit)
