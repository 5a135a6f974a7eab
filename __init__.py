"""ComfyUI entry point when this repository is cloned into ``ComfyUI/custom_nodes/``.

ComfyUI imports this file as a package named after the folder and reads ``NODE_CLASS_MAPPINGS`` /
``NODE_DISPLAY_NAME_MAPPINGS`` (V1) or ``comfy_entrypoint`` (V3) from it: this file offers the V3 form
where ComfyUI has ``comfy_api.latest``, V1 elsewhere (``node_schema``). The node pack lives in the ``instantid`` package beside
this file and imports itself and ``cow_model`` by their absolute names, so this folder goes on
``sys.path`` (unless already there). The mappings are resolved on first access, so importing this
file outside ComfyUI (test runners walk up to it) needs nothing of ComfyUI.

Inside ComfyUI, loading it logs one warning when another ``custom_nodes`` entry (the original
ComfyUI_InstantID, a second copy of this pack) registers the same node ids, naming the pack that
serves them and how to disable the other (``instantid.comfy.other_packs``).
"""

import os
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if "folder_paths" in sys.modules:  # loaded by ComfyUI
    from instantid.comfy.other_packs import warn_if_shadowed

    warn_if_shadowed(_HERE)

_V1 = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")
__all__ = [*_V1, "comfy_entrypoint"]


def node_schema() -> str:
    """``"v3"`` where ComfyUI has ``comfy_api.latest`` (0.3.47 and later), else ``"v1"``;
    ``INSTANTID_NODE_SCHEMA=v1`` keeps V1 anyway. Both forms have the same node ids, inputs and outputs."""
    if os.environ.get("INSTANTID_NODE_SCHEMA", "").lower() == "v1":
        return "v1"
    import importlib.util

    try:
        found = importlib.util.find_spec("comfy_api.latest") is not None
    except ModuleNotFoundError:
        found = False
    return "v3" if found else "v1"


def __getattr__(name: str) -> Any:
    # ComfyUI loads a pack's V1 mappings when the module has them, else its V3 comfy_entrypoint.
    if name in _V1 and node_schema() == "v1":
        import instantid.comfy

        return getattr(instantid.comfy, name)
    if name == "comfy_entrypoint" and node_schema() == "v3":
        from instantid.comfy.v3 import comfy_entrypoint

        return comfy_entrypoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
