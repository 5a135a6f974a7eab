"""docs/diffusers.md's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "diffusers.md"


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`")
def test_the_quick_start_runs():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert code is not None
    exec(compile(code.group(1), str(DOC), "exec"), {"__name__": "quick_start"})
