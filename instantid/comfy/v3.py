"""The seven nodes in ComfyUI's V3 form (``comfy_api.latest``: ``io.ComfyNode``, ``comfy_entrypoint``), made
from their one definition, the V1 classes of ``instantid.comfy.nodes``.

``v3_node(node_id, v1)`` reads the V1 class: its ``INPUT_TYPES()`` (names, order, required then optional, types,
defaults, ranges, steps, tooltips; evaluated again at every schema request, so the file lists stay current),
``RETURN_TYPES`` / ``RETURN_NAMES``, ``CATEGORY``, ``DESCRIPTION`` and ``FUNCTION``, which ``execute`` calls. So
the node id, input ids and order, type strings and outputs are those of V1 and of ComfyUI_InstantID, and saved
workflows load on either form. Widgets: ``FLOAT`` and ``INT`` become ``io.Float`` / ``io.Int``, a list of
choices ``io.Combo``; every other type string is a link, ``io.Custom(type)`` (its type string unchanged).

Importing this module needs a ComfyUI with ``comfy_api.latest`` (0.3.47 and later); the repository's
``__init__.py`` offers this form there, and V1 elsewhere (or when ``INSTANTID_NODE_SCHEMA=v1``).
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import ComfyExtension, io

from instantid.comfy import nodes

_NUMBER_OPTIONS = ("default", "min", "max", "step")


def v3_input(name: str, spec: tuple[Any, ...], optional: bool) -> Any:
    """The V3 input of one V1 ``INPUT_TYPES`` entry; raises ``ValueError`` for an option it cannot carry over."""
    kind = spec[0]
    options = dict(spec[1]) if len(spec) > 1 else {}
    common = {"optional": optional, "tooltip": options.pop("tooltip", None)}
    if isinstance(kind, list):
        made = io.Combo.Input(name, options=list(kind), default=options.pop("default", None), **common)
    elif kind in ("FLOAT", "INT"):
        number = io.Float if kind == "FLOAT" else io.Int
        made = number.Input(name, **{k: options.pop(k) for k in _NUMBER_OPTIONS if k in options}, **common)
    else:
        made = io.Custom(kind).Input(name, **common)
    if options:
        raise ValueError(f"input {name!r}: options {sorted(options)} have no V3 counterpart here")
    return made


def v3_node(node_id: str, v1: type) -> type:
    """The ``io.ComfyNode`` subclass for the V1 node class ``v1`` registered as ``node_id``."""

    def define_schema(cls: type) -> Any:
        declared = v1.INPUT_TYPES()  # type: ignore[attr-defined]
        inputs = [v3_input(n, s, False) for n, s in declared.get("required", {}).items()]
        inputs += [v3_input(n, s, True) for n, s in declared.get("optional", {}).items()]
        names = getattr(v1, "RETURN_NAMES", None) or v1.RETURN_TYPES  # type: ignore[attr-defined]
        outputs = [
            io.Custom(kind).Output(display_name=name)
            for kind, name in zip(v1.RETURN_TYPES, names, strict=True)  # type: ignore[attr-defined]
        ]
        return io.Schema(
            node_id=node_id,
            display_name=nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id],
            category=v1.CATEGORY,  # type: ignore[attr-defined]
            description=v1.DESCRIPTION,  # type: ignore[attr-defined]
            inputs=inputs,
            outputs=outputs,
        )

    def execute(cls: type, **inputs: Any) -> Any:
        return io.NodeOutput(*getattr(v1(), v1.FUNCTION)(**inputs))  # type: ignore[attr-defined]

    return type(
        node_id,
        (io.ComfyNode,),
        {
            "__doc__": v1.__doc__,
            "__module__": __name__,
            "V1": v1,
            "define_schema": classmethod(define_schema),
            "execute": classmethod(execute),
        },
    )


NODES: list[type] = [v3_node(node_id, v1) for node_id, v1 in nodes.NODE_CLASS_MAPPINGS.items()]
"""The seven V3 nodes, in the V1 mapping's order."""


class InstantIDExtension(ComfyExtension):
    """What ``comfy_entrypoint`` gives ComfyUI: the seven nodes."""

    async def get_node_list(self) -> list[type]:
        return list(NODES)


async def comfy_entrypoint() -> InstantIDExtension:
    return InstantIDExtension()
