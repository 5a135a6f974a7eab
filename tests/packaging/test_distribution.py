"""The distribution as pip and the Comfy Registry see it: the wheel built from the repository's files holds
the two import packages and their typed markers (no test fixtures), its metadata carries the SPDX licence,
the licence file, the one version and the pack's dependencies; requirements.txt (what a git clone into
ComfyUI installs) lists the same as pyproject.toml. `make registry-check` checks comfy-cli's view."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import instantid

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
REPO = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "requirements.txt", "cow_model", "instantid")


def _requirements(lines: list[str]) -> set[str]:
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


def copy_build_inputs(folder: Path) -> Path:
    """``folder`` holding copies of the repository's build inputs (so building never writes the repository)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel pip builds from a copy of the repository's build inputs (the repository is not written)."""
    source = copy_build_inputs(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_the_two_packages_and_their_typed_markers(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    packages = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert packages == {"cow_model", "instantid"}
    assert "cow_model/py.typed" in names and "instantid/py.typed" in names
    assert not [n for n in names if n.startswith("instantid/testing/")], "test fixtures are in the wheel"
    assert all(n.endswith((".py", "py.typed")) for n in names if ".dist-info/" not in n)
    sources = {str(p.relative_to(REPO)) for p in (REPO / "cow_model").rglob("*.py")} | {
        str(p.relative_to(REPO))
        for p in (REPO / "instantid").rglob("*.py")
        if "testing" not in p.relative_to(REPO).parts
    }
    assert sources <= set(names), f"missing from the wheel: {sorted(sources - set(names))}"


def test_the_wheel_metadata(wheel: zipfile.ZipFile) -> None:
    (metadata_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.message_from_bytes(wheel.read(metadata_name))
    assert metadata["Name"] == "instantid-cow"
    assert metadata["Version"] == instantid.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["License-File"] == "LICENSE"
    licence = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert licence and b"Apache License" in wheel.read(licence[0])
    required = {r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert required == set(pyproject["dependencies"])
    assert not [r for r in required if r.startswith(("tqdm", "wrapt"))], "the pack imports neither"
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "instantid = instantid.cli:main" in wheel.read(entry_points).decode()


def test_requirements_txt_lists_the_dependencies_less_torch() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = _requirements((REPO / "requirements.txt").read_text().splitlines())
    assert requirements == {d for d in pyproject["dependencies"] if not d.startswith("torch")}
    assert "comfyui" not in pyproject["name"].lower()


def test_every_third_party_module_the_pack_imports_is_declared() -> None:
    """cv2 (opencv-python, the one insightface brings), PIL (pillow), insightface, onnxruntime, numpy,
    safetensors, torch: the imports of the shipped modules, less the standard library, ComfyUI's own and
    the extras' (diffusers, serve), each map to a declared distribution."""
    import ast

    declared_modules = {
        "torch": "torch", "safetensors": "safetensors", "numpy": "numpy", "insightface": "insightface",
        "onnxruntime": "onnxruntime", "cv2": "opencv-python", "PIL": "pillow",
        "onnx": "insightface", "google": "insightface",  # onnx and its protobuf come with insightface
    }
    comfyui_modules = {"folder_paths", "comfy", "nodes", "server", "execution", "aiohttp", "comfy_api"}
    extras = {
        "diffusers": {"diffusers", "transformers", "typing_extensions", "wrapt", "accelerate"},
        # ray[serve] brings fastapi and pydantic; fsspec comes with diffusers (huggingface_hub)
        "serve": {"ray", "fastapi", "pydantic", "fsspec"},
    }
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0] for d in pyproject["dependencies"]}
    imported = set()
    for path in [*REPO.glob("cow_model/**/*.py"), *REPO.glob("instantid/**/*.py")]:
        if "testing" in path.relative_to(REPO).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"cow_model", "instantid"} - comfyui_modules
    undeclared = third_party - set().union(*extras.values()) - set(declared_modules)
    assert not undeclared, f"imported but not declared: {sorted(undeclared)}"
    assert {declared_modules[m] for m in third_party & set(declared_modules)} <= names


def test_version_command() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "instantid", "--version"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == f"instantid {instantid.__version__}"


def test_the_sdist_holds_the_licence(tmp_path: Path) -> None:
    """setuptools' own build_sdist on a copy of the build inputs: LICENSE, README, requirements.txt inside."""
    import tarfile

    source = copy_build_inputs(tmp_path / "source")
    out = tmp_path / "dist"
    out.mkdir()
    script = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    run = subprocess.run([sys.executable, "-c", script], cwd=source, capture_output=True, text=True, check=True)
    with tarfile.open(out / run.stdout.strip().splitlines()[-1]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "instantid/py.typed", "cow_model/py.typed"} <= names
    assert not [n for n in names if n.startswith("instantid/testing/")]
