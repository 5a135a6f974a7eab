"""ComfyUI workflows as the UI saves them (``nodes`` + ``links``) turned into API-format graphs.

The UI format stores each node's widget values as a list, ``widgets_values``, in the order of the
node's widget inputs in ``INPUT_TYPES`` (``GET /object_info`` gives that order); the frontend adds
one value after a ``seed`` / ``noise_seed`` integer (its "control after generate" choice) and after
an ``image_upload`` combo (its upload button). Links are ``[id, from node, from slot, to node, to
slot, type]``. The API format is ``{node id: {"class_type", "inputs": {name: value or [from id,
slot]}}}``, what ``POST /prompt`` takes.

:func:`to_api` converts, skipping muted and bypassed nodes and the UI-only ones (notes, reroutes,
primitives are followed to their value); :func:`set_inputs` changes inputs of the converted graph
by node type.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
UI_ONLY = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    """A workflow that does not convert: unknown node type, widget values that do not fit, a dangling link."""


def load_workflow(path: str | Path) -> dict[str, Any]:
    """Read a UI-format workflow file."""
    return json.loads(Path(path).read_text())


def _inputs(spec: Mapping[str, Any]) -> dict[str, Any]:
    declared = spec["input"]
    return {**declared.get("required", {}), **declared.get("optional", {})}


def is_widget(spec: Any) -> bool:
    """Whether an ``INPUT_TYPES`` entry is a widget (a value in the UI) rather than a link: a V1 list of choices,
    a V3 ``"COMBO"`` (its choices in ``spec[1]["options"]``), or a number, string or boolean."""
    return isinstance(spec[0], list) or spec[0] == "COMBO" or spec[0] in WIDGET_TYPES


def _extra_value_after(name: str, spec: Any) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("image_upload"):
        return True
    return spec[0] == "INT" and (
        name in ("seed", "noise_seed") or bool(options.get("control_after_generate"))
    )


def widget_values(node: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Map ``node["widgets_values"]`` onto the widget inputs of ``spec`` (an ``/object_info`` entry)."""
    values = list(node.get("widgets_values") or [])
    if isinstance(node.get("widgets_values"), dict):  # some packs save {name: value}
        return dict(node["widgets_values"])
    converted = {i["name"] for i in node.get("inputs", []) if i.get("widget") and i.get("link") is not None}
    out: dict[str, Any] = {}
    position = 0
    for name, input_spec in _inputs(spec).items():
        if not is_widget(input_spec):
            continue
        if position >= len(values):
            break
        if name not in converted:
            out[name] = values[position]
        position += 1
        if _extra_value_after(name, input_spec) and position < len(values):
            if not input_spec[1].get("image_upload") and values[position] not in SEED_CONTROLS:
                continue
            position += 1
    if position < len(values):
        raise WorkflowError(f"{node['type']} #{node['id']}: widget values {values} do not fit its widgets")
    return out


def to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The API-format graph of a UI-format ``workflow``; ``object_info`` from ``GET /object_info``.

    Raises :class:`WorkflowError` naming the node for an unknown type or widget values that do not fit.
    """
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}

    def source(link_id: int) -> list[Any] | Any:
        _, from_id, from_slot, *_ = links[link_id]
        origin = nodes[from_id]
        if origin["type"] == "Reroute":
            upstream = origin["inputs"][0].get("link")
            if upstream is None:
                raise WorkflowError(f"Reroute #{from_id} has no input")
            return source(upstream)
        if origin["type"] == "PrimitiveNode":
            return origin["widgets_values"][0]
        return [str(from_id), from_slot]

    graph: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        spec = object_info.get(node["type"])
        if spec is None:
            raise WorkflowError(f"node #{node['id']}: the server has no node type {node['type']!r}")
        inputs = widget_values(node, spec)
        for link_input in node.get("inputs", []):
            if link_input.get("link") is not None:
                inputs[link_input["name"]] = source(link_input["link"])
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


def set_inputs(graph: Mapping[str, Any], class_type: str, index: int = 0, **inputs: Any) -> dict[str, Any]:
    """A copy of ``graph`` with ``inputs`` set on its ``index``-th node of ``class_type`` (in id order).

    Raises ``KeyError`` naming the types present when there is no such node.
    """
    out = copy.deepcopy(dict(graph))
    ids = node_ids(out, class_type)
    if len(ids) <= index:
        present = sorted({v["class_type"] for v in out.values()})
        raise KeyError(f"no node #{index} of type {class_type!r}; the graph has {present}")
    out[ids[index]]["inputs"].update(inputs)
    return out


def node_ids(graph: Mapping[str, Any], class_type: str) -> list[str]:
    """Ids of the nodes of ``class_type`` in ``graph``, in id order."""
    return sorted((k for k, v in graph.items() if v["class_type"] == class_type), key=_id_order)


def _id_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 62, node_id)
