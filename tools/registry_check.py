"""`make registry-check`: the Comfy Registry's view of this pack, as comfy-cli computes it.

Runs with the python of comfy-cli's own venv (`.tools/comfy-cli`, made by the Makefile; never the project
venv, since comfy-cli pins packages of its own), from the repository root:

1. `comfy node validate` must pass without a warning (comfy-cli only warns about most metadata faults).
2. The metadata comfy-cli extracts for the Registry: publisher, display name, an https icon, a node id
   without "ComfyUI", an SPDX licence, `requires-comfyui`, OS classifiers, every classifier one PyPI
   knows (trove-classifiers), the version of `instantid/__init__.py`, and dependencies equal to
   requirements.txt plus torch.
3. `comfy node pack` (git-tracked files less .comfyignore): the zip holds the pack and nothing of tests,
   bench, tools, CI or the test fixtures.

Prints what it checked; exits 1 naming every problem.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY = Path(sys.executable).parent / "comfy"
ZIP_OUT = ROOT / ".tools" / "node.zip"
REQUIRED_IN_ZIP = (
    "__init__.py",
    "LICENSE",
    "README.md",
    "pyproject.toml",
    "requirements.txt",
    "cow_model/__init__.py",
    "cow_model/py.typed",
    "instantid/__init__.py",
    "instantid/py.typed",
    "instantid/comfy/nodes.py",
)
FORBIDDEN_PREFIXES = ("tests/", "bench/", "tools/", ".ci/", ".github/", "instantid/testing/", ".tools/")
ALLOWED_PREFIXES = ("cow_model/", "instantid/", "docs/", "example_workflows/")
ALLOWED_TOP = {"__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt"}


def comfy(*args: str) -> str:
    """Run comfy-cli non-interactively in the repository root; its output (stdout and stderr)."""
    run = subprocess.run(
        [str(COMFY), "--skip-prompt", "--no-enable-telemetry", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    output = run.stdout + run.stderr
    print(f"$ comfy {' '.join(args)}  (exit {run.returncode})\n{output.rstrip()}")
    if run.returncode:
        raise SystemExit(f"comfy {' '.join(args)} failed with exit status {run.returncode}")
    return output


def requirement_names(lines: list[str]) -> set[str]:
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


def check_metadata() -> list[str]:
    from comfy_cli.registry.config_parser import extract_node_configuration
    from trove_classifiers import classifiers as known_classifiers

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    os.chdir(ROOT)
    config = extract_node_configuration(str(ROOT / "pyproject.toml"))
    if config is None:
        return ["comfy-cli could not read pyproject.toml"]
    project, tool = config.project, config.tool_comfy
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version = re.search(r'^__version__ = "([^"]+)"', (ROOT / "instantid/__init__.py").read_text(), re.M)
    requirements = requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    unknown = [c for c in pyproject["project"].get("classifiers", []) if c not in known_classifiers]
    checks = {
        "PublisherId set": bool(tool.publisher_id),
        "DisplayName set": bool(tool.display_name),
        "Icon is an https URL": tool.icon.startswith("https://"),
        f"the icon {tool.icon.rsplit('/main/', 1)[-1]} is in the repository": (
            ROOT / tool.icon.rsplit("/main/", 1)[-1]
        ).is_file(),
        f"node id {project.name!r} without 'ComfyUI'": "comfyui" not in project.name.lower(),
        "licence is the SPDX id Apache-2.0 with LICENSE as its file": project.license.text == "Apache-2.0"
        and pyproject["project"].get("license-files") == ["LICENSE"]
        and (ROOT / "LICENSE").is_file(),
        f"requires-comfyui set ({project.supported_comfyui_version!r})": bool(project.supported_comfyui_version),
        f"OS classifiers ({project.supported_os})": bool(project.supported_os),
        f"every classifier is one PyPI knows (unknown: {unknown})": not unknown,
        f"version {project.version!r} is instantid.__version__": bool(version)
        and project.version == version.group(1),
        f"dependencies {sorted(project.dependencies)} = requirements.txt + torch {sorted(requirements)}": (
            requirement_names(project.dependencies) - {d for d in project.dependencies if d.startswith("torch")}
            == requirements
        ),
    }
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return [name for name, ok in checks.items() if not ok]


def check_pack() -> list[str]:
    comfy("node", "pack")
    ZIP_OUT.parent.mkdir(exist_ok=True)
    shutil.move(str(ROOT / "node.zip"), ZIP_OUT)
    names = zipfile.ZipFile(ZIP_OUT).namelist()
    print(f"  {ZIP_OUT.relative_to(ROOT)}: {len(names)} files")
    problems = [f"the zip lacks {name}" for name in REQUIRED_IN_ZIP if name not in names]
    problems += [f"the zip holds {name}" for name in names if name.startswith(FORBIDDEN_PREFIXES)]
    problems += [
        f"the zip holds {name}, neither the pack nor its docs"
        for name in names
        if name not in ALLOWED_TOP and not name.startswith(ALLOWED_PREFIXES + FORBIDDEN_PREFIXES)
    ]
    return problems


def main() -> int:
    output = comfy("node", "validate")
    problems = [f"comfy node validate: {line.strip()}" for line in output.splitlines() if "warning" in line.lower()]
    problems += check_metadata()
    problems += check_pack()
    if problems:
        print("Registry check FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("Registry check passed: comfy node validate, the Registry metadata and the packed file list.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
