"""The V3 form of the seven nodes (``instantid.comfy.v3``, ComfyUI >= 0.3.47) against their V1 classes: the same
node ids, display names, input ids and order, types, defaults, ranges and tooltips, outputs and their names,
category and description; ``execute`` runs the V1 function. The root ``__init__.py`` offers V3 where the ComfyUI
has ``comfy_api.latest`` and V1 otherwise or with ``INSTANTID_NODE_SCHEMA=v1``. On the March 2024 ComfyUI of
``make test`` the V3 checks skip (no ``comfy_api``); CI runs them on ComfyUI 0.3.64, where the server tests and
the templates (``test_server.py``, ``test_templates.py``) then run the V3 form."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
from pathlib import Path
from typing import Any

import pytest

from instantid.testing import comfyui

REPO = Path(__file__).resolve().parents[2]


def has_v3(comfy: comfyui.ComfyUI) -> bool:
    try:
        return importlib.util.find_spec("comfy_api.latest") is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def v3(comfy: comfyui.ComfyUI) -> Any:
    if not has_v3(comfy):
        pytest.skip("this ComfyUI has no comfy_api.latest (V3 schema, ComfyUI >= 0.3.47): the V1 form is used")
    from instantid.comfy import v3

    return v3


def v1_shape(spec: dict[str, Any]) -> dict[str, Any]:
    """A V3 node's ``INPUT_TYPES()`` with its combos as V1 lists (V3 adds ``multiselect: False``)."""

    def entry(e: Any) -> Any:
        if e[0] != "COMBO":
            return tuple(e)
        options = {k: v for k, v in e[1].items() if k not in ("options", "multiselect")}
        return (e[1]["options"], options)

    return {section: {n: entry(e) for n, e in spec.get(section, {}).items()} for section in ("required", "optional") if spec.get(section)}


def test_each_v3_node_has_its_v1_interface(v3: Any) -> None:
    from instantid.comfy import nodes

    assert [n.GET_SCHEMA().node_id for n in v3.NODES] == list(nodes.NODE_CLASS_MAPPINGS)
    for node in v3.NODES:
        v1 = node.V1
        schema = node.GET_SCHEMA()
        assert nodes.NODE_CLASS_MAPPINGS[schema.node_id] is v1
        assert schema.display_name == nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id]
        assert (schema.category, schema.description) == (v1.CATEGORY, v1.DESCRIPTION)
        expected = {s: {n: (e[0], e[1]) if len(e) > 1 else (e[0], {}) for n, e in d.items()} for s, d in v1.INPUT_TYPES().items()}
        got = {s: {n: (e[0], e[1]) if len(e) > 1 else (e[0], {}) for n, e in d.items()} for s, d in v1_shape(node.INPUT_TYPES()).items()}
        assert got == expected, schema.node_id
        assert [list(d) for d in got.values()] == [list(d) for d in expected.values()], "input order"
        assert tuple(node.RETURN_TYPES) == v1.RETURN_TYPES
        assert tuple(node.RETURN_NAMES) == tuple(getattr(v1, "RETURN_NAMES", None) or v1.RETURN_TYPES)


def test_v3_execute_runs_the_v1_function(v3: Any) -> None:
    (node,) = [n for n in v3.NODES if n.GET_SCHEMA().node_id == "ApplyInstantIDControlNet"]
    positive, negative = [["p", {}]], [["n", {}]]
    out = node.execute(face_embeds={}, control_net=None, image_kps=None, positive=positive, negative=negative,
                       strength=0.0, start_at=0.0, end_at=1.0)  # fmt: skip
    assert out.args == (positive, negative)  # strength 0: the conditioning unchanged, as V1 returns it


def _load(comfy: comfyui.ComfyUI, path: Path) -> None:
    loaded = comfy.nodes.load_custom_node(str(path))
    if inspect.isawaitable(loaded):
        loaded = asyncio.run(loaded)
    assert loaded is True


@pytest.mark.parametrize("schema", ["auto", "v1"])
def test_the_root_offers_the_form_this_comfyui_has(
    comfy: comfyui.ComfyUI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schema: str
) -> None:
    from instantid.comfy import nodes

    if schema == "v1":
        monkeypatch.setenv("INSTANTID_NODE_SCHEMA", "v1")
    link = tmp_path / "instantid-cow"
    link.symlink_to(REPO, target_is_directory=True)
    saved = dict(comfy.nodes.NODE_CLASS_MAPPINGS)
    try:
        _load(comfy, link)
        registered = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyInstantID"]
    finally:
        comfy.nodes.NODE_CLASS_MAPPINGS.clear()
        comfy.nodes.NODE_CLASS_MAPPINGS.update(saved)
    if schema == "auto" and has_v3(comfy):
        assert registered.V1 is nodes.ApplyInstantID and registered.__module__ == "instantid.comfy.v3"
    else:
        assert registered is nodes.ApplyInstantID
