"""ComfyUI entry point when this repository is cloned into ``ComfyUI/custom_nodes/``.

ComfyUI imports this file as a package named after the folder and reads ``NODE_CLASS_MAPPINGS`` /
``NODE_DISPLAY_NAME_MAPPINGS`` from it. The node pack lives in the ``instantid`` package beside
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

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import instantid.comfy

        return getattr(instantid.comfy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
