"""The face analysis bench runs and reports both rows against its baseline."""

from __future__ import annotations

import pytest

from bench.face_analysis import main


def test_bench_prints_both_cases(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "stock: 2 passes ms" in lines[1] and "one detection ms" in lines[1]
    rows = {line[:28].strip(): line[28:].split() for line in lines[2:]}
    assert rows["face at 640"][0] == "640"
    assert rows["large face (found at 320)"][0] == "320"
    assert all(row[-1].endswith("x") for row in rows.values())
