"""diffusers' own test files as the oracle of ``cow_model``'s isolation contract (issue 8).

A pytest plugin, loaded with ``-p diffusers_oracle`` (``tools/`` on ``PYTHONPATH``), that runs
diffusers' test files with every model they build replaced by a ``LazyClonedModel`` clone:

- Each test module's names bound to a target class (default: diffusers'
  ``UNet2DConditionModel`` and ``Attention``; ``--oracle-classes`` to change) are replaced,
  for the whole session, by a *factory class*: a subclass of the real class whose metaclass
  builds ``base = Real(*args, **kwargs)`` and returns ``LazyClonedModel(base)``.
  ``Factory.from_pretrained(...)`` / ``from_single_file(...)`` load with the real class and
  return a clone of the loaded model; ``from_config`` goes through the factory's ``__call__``.
  ``isinstance(clone, Factory)`` and ``issubclass(X, Factory)`` answer as for the real class,
  and ``__name__`` is the real one, so ``self.model_class(**init_dict)`` in diffusers'
  tester mixins, ``UNet2DConditionModel(...)`` in the test bodies and class-scoped fixtures all
  get clones.
- Each base is snapshotted bit-for-bit when its clone is made: per module path of
  ``named_modules(remove_duplicate=False)``: the module's identity, class, ``training`` flag,
  child/parameter/buffer slots and every other attribute (hook dicts, attention processors and
  their attributes, config, flags such as ``gradient_checkpointing``), fingerprinted by value
  for plain data and by identity (plus shallow attributes) for objects; per parameter and
  buffer: identity, class, ``data_ptr``, storage offset, shape, stride, dtype, device,
  ``requires_grad``, version counter, raw bytes of the values, and ``.grad``.
- After each test's call (and again after its teardown) every live base is compared with its
  snapshot; a difference fails the test with ``BaseChanged`` listing what changed.

Categories (``--oracle-report FILE`` writes them as JSON; the summary below prints them):

``pass``      passed on the clone, base unchanged
``refused``   failed with ``cow_model.SharedWeightsError`` (anywhere in the exception chain), base unchanged
``changed``   the base changed (whatever the test's outcome)
``grad``      only the ``.grad`` of base parameters changed (a backward through the clone)
``broke``     failed otherwise, base unchanged
``skipped`` / ``xfail`` / ``xpass``

``--oracle-control`` checks the harness itself: models are snapshotted and checked but the tests
get the models, not clones, so every test that mutates its model reports ``changed`` (46 of the
57 tests that pass on plain models do, with diffusers 0.42.1 and the tests of diffusers' main
branch of August 2026: ``.eval()``, dtype conversions, processors, LoRA, IP-Adapter, ...).
Against cow_model as of commit 895b5da the clone pass reproduces issue 8's count: of 57, 37 hold
(4 refused, 3 with only ``.grad`` set) and 20 change the base (18) or break (2).

Run everything (plain pass, clone pass, table) with ``tools/run_diffusers_oracle.sh TESTS_DIR VENV``;
``python tools/diffusers_oracle.py summary PLAIN.xml CLONE.json`` prints the table from a plain
run's ``--junitxml`` and a clone run's ``--oracle-report``.

The test files are diffusers' repository's (``tests/models/unets/test_models_unet_2d_condition.py``,
``tests/models/test_attention_processor.py`` and what they import), not in its registry package;
they are fetched outside this repository and never committed.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import types
from collections.abc import Iterator
from typing import Any

DEFAULT_CLASSES = (
    "diffusers.UNet2DConditionModel",
    "diffusers.models.attention_processor.Attention",
)
LOADERS = ("from_pretrained", "from_single_file")
MAX_LISTED = 8

# --------------------------------------------------------------------------------------------
# snapshots

_PRIMITIVES = (bool, int, str, bytes, type(None), type(Ellipsis))
_STRUCTURAL = {"_parameters", "_buffers", "_modules", "training"}


def _tensor_meta(t: Any) -> tuple:
    try:
        version = t._version
    except Exception:  # inference tensors have no version counter
        version = None
    try:
        ptr = t.data_ptr()
    except Exception:
        ptr = None
    return (
        id(t),
        type(t).__name__,
        ptr,
        t.storage_offset() if t.layout.__repr__() == "torch.strided" else None,
        tuple(t.shape),
        tuple(t.stride()) if t.layout.__repr__() == "torch.strided" else None,
        str(t.dtype),
        str(t.device),
        bool(t.requires_grad),
        version,
    )


def _tensor_bytes(t: Any) -> Any:
    import torch

    if t.device.type == "meta" or t.layout != torch.strided or t.is_quantized:
        return None
    x = t.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    return x.contiguous().reshape(-1).view(torch.uint8).clone()


def _fp(v: Any, depth: int = 0) -> Any:
    """A comparable fingerprint of an attribute value: plain data by value, objects by identity."""
    import torch
    from torch import nn

    if isinstance(v, _PRIMITIVES):
        return v
    if isinstance(v, float):
        return ("float", repr(v))  # NaN == NaN, -0.0 != 0.0
    if isinstance(v, (torch.dtype, torch.device)):
        return ("torch", str(v))
    if isinstance(v, torch.Tensor):
        return ("tensor", _tensor_meta(v))
    if isinstance(v, nn.Module):
        return ("module", type(v).__name__, id(v))
    if isinstance(v, type):
        return ("class", v.__module__, v.__qualname__)
    if isinstance(v, types.MethodType):
        return ("method", v.__func__.__qualname__, id(v.__func__), _fp(v.__self__, depth + 1))
    if isinstance(v, functools.partial):
        return ("partial", _fp(v.func, depth + 1), _fp(v.args, depth + 1), _fp(v.keywords, depth + 1))
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
        return ("function", getattr(v, "__qualname__", "?"), id(v))
    if depth >= 4:
        return ("deep", type(v).__name__, id(v))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, id(v) if isinstance(v, list) else None, tuple(_fp(x, depth + 1) for x in v))
    if isinstance(v, (set, frozenset)):
        return (
            type(v).__name__,
            id(v) if isinstance(v, set) else None,
            tuple(sorted(repr(_fp(x, depth + 1)) for x in v)),
        )
    if isinstance(v, dict):
        return (
            type(v).__name__,
            id(v),
            tuple((repr(k), _fp(x, depth + 1)) for k, x in v.items()),
        )
    attrs = None
    if depth <= 1 and hasattr(v, "__dict__") and not isinstance(v, types.ModuleType):
        try:
            attrs = tuple((k, _fp(x, depth + 2)) for k, x in sorted(vars(v).items()))
        except Exception:
            attrs = None
    return ("object", type(v).__qualname__, id(v), attrs)


class Snapshot:
    """Everything observable of a module tree that a clone must never change."""

    def __init__(self, root: Any) -> None:
        self.modules: dict[str, tuple] = {}
        self.attrs: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, tuple] = {}
        self.values: dict[str, Any] = {}
        self.grads: dict[str, Any] = {}
        for path, module in root.named_modules(remove_duplicate=False):
            d = vars(module)
            self.modules[path] = (
                id(module),
                type(module).__qualname__,
                bool(module.training),
                tuple((k, id(m)) for k, m in module._modules.items()),
                tuple((k, id(t)) for k, t in module._parameters.items()),
                tuple((k, id(t)) for k, t in module._buffers.items()),
            )
            self.attrs[path] = {k: _fp(v) for k, v in d.items() if k not in _STRUCTURAL}
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is None:
                        continue
                    key = f"{path}.{name}" if path else name
                    self.tensors[key] = _tensor_meta(t)
                    self.values[key] = _tensor_bytes(t)
                    g = t.grad if kind == "_parameters" else None
                    self.grads[key] = None if g is None else (_tensor_meta(g), _tensor_bytes(g))


_META_FIELDS = (
    "object",
    "class",
    "data_ptr",
    "storage_offset",
    "shape",
    "stride",
    "dtype",
    "device",
    "requires_grad",
    "version counter",
)


def _short(v: Any, limit: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _attr_diff(a: Any, b: Any) -> str:
    """One line on how two attribute fingerprints differ."""
    if isinstance(a, tuple) and isinstance(b, tuple) and a and b and a[0] != b[0]:
        return f"{a[0]} -> {b[0]}"
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 4 and a[0] == b[0] == "object":
        if a[1] != b[1] or a[2] != b[2]:
            return f"replaced: {a[1]} -> {b[1]}"
        da, db = dict(a[3] or ()), dict(b[3] or ())
        keys = sorted(set(da) | set(db))
        ch = [k for k in keys if da.get(k, "<absent>") != db.get(k, "<absent>")]
        return "its attributes changed: " + ", ".join(
            f"{k}: {_short(da.get(k, '<absent>'), 40)} -> {_short(db.get(k, '<absent>'), 40)}" for k in ch[:4]
        )
    if (
        isinstance(a, tuple)
        and isinstance(b, tuple)
        and len(a) == 3
        and a[0] == b[0]
        and a[0] in ("dict", "OrderedDict", "FrozenDict", "list", "set")
    ):
        if a[1] != b[1]:
            return f"{a[0]} object replaced"
        ka, kb = dict(a[2]) if a[0] != "list" else {}, dict(b[2]) if b[0] != "list" else {}
        if ka or kb:
            added = [k for k in kb if k not in ka]
            removed = [k for k in ka if k not in kb]
            changed = [k for k in ka if k in kb and ka[k] != kb[k]]
            parts = []
            if added:
                parts.append("added " + ", ".join(added[:3]))
            if removed:
                parts.append("removed " + ", ".join(removed[:3]))
            if changed:
                parts.append("changed " + ", ".join(changed[:3]))
            return "; ".join(parts) or "contents changed"
    return f"{_short(a, 60)} -> {_short(b, 60)}"


def compare(before: Snapshot, after: Snapshot) -> tuple[list[str], list[str]]:
    """(changes, grad_changes): one line per difference, module paths first."""
    import torch

    out: list[str] = []
    gone = [p for p in before.modules if p not in after.modules]
    new = [p for p in after.modules if p not in before.modules]
    out += [f"{p or '<root>'}: module path gone" for p in gone]
    out += [f"{p}: module path added" for p in new]
    for path, a in before.modules.items():
        b = after.modules.get(path)
        if b is None:
            continue
        where = path or "<root>"
        if a[0] != b[0]:
            out.append(f"{where}: module replaced ({a[1]} -> {b[1]})")
            continue
        if a[1] != b[1]:
            out.append(f"{where}: class {a[1]} -> {b[1]}")
        if a[2] != b[2]:
            out.append(f"{where}: training {a[2]} -> {b[2]}")
        for i, what in ((3, "children"), (4, "parameter slots"), (5, "buffer slots")):
            if a[i] != b[i]:
                ka, kb = dict(a[i]), dict(b[i])
                diff = sorted(k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k))
                out.append(f"{where}: {what} changed: {', '.join(diff[:4])}")
        aa, ab = before.attrs[path], after.attrs[path]
        for k in sorted(set(aa) | set(ab)):
            if k not in ab:
                out.append(f"{where}: attribute {k!r} removed")
            elif k not in aa:
                out.append(f"{where}: attribute {k!r} added ({_short(ab[k], 60)})")
            elif aa[k] != ab[k]:
                out.append(f"{where}: attribute {k!r} {_attr_diff(aa[k], ab[k])}")
    for key, a in before.tensors.items():
        b = after.tensors.get(key)
        if b is None:
            continue  # reported with its module
        if a[0] != b[0]:
            out.append(f"tensor {key}: tensor object replaced")
            continue
        fields = [
            f"{_META_FIELDS[i]} {_short(a[i], 30)} -> {_short(b[i], 30)}"
            for i in range(1, len(a))
            if a[i] != b[i]
        ]
        va, vb = before.values[key], after.values[key]
        if va is not None and vb is not None and (va.shape != vb.shape or not torch.equal(va, vb)):
            fields.append("values changed")
        if fields:
            out.append(f"tensor {key}: " + "; ".join(fields))
    grads: list[str] = []
    for key, ga in before.grads.items():
        if key not in after.grads:
            continue
        gb = after.grads[key]
        if (ga is None) != (gb is None):
            grads.append(f"tensor {key}: .grad {'set' if gb is not None else 'cleared'}")
        elif (
            ga is not None
            and gb is not None
            and (
                ga[0] != gb[0]
                or ga[1] is None
                or gb[1] is None
                or ga[1].shape != gb[1].shape
                or not torch.equal(ga[1], gb[1])
            )
        ):
            grads.append(f"tensor {key}: .grad changed")
    return out, grads


# --------------------------------------------------------------------------------------------
# bases and clones


class _Base:
    """A base, its snapshot, and where it was built."""

    __slots__ = ("base", "nodeid", "origin", "snapshot")

    def __init__(self, base: Any, origin: str, nodeid: str | None) -> None:
        self.base = base  # held until the test that built it is torn down: its frame dies before the check
        self.snapshot = Snapshot(base)
        self.origin = origin
        self.nodeid = nodeid


class Oracle:
    def __init__(self) -> None:
        self.bases: list[_Base] = []
        self.current: str | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.originals: list[tuple[Any, str, Any]] = []
        self.factories: dict[Any, Any] = {}
        self.targets: list[Any] = []
        self.clones_made = 0
        self.control = False

    # -- cloning --------------------------------------------------------------------------------

    def clone(self, base: Any, origin: str) -> Any:
        from cow_model import LazyClonedModel

        self.bases.append(_Base(base, origin, self.current))
        self.clones_made += 1
        if self.control:  # the harness's own check: no clone, every mutation reaches the "base"
            return base
        return LazyClonedModel(base)

    def factory(self, real: type) -> type:
        if real in self.factories:
            return self.factories[real]
        oracle = self
        meta = type(real)

        class FactoryMeta(meta):  # type: ignore[misc, valid-type]
            def __call__(cls, *args: Any, **kwargs: Any) -> Any:
                return oracle.clone(real(*args, **kwargs), f"{real.__name__}(...)")

            def __instancecheck__(cls, obj: Any) -> bool:
                return isinstance(obj, real)

            def __subclasscheck__(cls, sub: Any) -> bool:
                return issubclass(sub, real)

        ns: dict[str, Any] = {
            "__module__": real.__module__,
            "__qualname__": real.__qualname__,
            "__doc__": real.__doc__,
            "__oracle_real__": real,
        }

        def loader(name: str) -> Any:
            def load(cls: Any, *args: Any, **kwargs: Any) -> Any:
                result = getattr(real, name)(*args, **kwargs)
                if isinstance(result, tuple):  # output_loading_info=True
                    return (oracle.clone(result[0], f"{real.__name__}.{name}(...)"), *result[1:])
                return oracle.clone(result, f"{real.__name__}.{name}(...)")

            load.__name__ = name
            return classmethod(load)

        for name in LOADERS:
            if hasattr(real, name):
                ns[name] = loader(name)
        factory = FactoryMeta(real.__name__, (real,), ns)
        self.factories[real] = factory
        return factory

    def patch_module(self, module: types.ModuleType) -> None:
        for name, value in list(vars(module).items()):
            if isinstance(value, type) and value in self.targets:
                self.originals.append((module, name, value))
                setattr(module, name, self.factory(value))

    def restore(self) -> None:
        for module, name, value in reversed(self.originals):
            setattr(module, name, value)
        self.originals.clear()

    # -- checking -------------------------------------------------------------------------------

    def check(self, release: bool = False) -> tuple[list[str], list[str]]:
        """Compare every base built since the last release with its snapshot.

        ``release`` (after a test's teardown): forget them. A base is checked in the test that
        built it (setup, call, teardown), not in later ones.
        """
        changes: list[str] = []
        grads: list[str] = []
        for entry in self.bases:
            now = Snapshot(entry.base)
            ch, gr = compare(entry.snapshot, now)
            label = (
                entry.origin if entry.nodeid == self.current else f"{entry.origin} built in {entry.nodeid}"
            )
            changes += [f"[{label}] {c}" for c in ch]
            if gr:
                names = [g.split(":", 1)[0].removeprefix("tensor ") for g in gr]
                grads.append(
                    f"[{label}] .grad of {len(gr)} shared base parameter(s) set or changed "
                    f"(backward through the clone): {', '.join(names[:2])}{', ...' if len(names) > 2 else ''}"
                )
            if ch or gr:
                entry.snapshot = now  # reported once, in the phase that made the change
        if release:
            self.bases = []
        return changes, grads


def _kind(change: str) -> tuple[str, str]:
    """(kind, where) of one change line: what changed, without the path it changed at."""
    import re

    body = re.sub(r"^\[[^\]]*\] ", "", change)
    if body.startswith("tensor "):
        where, _, what = body[len("tensor ") :].partition(": ")
        return "tensor " + what, where
    where, _, what = body.partition(": ")
    if not what:
        return body, ""
    return what, where


def summarize(changes: list[str]) -> str:
    """One line: the kinds of change, most frequent first, each with a count and an example path."""
    groups: dict[str, list[str]] = {}
    for c in changes:
        kind, where = _kind(c)
        groups.setdefault(kind, []).append(where)
    parts = [
        f"{len(w)}x {k}" + (f" (e.g. {w[0]})" if w[0] else "")
        for k, w in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ]
    line = "; ".join(parts[:3]) + (f"; +{len(parts) - 3} other kinds" if len(parts) > 3 else "")
    return line[:400]


class BaseChanged(AssertionError):
    """A test changed a base model through its clone."""


def _refused(exc: BaseException | None) -> bool:
    try:
        from cow_model import SharedWeightsError
    except ImportError:
        return False
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SharedWeightsError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _first_line(exc: BaseException | None, longrepr: Any = None) -> str:
    if exc is not None:
        msg = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]
    if longrepr is not None:
        crash = getattr(getattr(longrepr, "reprcrash", None), "message", None)
        if crash:
            return crash.strip().splitlines()[0][:300]
        return str(longrepr).strip().splitlines()[-1][:300]
    return ""


def _categorize(rec: dict[str, Any]) -> dict[str, Any]:
    """One category per test from its setup/call/teardown reports and the base checks."""
    reports = rec["reports"]
    cat, reason = "pass", ""
    failed = [(when, r, e) for when, (r, e) in reports.items() if r.failed]
    call = reports.get("call")
    skipped = [(when, r) for when, (r, _) in reports.items() if r.skipped]
    if rec["changes"]:
        cat, reason = "changed", summarize(rec["changes"])
    elif failed:
        when, r, e = failed[0]
        if when == "call" and rec["exc"] is not None:
            e = rec["exc"]
        cat = "refused" if _refused(e) else "broke"
        reason = ("" if when == "call" else f"{when}: ") + _first_line(e, r.longrepr)
    elif skipped:
        when, r = skipped[0]
        if hasattr(r, "wasxfail"):
            e = rec["exc"] if when == "call" else reports[when][1]
            if e is not None:  # an expected failure that passes on plain models failed on the clone
                cat = "refused" if _refused(e) else "broke"
                reason = f"(xfail-marked) {_first_line(e)}"
            else:
                cat, reason = "xfail", str(r.wasxfail)
        else:
            lr = r.longrepr
            cat, reason = "skipped", str(lr[2] if isinstance(lr, tuple) else lr)
    elif call is not None and hasattr(call[0], "wasxfail"):
        cat = "xpass"
    elif rec["grads"]:
        cat, reason = "grad", rec["grads"][0]
    return {"category": cat, "reason": reason, "changes": rec["changes"], "grads": rec["grads"]}


# --------------------------------------------------------------------------------------------
# pytest hooks

_ORACLE: Oracle | None = None
_STATE_KEY = "_diffusers_oracle"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("diffusers_oracle")
    group.addoption("--oracle-report", default=None, help="write per-test categories as JSON here")
    group.addoption(
        "--oracle-classes",
        default=",".join(DEFAULT_CLASSES),
        help="comma-separated dotted names of the model classes whose instances become clones",
    )
    group.addoption(
        "--oracle-control",
        action="store_true",
        help="control run: snapshot and check the models but hand the tests the models themselves, "
        "not clones; every test that mutates its model then reports 'changed' (checks the harness)",
    )


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def pytest_configure(config: Any) -> None:
    global _ORACLE
    _ORACLE = Oracle()
    _ORACLE.control = bool(config.getoption("--oracle-control"))
    _ORACLE.targets = [
        _resolve(n.strip()) for n in config.getoption("--oracle-classes").split(",") if n.strip()
    ]
    try:
        importlib.import_module("cow_model.diffusers")  # clone-scoped set_attn_processor, as users get it
    except ImportError:
        pass


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    assert _ORACLE is not None
    seen: set[int] = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and id(module) not in seen:
            seen.add(id(module))
            _ORACLE.patch_module(module)


def pytest_unconfigure(config: Any) -> None:
    if _ORACLE is not None:
        _ORACLE.restore()


def _record(item: Any) -> dict[str, Any]:
    return item.stash.setdefault(_STASH, {"changes": [], "grads": [], "exc": None})


try:
    import pytest

    _STASH = pytest.StashKey[dict]()
except Exception:  # imported outside pytest (the summary command)
    pytest = None  # type: ignore[assignment]
    _STASH = None  # type: ignore[assignment]


def _checked_phase(item: Any, phase: str) -> Iterator[Any]:
    assert _ORACLE is not None
    _ORACLE.current = item.nodeid
    rec = _record(item)
    exc: BaseException | None = None
    try:
        result = yield
    except BaseException as e:  # re-raised below
        exc = e
        result = None
    changes, grads = _ORACLE.check(release=phase == "teardown")
    if phase == "call" or exc is not None:
        rec["exc"] = rec["exc"] or exc
    rec["changes"] += changes
    rec["grads"] += grads
    if changes:
        listed = "\n  ".join(changes[:MAX_LISTED])
        more = f"\n  ... {len(changes) - MAX_LISTED} more" if len(changes) > MAX_LISTED else ""
        raise BaseChanged(
            f"base model changed through its clone ({len(changes)} differences):\n  {listed}{more}"
        ) from exc
    if exc is not None:
        raise exc
    return result


if pytest is not None:

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(item: Any) -> Iterator[Any]:
        return (yield from _checked_phase(item, "setup"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(item: Any) -> Iterator[Any]:
        return (yield from _checked_phase(item, "call"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(item: Any, nextitem: Any) -> Iterator[Any]:
        return (yield from _checked_phase(item, "teardown"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[Any]:
        report = yield
        assert _ORACLE is not None
        rec = _record(item)
        rec.setdefault("reports", {})[report.when] = (report, call.excinfo.value if call.excinfo else None)
        if report.when == "teardown":
            _ORACLE.results[item.nodeid] = _categorize(rec)
        return report

    def pytest_sessionfinish(session: Any, exitstatus: Any) -> None:
        path = session.config.getoption("--oracle-report")
        if path and _ORACLE is not None:
            with open(path, "w") as f:
                json.dump({"clones_made": _ORACLE.clones_made, "tests": _ORACLE.results}, f, indent=1)

    def pytest_terminal_summary(terminalreporter: Any) -> None:
        if _ORACLE is None:
            return
        counts: dict[str, int] = {}
        for res in _ORACLE.results.values():
            counts[res["category"]] = counts.get(res["category"], 0) + 1
        terminalreporter.write_sep("=", "diffusers oracle (models replaced by LazyClonedModel clones)")
        terminalreporter.write_line(
            f"clones made: {_ORACLE.clones_made}; "
            + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        )


# --------------------------------------------------------------------------------------------
# summary: plain run (junit xml) against clone run (oracle json)


def _junit_key(nodeid: str) -> tuple[str, str]:
    """A pytest node id as junit xml names it: (dotted module + classes, test name)."""
    path, *rest = nodeid.split("::")
    module = path.removesuffix(".py").replace("/", ".")
    return ".".join([module, *rest[:-1]]), rest[-1] if rest else ""


def _plain_outcomes(xml_path: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(classname, name) -> (passed | failed | skipped, message) from a junit xml report."""
    import xml.etree.ElementTree as ET

    out: dict[tuple[str, str], tuple[str, str]] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, msg = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, msg = "failed", (child.get("message") or "").strip().split("\n")[0]
                break
            if child.tag == "skipped":
                outcome, msg = "skipped", child.get("message") or ""
        key = (case.get("classname", ""), case.get("name", ""))
        if key not in out or outcome == "failed":  # a teardown error adds a second testcase entry
            out[key] = (outcome, msg)
    return out


def summary(plain_xml: str, clone_json: str, out: Any = sys.stdout) -> int:
    plain = _plain_outcomes(plain_xml)
    with open(clone_json) as f:
        data = json.load(f)
    clone = data["tests"]
    by_key = {_junit_key(k): k for k in clone}
    passing = sorted(k for k, (o, _) in plain.items() if o == "passed")
    cats = ("pass", "refused", "grad", "changed", "broke", "skipped", "xfail", "xpass", "missing")
    rows: dict[str, list[tuple[str, str]]] = {c: [] for c in cats}
    for k in passing:
        m = by_key.get(k)
        if m is None:
            rows["missing"].append(("::".join(k), "not run in the clone pass"))
            continue
        res = clone[m]
        rows[res["category"] or "missing"].append((m, res["reason"]))
    counts = {o: sum(1 for v in plain.values() if v[0] == o) for o in ("passed", "failed", "skipped")}
    w = out.write
    w(
        f"plain models: {len(plain)} tests: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped; clones made in the clone pass: {data.get('clones_made')}\n\n"
    )
    labels = {
        "pass": "hold on clones (pass, base unchanged)",
        "refused": "refused with SharedWeightsError, base unchanged",
        "grad": "pass, base unchanged but .grad of its shared parameters set (a backward)",
        "changed": "changed the base",
        "broke": "broke (other failure, base unchanged)",
        "skipped": "skipped on clones",
        "xfail": "xfail on clones",
        "xpass": "xpass on clones",
        "missing": "not run on clones",
    }
    w(f"| of the {len(passing)} tests that pass on plain models | count |\n| --- | --- |\n")
    for c in cats:
        if rows[c] or c in ("pass", "refused", "changed", "broke"):
            w(f"| {labels[c]} | {len(rows[c])} |\n")
    ok = len(rows["pass"]) + len(rows["refused"]) + len(rows["grad"])
    w(f"| **contract holds (pass + refused + .grad only)** | **{ok}** |\n")
    for c in ("refused", "grad", "changed", "broke", "skipped", "xfail", "xpass", "missing"):
        if rows[c]:
            w(f"\n{labels[c]}:\n")
            for k, reason in rows[c]:
                w(f"  {k.split('::', 1)[1]}\n      {reason}\n")
    passing_set = set(passing)
    extra = sorted(
        k for k, r in clone.items() if r["category"] == "changed" and _junit_key(k) not in passing_set
    )
    if extra:
        w("\nchanged the base in tests that do not pass on plain models:\n")
        for k in extra:
            w(f"  {k.split('::', 1)[1]}\n      {clone[k]['reason']}\n")
    return 0 if ok == len(passing) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "summary":
        sys.exit(summary(sys.argv[2], sys.argv[3]))
    sys.stderr.write("usage: python tools/diffusers_oracle.py summary PLAIN_JUNIT.xml CLONE_REPORT.json\n")
    sys.exit(2)
