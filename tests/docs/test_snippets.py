"""Every ```python block of README.md and docs/*.md works as written.

A block runs (as a script, ``runpy``) in a folder holding what the snippets name: ``models/insightface``
(antelopev2-format face models built by ``instantid.testing.face_models``) and ``portrait.png`` (a photo with a
face those models detect). A block whose first line starts with ``# checked, not run:`` needs what a test cannot
have (the published SDXL models, a GPU, a server on GiB of models; the line says what); it is checked instead:
it compiles, every name it reads is imported or assigned before, every ``from X import Y`` resolves, and every
call of an imported function or class binds to its signature (argument count and keyword names).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import os
import re
import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
NOT_RUN = "# checked, not run:"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> Iterator[Any]:
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 2
            name = f"{path.relative_to(REPO)}:{line}"
            yield pytest.param(name, match.group(1), id=name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    from instantid.testing.face_images import tagged_crop
    from instantid.testing.face_models import build_antelopev2_like

    folder = tmp_path_factory.mktemp("snippets")
    build_antelopev2_like(folder / "models" / "insightface")
    Image.fromarray(tagged_crop(40, 40, size=320, tag=64)).save(folder / "portrait.png")
    return folder


def _bound_names(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def static_problems(code: str, name: str) -> list[str]:
    """What would fail in ``code`` before any model is loaded: undefined names, unresolvable imports, calls
    of imported callables that do not bind to their signature."""
    tree = ast.parse(code, name)
    compile(tree, name, "exec")
    defined: set[str] = set(dir(builtins))
    imported: dict[str, Any] = {}
    problems: list[str] = []

    def check(expression: ast.AST) -> None:
        local = set()  # names bound inside comprehensions and lambdas
        for node in ast.walk(expression):
            if isinstance(node, ast.comprehension):
                local |= _bound_names(node.target)
            elif isinstance(node, ast.Lambda):
                local |= {a.arg for a in node.args.args}
        for node in ast.walk(expression):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                if node.id not in defined and node.id not in local:
                    problems.append(f"line {node.lineno}: {node.id!r} is not defined before it is used")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
                if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                    continue
                try:
                    signature = inspect.signature(imported[node.func.id])
                except (TypeError, ValueError):
                    continue
                try:
                    signature.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
                except TypeError as error:
                    problems.append(f"line {node.lineno}: {node.func.id}(...) does not fit its signature: {error}")

    def run(statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, ast.Import):
                for alias in statement.names:
                    importlib.import_module(alias.name)
                    defined.add((alias.asname or alias.name).split(".")[0])
            elif isinstance(statement, ast.ImportFrom):
                module = importlib.import_module(statement.module or "")
                for alias in statement.names:
                    if not hasattr(module, alias.name):
                        importlib.import_module(f"{statement.module}.{alias.name}")  # a submodule, or ImportError
                    defined.add(alias.asname or alias.name)
                    imported[alias.asname or alias.name] = getattr(module, alias.name, None)
            elif isinstance(statement, ast.With):
                for item in statement.items:
                    check(item.context_expr)
                    if item.optional_vars is not None:
                        defined.update(_bound_names(item.optional_vars))
                run(statement.body)
            elif isinstance(statement, ast.For):
                check(statement.iter)
                defined.update(_bound_names(statement.target))
                run(statement.body + statement.orelse)
            elif isinstance(statement, ast.If):
                check(statement.test)
                run(statement.body + statement.orelse)
            elif isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
                defined.add(statement.name)
            else:
                check(statement)
                for node in ast.walk(statement):
                    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                        defined.add(node.id)

    run(tree.body)
    return problems


@pytest.mark.parametrize(("name", "code"), list(snippets()))
def test_snippet(name: str, code: str, workdir: Path) -> None:
    if code.startswith(NOT_RUN):
        assert not static_problems(code, name), static_problems(code, name)
        return
    script = workdir / (re.sub(r"\W", "_", name) + ".py")
    script.write_text(code)
    before = os.getcwd()
    os.chdir(workdir)
    try:
        runpy.run_path(str(script), run_name="__snippet__")
    finally:
        os.chdir(before)


def test_the_static_check_finds_what_the_old_readme_got_wrong() -> None:
    """The README's earlier diffusers snippet used ``pipe`` and ``photo`` without defining them."""
    old = (
        "from instantid.face import analyze_face, load_face_analysis\n"
        "app = load_face_analysis('models/insightface')\n"
        "face = analyze_face(app, photo)\n"
        "view = apply(pipe)\n"
        "load_face_analysis('a', 'b', 'c', 'd', nonsense=1)\n"
    )
    problems = static_problems(old, "old")
    assert any("'photo'" in p for p in problems) and any("'pipe'" in p for p in problems)
    assert any("does not fit its signature" in p for p in problems)
