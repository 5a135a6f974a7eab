"""Placeholder modules for packages ComfyUI imports but that cannot be installed here (standard library only).

torchvision and torchaudio pin another torch than the CPU build this project pins, yet ComfyUI
imports them at import time in modules of models this project never builds (Stable Cascade's
ControlNet and stage C coder in March 2024; also Cosmos, ACE and LTXV audio, imported by
``comfy.model_base``, in current ComfyUI). While a finder from here is on ``sys.meta_path``,
``import torchvision.transforms as T`` and ``from torchvision import transforms`` work, and calling
anything from them raises ``ModuleNotFoundError`` naming what was called. Nothing of ComfyUI is mocked.

Used in two places: :func:`placeholders_for_missing` around the in-process import of ComfyUI
(``instantid.testing.comfyui``), and :func:`install_placeholders` by the ComfyUI server launcher
(``instantid.testing.comfy_launcher``), which loads this file by path: it must import nothing but
the standard library.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

UNINSTALLABLE = ("torchvision", "torchaudio")
"""Packages that ComfyUI imports at import time but that cannot be installed beside the pinned CPU torch."""

PROBING_LIBRARIES = ("transformers",)
"""Libraries that probe whether torchvision is installed when first imported; import them before
the placeholders go in (:func:`import_probing_libraries`), so they see the truth."""


class AbsentModule(types.ModuleType):
    """Placeholder for a module that is not installed: importing it and its submodules works, using it raises.

    Attribute access gives a placeholder for the submodule of that name (so that ``from torchvision
    import transforms`` at module level imports); calling such a placeholder raises ``ModuleNotFoundError``
    naming what was used.
    """

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return AbsentModule(f"{self.__name__}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ModuleNotFoundError(
            f"{self.__name__.split('.')[0]} is not installed; the ComfyUI test harness "
            "(instantid/testing/absent_modules.py) put a placeholder for it in place so that ComfyUI "
            f"imports, and `{self.__name__}` was called."
        )


class AbsentModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves :class:`AbsentModule` for the named top-level packages and their submodules."""

    def __init__(self, packages: frozenset[str]) -> None:
        self.packages = packages

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] not in self.packages:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = AbsentModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def import_probing_libraries() -> None:
    """Import the installed :data:`PROBING_LIBRARIES` (before any placeholder is in place)."""
    for library in PROBING_LIBRARIES:
        if importlib.util.find_spec(library) is not None:
            importlib.import_module(library)


def install_placeholders(packages: tuple[str, ...] = UNINSTALLABLE) -> AbsentModuleFinder | None:
    """Put a finder serving placeholders for those of ``packages`` that are not installed on ``sys.meta_path``.

    Returns the finder (``None`` when every package is installed); it stays until removed.
    """
    absent = frozenset(name for name in packages if importlib.util.find_spec(name) is None)
    if not absent:
        return None
    finder = AbsentModuleFinder(absent)
    sys.meta_path.append(finder)
    return finder


@contextlib.contextmanager
def placeholders_for_missing(packages: tuple[str, ...] = UNINSTALLABLE) -> Iterator[frozenset[str]]:
    """Within the block, ``import`` of any of ``packages`` that is not installed gives placeholders.

    Afterwards the finder and every placeholder in ``sys.modules`` are removed again (modules that
    imported one keep their reference). Yields the packages that got placeholders.
    """
    finder = install_placeholders(packages)
    if finder is None:
        yield frozenset()
        return
    try:
        yield finder.packages
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if isinstance(m, AbsentModule)]:
            del sys.modules[name]
