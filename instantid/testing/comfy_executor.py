"""Nodes that feed Python objects into a graph run by ComfyUI's own ``PromptExecutor`` in-process.

Tests and benches build graphs whose inputs (a model, an adapter, a face app, images) are objects made
in Python, not files; :func:`object_node` gives the node that hands them to the graph by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def object_node(objects: Mapping[str, Any], category: str) -> type:
    """A ComfyUI node class whose output is ``objects[name]`` (looked up at each run; shared, not copied)."""

    class ObjectNode:
        RETURN_TYPES = ("*",)
        FUNCTION = "get"
        CATEGORY = category

        @classmethod
        def INPUT_TYPES(cls) -> dict[str, Any]:
            return {"required": {"name": ("STRING", {})}}

        def get(self, name: str) -> tuple[Any]:
            return (objects[name],)

    return ObjectNode
