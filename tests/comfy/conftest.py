"""Fixtures giving tests a real ComfyUI on CPU (see ``instantid/testing/comfyui.py`` for where it comes from).

Fixtures (stable names, used by the node-pack tests too):

* ``comfy`` (session): the imported :class:`ComfyUI` namespace of modules.
* ``tiny_sd15_patcher`` / ``tiny_sdxl_patcher``: factories ``(seed=0) -> ModelPatcher`` of tiny
  SD1.5 / SDXL-architecture models (ComfyUI's own classes, random weights).
* ``tiny_controlnet``: factory ``(arch="sd15", seed=1) -> comfy.controlnet.ControlNet``.
* ``lora_file``: factory ``(patcher, rank=2, seed=3) -> str``: writes a model-only LoRA into a
  temporary folder registered with ComfyUI's ``loras`` paths, returns the ``lora_name`` for
  ``LoraLoaderModelOnly``.

* ``caches``: fresh process-wide InstantID caches (``instantid.cache.configure(max_mb=64, max_entries=16)``).
* ``face_app`` (module): insightface's ``FaceAnalysis`` on small random antelopev2-layout models.
* ``comfy_install`` (session): a private ComfyUI base directory with this repository in its
  ``custom_nodes`` and the random-weight SD1.5 models, face models and images written
  (``instantid.testing.comfy_fixture.TestInstall``).
* ``comfy_server`` (session): a real ComfyUI server on that install (``instantid.testing.comfy_server``),
  stopped at the end of the session, also when tests fail.

* ``clone_semantics`` (autouse): every test here that uses ComfyUI in-process (requests ``comfy``, not
  the server) runs twice, ``[installed]`` with the installed ComfyUI's own ``clone()`` and ``[list-dict]``
  with its copy of ``model_options`` switched to ``deepcopy_list_dict`` semantics (ComfyUI PR #12382,
  ``instantid.testing.comfy_clone_semantics``); its value is the semantics' name.

Plain helpers (import from ``instantid.testing.comfyui``): ``conditioning``, ``empty_latent``, ``ksample``, ``run_node``,
``tiny_model_patcher``, ``release_models``. After every test, the models ComfyUI holds as loaded are released.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from instantid import cache as instantid_cache
from instantid.testing import comfyui
from instantid.testing.comfy_clone_semantics import SEMANTICS
from instantid.testing.comfy_clone_semantics import clone_semantics as switched_clone
from instantid.testing.comfy_fixture import TestInstall, prepare_install
from instantid.testing.comfy_server import ComfyServer
from instantid.testing.comfy_server import comfy_server as running_server
from tests.comfy.instantid_helpers import small_face_analysis


@pytest.fixture(scope="session")
def comfy() -> comfyui.ComfyUI:
    return comfyui.load_comfyui()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """In-process ComfyUI tests run under both clone semantics; server tests (another process) do not."""
    names = metafunc.fixturenames
    if "comfy" in names and "comfy_install" not in names:
        metafunc.parametrize("clone_semantics", SEMANTICS, indirect=True)


@pytest.fixture(autouse=True)
def clone_semantics(request: pytest.FixtureRequest) -> Iterator[str]:
    """The clone semantics the test runs under (see the module doc); ``"installed"`` when not parametrised."""
    semantics = getattr(request, "param", "installed")
    if semantics == "installed":
        yield semantics
        return
    comfy: comfyui.ComfyUI = request.getfixturevalue("comfy")
    with switched_clone(comfy.ModelPatcher, semantics):
        yield semantics


@pytest.fixture(autouse=True)
def _release_comfy_models() -> Iterator[None]:
    """After each test, let ComfyUI unload the models it sampled (only if a test imported ComfyUI)."""
    yield
    if comfyui.load_comfyui.cache_info().currsize:
        comfyui.release_models(comfyui.load_comfyui())


@pytest.fixture(scope="module")
def face_app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """insightface's FaceAnalysis on small random antelopev2-layout models (finds the test images' tagged faces);
    one per test module, as each module had before."""
    return small_face_analysis(tmp_path_factory.mktemp("insightface"))


@pytest.fixture
def caches() -> Iterator[instantid_cache.InstantIDCaches]:
    """Fresh process-wide InstantID caches (64 MiB, 16 entries per layer) for the test; the defaults after it."""
    yield instantid_cache.configure(max_mb=64, max_entries=16)
    instantid_cache.configure()


@pytest.fixture
def tiny_sd15_patcher(comfy: comfyui.ComfyUI) -> Callable[..., Any]:
    def build(seed: int = 0) -> Any:
        return comfyui.tiny_sd15_patcher(comfy, seed)

    return build


@pytest.fixture
def tiny_sdxl_patcher(comfy: comfyui.ComfyUI) -> Callable[..., Any]:
    def build(seed: int = 0) -> Any:
        return comfyui.tiny_sdxl_patcher(comfy, seed)

    return build


@pytest.fixture
def tiny_controlnet(comfy: comfyui.ComfyUI) -> Callable[..., Any]:
    def build(arch: comfyui.Arch = "sd15", seed: int = 1) -> Any:
        return comfyui.tiny_controlnet(comfy, arch, seed)

    return build


@pytest.fixture
def lora_file(comfy: comfyui.ComfyUI, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    directory: Path = tmp_path_factory.mktemp("loras")
    comfyui.register_lora_dir(comfy, directory)

    def write(patcher: Any, rank: int = 2, seed: int = 3) -> str:
        name = f"tiny_lora_r{rank}_s{seed}.safetensors"
        comfyui.write_unet_lora(comfy, patcher, directory / name, rank=rank, seed=seed)
        return name

    return write


@pytest.fixture(scope="session")
def comfy_install(comfy: comfyui.ComfyUI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestInstall]:
    install = prepare_install(tmp_path_factory.mktemp("comfy_server"), comfy)
    yield install
    shutil.rmtree(install.root / "models", ignore_errors=True)  # ~2.9 GB; pytest keeps 3 sessions' folders


@pytest.fixture(scope="session")
def comfy_server(comfy_install: TestInstall) -> Iterator[ComfyServer]:
    with running_server(comfy_install.root) as server:
        yield server
