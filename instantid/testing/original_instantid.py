"""The original ComfyUI_InstantID (cubiq), imported in-process from a checkout named by an environment variable.

``$COMFYUI_INSTANTID_PATH`` names a checkout of https://github.com/cubiq/ComfyUI_InstantID (the folder
holding ``InstantID.py``). Its ``InstantID`` module is imported as a submodule of a package named
:data:`PACKAGE` rooted at that folder (its own relative imports work; its ``__init__.py`` is not run),
with ComfyUI already imported and the torchvision placeholders of ``instantid.testing.absent_modules``
in place while it imports (it imports torchvision's transforms at module level). Nothing of it is changed.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

from instantid.testing.absent_modules import placeholders_for_missing

ENV_VAR = "COMFYUI_INSTANTID_PATH"
PACKAGE = "comfyui_instantid_original"


def checkout() -> Path | None:
    """The checkout ``$COMFYUI_INSTANTID_PATH`` names, or ``None`` when it is unset or empty.

    Raises ``FileNotFoundError`` when it is set but holds no ``InstantID.py``.
    """
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    root = Path(value).expanduser().resolve()
    if not (root / "InstantID.py").is_file():
        raise FileNotFoundError(f"${ENV_VAR}={value} ({root}) is not a ComfyUI_InstantID checkout: no InstantID.py in it")
    return root


def import_instantid_module(root: Path) -> types.ModuleType:
    """The original pack's ``InstantID`` module from the checkout at ``root`` (imported once per process)."""
    name = f"{PACKAGE}.InstantID"
    if name in sys.modules:
        return sys.modules[name]
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(root)]
    sys.modules[PACKAGE] = package
    with placeholders_for_missing():
        return importlib.import_module(name)
