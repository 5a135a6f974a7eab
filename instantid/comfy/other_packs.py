"""Other node packs in ``custom_nodes`` that register this pack's node ids (ComfyUI_InstantID above all).

ComfyUI loads ``custom_nodes`` entries in directory order (``os.listdir`` of each custom_nodes folder, the
folders in their configured order; entries ending in ``.disabled`` are skipped) and the pack loaded last
overwrites the node classes of the ones before under the same id, silently. This module finds such packs
by reading their Python sources (a mapping key ``"ApplyInstantID": ...`` and the like), says which pack
ComfyUI loads last, and says how to disable the other. It imports nothing of ComfyUI: the load-time
warning (``warn_if_shadowed``, called from the repository's ``__init__.py``) and ``instantid doctor`` use it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DISPLAY_NAMES: dict[str, str] = {
    "InstantIDModelLoader": "Load InstantID Model",
    "InstantIDFaceAnalysis": "InstantID Face Analysis",
    "ApplyInstantID": "Apply InstantID",
    "ApplyInstantIDAdvanced": "Apply InstantID Advanced",
    "FaceKeypointsPreprocessor": "Face Keypoints Preprocessor",
    "InstantIDAttentionPatch": "InstantID Patch Attention",
    "ApplyInstantIDControlNet": "InstantID Apply ControlNet",
}
"""The node ids of this pack (those of ComfyUI_InstantID) and their display names."""
NODE_IDS = tuple(DISPLAY_NAMES)

_KEY = re.compile(r"""["'](""" + "|".join(NODE_IDS) + r""")["']\s*:""")
_MAX_FILE_BYTES = 2_000_000
_MAX_DEPTH = 3
_SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv", "tests", "test"}


@dataclass(frozen=True)
class OtherPack:
    """A ``custom_nodes`` entry other than this pack whose sources register ``node_ids`` of this pack;
    ``loads_after``: ComfyUI loads it after this pack (so its nodes serve those ids), ``None`` when this
    pack is not among the entries scanned (installed with pip), so the order is unknown."""

    path: Path
    node_ids: tuple[str, ...]
    loads_after: bool | None


def load_order(custom_nodes_dirs: Iterable[Path]) -> list[Path]:
    """The entries ComfyUI would load, in its order: each folder's ``os.listdir`` order, less
    ``__pycache__``, ``*.disabled`` and files other than ``.py``."""
    entries = []
    for folder in custom_nodes_dirs:
        try:
            names = os.listdir(os.path.realpath(folder))
        except OSError:
            continue
        for name in names:
            path = Path(folder) / name
            if name == "__pycache__" or name.endswith(".disabled"):
                continue
            if path.is_file() and path.suffix != ".py":
                continue
            entries.append(path)
    return entries


def _sources(entry: Path) -> Iterable[Path]:
    if entry.is_file():
        yield entry
        return
    for root, dirs, files in os.walk(entry):
        depth = len(Path(root).relative_to(entry).parts)
        dirs[:] = [] if depth >= _MAX_DEPTH else [d for d in dirs if d not in _SKIP_DIRS]
        yield from (Path(root) / f for f in files if f.endswith(".py"))


def provided_node_ids(entry: Path) -> tuple[str, ...]:
    """This pack's node ids that the Python sources of ``entry`` (a pack folder or a ``.py`` file) use as
    mapping keys, in ``NODE_IDS`` order."""
    found: set[str] = set()
    for source in _sources(entry):
        try:
            if source.stat().st_size > _MAX_FILE_BYTES:
                continue
            found.update(_KEY.findall(source.read_text(errors="replace")))
        except OSError:
            continue
    return tuple(i for i in NODE_IDS if i in found)


def find_other_packs(custom_nodes_dirs: Sequence[Path], own: Path) -> list[OtherPack]:
    """The entries of ``custom_nodes_dirs`` other than ``own`` (this pack's folder) that register any of
    this pack's node ids."""
    entries = load_order(custom_nodes_dirs)
    own_real = os.path.realpath(own)
    positions = [i for i, e in enumerate(entries) if os.path.realpath(e) == own_real]
    own_position = positions[0] if positions else None
    packs = []
    for position, entry in enumerate(entries):
        if position == own_position or os.path.realpath(entry) == own_real:
            continue
        ids = provided_node_ids(entry)
        if ids:
            after = None if own_position is None else position > own_position
            packs.append(OtherPack(entry, ids, after))
    return packs


def describe(packs: Sequence[OtherPack], own: Path) -> str:
    """One paragraph: which packs register the same node ids, which one serves them, how to disable."""
    names = ", ".join(f"{p.path} ({', '.join(p.node_ids)})" for p in packs)
    later = [p for p in packs if p.loads_after]
    if later:
        winner = f"{later[-1].path}, not this pack ({own}): its nodes run when a workflow uses these ids"
    elif all(p.loads_after is False for p in packs):
        winner = f"this pack ({own})"
    else:
        winner = "the one ComfyUI loads last (this pack was not found among the custom_nodes entries)"
    return (
        f"Another node pack registers the same node ids as InstantID (copy-on-write): {names}. ComfyUI loads "
        f"custom_nodes in directory order and the pack loaded last serves these ids: {winner}. Keep one: "
        "disable the other in ComfyUI-Manager (Custom Nodes Manager, Disable), or rename its folder to end in "
        "'.disabled', or move it out of custom_nodes; then restart ComfyUI."
    )


def warn_if_shadowed(own: Path | str) -> list[OtherPack]:
    """At load time inside ComfyUI: log one warning (``describe``) when another ``custom_nodes`` entry
    registers this pack's node ids; returns those packs. Outside ComfyUI (no ``folder_paths`` imported)
    it does nothing."""
    folder_paths = sys.modules.get("folder_paths")
    if folder_paths is None:
        return []
    try:
        dirs = [Path(p) for p in folder_paths.get_folder_paths("custom_nodes")]
    except (KeyError, AttributeError):
        return []
    packs = find_other_packs(dirs, Path(own))
    if packs:
        logger.warning(describe(packs, Path(own)))
    return packs
