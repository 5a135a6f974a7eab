"""Beside the original pack: ComfyUI's own ``nodes.load_custom_node`` loads a stand-in of ComfyUI_InstantID
(a pack registering the same node ids) and this repository from two custom_nodes folders, in ComfyUI's
order; loading this pack logs exactly one warning that names the other pack, the pack ComfyUI keeps for
these ids, and how to disable the other; the pack it names is the one whose classes ComfyUI then holds."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from pathlib import Path

import pytest

from instantid.comfy.other_packs import NODE_IDS, load_order
from instantid.testing import comfyui

REPO = Path(__file__).resolve().parents[2]
STOCK = "ComfyUI_InstantID"
STOCK_SOURCE = "\n".join(
    [f"class {node_id}:\n    pass\n" for node_id in NODE_IDS]
    + ["NODE_CLASS_MAPPINGS = {", *[f'    "{node_id}": {node_id},' for node_id in NODE_IDS], "}"]
)


def _load(comfy: comfyui.ComfyUI, entry: Path) -> None:
    loaded = comfy.nodes.load_custom_node(str(entry))
    if inspect.isawaitable(loaded):  # ComfyUI since 2025 loads custom nodes asynchronously
        loaded = asyncio.run(loaded)
    assert loaded is True, f"ComfyUI could not load {entry}"


@pytest.mark.parametrize("stock_first", [True, False], ids=["original-first", "original-last"])
def test_one_warning_names_the_pack_that_serves_the_ids(
    comfy: comfyui.ComfyUI, tmp_path: Path, caplog: pytest.LogCaptureFixture, stock_first: bool
) -> None:
    stock_dir, ours_dir = tmp_path / "a", tmp_path / "b"
    if not stock_first:
        stock_dir, ours_dir = ours_dir, stock_dir
    (stock_dir / STOCK).mkdir(parents=True)
    (stock_dir / STOCK / "__init__.py").write_text(STOCK_SOURCE)
    ours_dir.mkdir()
    (ours_dir / "instantid-cow").symlink_to(REPO, target_is_directory=True)
    folders = [tmp_path / "a", tmp_path / "b"]

    mappings, names = dict(comfy.nodes.NODE_CLASS_MAPPINGS), dict(comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS)
    configured = comfy.folder_paths.folder_names_and_paths["custom_nodes"]
    comfy.folder_paths.folder_names_and_paths["custom_nodes"] = ([str(f) for f in folders], set())
    try:
        with caplog.at_level(logging.WARNING):
            for entry in load_order(folders):
                _load(comfy, entry)
        warnings = [r.getMessage() for r in caplog.records if "registers the same node ids" in r.getMessage()]
        served_by = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyInstantID"].__module__
    finally:
        comfy.folder_paths.folder_names_and_paths["custom_nodes"] = configured
        comfy.nodes.NODE_CLASS_MAPPINGS.clear()
        comfy.nodes.NODE_CLASS_MAPPINGS.update(mappings)
        comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS.clear()
        comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS.update(names)
        for name in [m for m in sys.modules if m.endswith(STOCK)]:
            sys.modules.pop(name)
    assert len(warnings) == 1, warnings
    (warning,) = warnings
    assert f"{stock_dir / STOCK} ({', '.join(NODE_IDS)})" in warning
    assert "ComfyUI-Manager" in warning and "'.disabled'" in warning
    if stock_first:
        assert served_by.startswith("instantid."), served_by
        assert f"serves these ids: this pack ({ours_dir / 'instantid-cow'})" in warning
    else:
        assert served_by.endswith(STOCK), served_by  # ComfyUI names the module by folder (2024) or path (2025)
        assert f"serves these ids: {stock_dir / STOCK}, not this pack" in warning


def test_the_scanned_node_ids_are_the_packs(comfy: comfyui.ComfyUI) -> None:
    from instantid.comfy import nodes

    assert set(nodes.NODE_CLASS_MAPPINGS) == set(NODE_IDS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
