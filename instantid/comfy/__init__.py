"""The ComfyUI node pack: a drop-in replacement for ComfyUI_InstantID (same node names and inputs).

``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` are what ComfyUI reads. They are
resolved on first access, because the node module imports ComfyUI's own modules
(``folder_paths``, ``comfy.*``), which exist only inside a running ComfyUI; the helper modules of
this package (``blocks``, ``patch``, ``conditioning``) stay importable without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from instantid.comfy import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
