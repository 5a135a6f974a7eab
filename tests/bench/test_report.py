"""The bench's report, markdown and README-marker code, on synthetic results (no server, no models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report, results, workflow
from bench.workflow_setup import CLONE_NODES, BenchModels, graph
from instantid.testing.comfy_fixture import TestImages

MiB = 1024 * 1024


def record(
    variant: str, scenario: str, faces: int, clones: int, seconds: float, rss: float
) -> dict[str, Any]:
    return {
        "variant": variant, "arch": "sd15", "scenario": scenario, "faces": faces, "clones": clones, "repeat": 0,
        "seconds": seconds, "executed_in": seconds, "instantid_seconds": 0.1, "clone_seconds": seconds / 10,
        "sampler_seconds": 1.0, "node_seconds": {}, "cached": 3, "rss_peak": rss, "rss_sampled_peak": rss,
        "vram_max_allocated": None, "vram_driver_peak": None,
    }  # fmt: skip


def records() -> list[dict[str, Any]]:
    out = []
    for variant, slower in ((workflow.BASELINE, 1.5), ("this pack", 1.0)):
        out.append(record(variant, "first_run", 1, 2, 10.0 * slower, 6000 * MiB))
        out += [
            record(variant, "edits", 1, 2, 2.0 * slower + i * 0.01, 5000 * MiB * slower) for i in range(3)
        ]
        out.append(record(variant, "two_faces", 2, 4, 3.0 * slower, 5500 * MiB * slower))
        out += [record(variant, "faces", n, 2, n * slower, 5000 * MiB + n * MiB) for n in (2, 4, 8)]
        out += [record(variant, "clones", 1, n, 1 + n * slower, 5000 * MiB + n * MiB) for n in (0, 4, 8)]
    return out


def workflow_data() -> dict[str, Any]:
    summary = workflow.summarize(records())
    return {
        "scenario": "workflow", "created": "2026-01-01T00:00:00+00:00", "device": "cpu", "quick": True,
        "machine": {"cpus": 2, "cpu": "Test CPU", "memory_bytes": 24 * 2**30, "torch": "2.13.0+cpu", "gpu": None},
        "baseline": "emulated", "plans": {"sd15": {"size": 64, "steps": 1}}, "summary": summary,
        "savings": workflow.savings(summary),
    }  # fmt: skip


def test_summary_takes_medians_and_savings_compare_with_the_baseline_of_the_same_point() -> None:
    summary = workflow.summarize(records())
    edits = {r["variant"]: r for r in summary if r["scenario"] == "edits"}
    assert edits["this pack"]["prompts"] == 3
    assert edits["this pack"]["seconds"] == pytest.approx(2.01)
    assert edits[workflow.BASELINE]["seconds"] == pytest.approx(3.01)
    (saved,) = [s for s in workflow.savings(summary) if s["scenario"] == "edits"]
    assert saved["seconds_saved"] == pytest.approx(1.0)
    assert saved["seconds_saved_share"] == pytest.approx(1.0 / 3.01)
    assert saved["vram_max_allocated_saved"] is None  # not measured: stays None, not 0
    text = workflow.markdown(summary, workflow.savings(summary))
    assert "| sd15 | deepcopy | edits | 1 | 2 | this pack | 3 | 2,010 ms |" in text
    assert "1,000 ms" in text and "+33%" in text


def test_headline_states_targets_savings_the_machine_and_what_was_not_measured() -> None:
    text = report.headline(workflow_data())
    assert "100-300 ms saved" in text and "10-15% less" in text and "50% less" in text
    assert "1,000 ms (33.2%)" in text  # cached run: 3,010 ms -> 2,010 ms
    assert "not measured (no GPU)" in text
    assert "2 CPUs (Test CPU), 24 GiB, torch 2.13.0+cpu, no GPU" in text
    assert "python -m bench workflow --quick" in text


def test_replace_between_markers_rewrites_only_the_marked_part() -> None:
    text = f"# T\n\nbefore\n{report.START}\nold table\n{report.END}\nafter\n"
    out = report.replace_between_markers(text, "| new |\n")
    assert out == f"# T\n\nbefore\n{report.START}\n| new |\n{report.END}\nafter\n"
    assert report.replace_between_markers(out, "| new |") == out  # idempotent
    with pytest.raises(report.MarkerError):
        report.replace_between_markers("no markers", "x")
    with pytest.raises(report.MarkerError):
        report.replace_between_markers(f"{report.END}\n{report.START}\n", "x")


def test_readme_has_the_markers() -> None:
    readme = (results.REPOSITORY_ROOT / "README.md").read_text()
    report.replace_between_markers(readme, "x")  # raises without exactly one pair in order


def test_report_writes_the_plots_and_rewrites_a_readme(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    data = workflow_data()
    results.write_result("workflow", {k: v for k, v in data.items() if k not in ("scenario", "created", "machine")},
                         "table\n", tmp_path)  # fmt: skip
    results.write_result(
        "clone_cost",
        {"construction": [{"modules": n, "clone_seconds": 1e-4, "deepcopy_seconds": n * 1e-5} for n in (100, 1000)]},
        "", tmp_path,
    )  # fmt: skip
    rows = [{"n": n, "kind": k, "rss": n * MiB, "tensors": n * MiB, "seconds": 0.1, "extrapolated": n > 2}
            for n in (1, 2, 4) for k in ("COW clones", "deep copies")]  # fmt: skip
    results.write_result("diffusers_identities", {"model": "sd15", "rows": rows}, "", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\n{report.END}\n")
    assert report.main(["--out", str(tmp_path), "--readme", str(readme)]) == 0
    for name in ("workflow_faces", "workflow_clones", "clone_cost", "diffusers_identities"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
    assert "100-300 ms saved" in readme.read_text()
    stored = json.loads((tmp_path / "workflow.json").read_text())
    assert stored["machine"]["cpus"] >= 1 and stored["scenario"] == "workflow"
    assert (tmp_path / "workflow.md").read_text().startswith("# bench workflow\n\nMeasured ")


def test_report_without_results_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--out", str(tmp_path)]) == 0
    assert "python -m bench workflow --quick" in capsys.readouterr().out


def test_graph_chains_faces_then_cloning_nodes_into_the_sampler() -> None:
    models = BenchModels(Path("m"), "sd15", "ckpt", "cn", "adapter", "lora")
    g = graph(models, TestImages(), faces=3, clones=5, text="t", size=64, steps=1)
    assert g["face1"]["inputs"]["model"] == ["checkpoint", 0] and "mask" in g["face1"]["inputs"]
    assert g["face3"]["inputs"]["model"] == ["face2", 0] and g["face3"]["inputs"]["image"] == ["image_a", 0]
    kinds = [g[f"clone{i}"]["class_type"] for i in range(1, 6)]
    assert kinds == [*CLONE_NODES, CLONE_NODES[0]]
    assert g["clone1"]["inputs"]["model"] == ["face3", 0]
    assert g["sampler"]["inputs"]["model"] == ["clone5", 0]
    assert g["sampler"]["inputs"]["positive"] == ["face3", 1]
    one = graph(models, TestImages(), faces=1, clones=0, text="t", size=64, steps=1, available={"RescaleCFG"})
    assert "mask" not in one["face1"]["inputs"] and one["sampler"]["inputs"]["model"] == ["face1", 0]
    other = graph(
        models, TestImages(), faces=1, clones=2, text="u", size=64, steps=1, available={"RescaleCFG"}
    )
    assert [other["clone1"]["class_type"], other["clone2"]["class_type"]] == ["RescaleCFG", "RescaleCFG"]
    assert {k: v for k, v in other.items() if k == "checkpoint"} == {"checkpoint": one["checkpoint"]}


def test_the_server_plugin_registers_nothing_outside_the_bench() -> None:
    import bench._comfy_plugin as plugin

    assert plugin.NODE_CLASS_MAPPINGS == {}
    assert plugin._driver is None
    memory = plugin.memory()
    assert memory["cuda"] is None or "max_allocated" in memory["cuda"]


def test_headline_names_each_rows_comfyui_generation_and_flags_accumulating_reruns() -> None:
    def rerun(layout: str, output: int, upstream: int) -> dict[str, Any]:
        return {"layout": layout, "first_apply_ms": 5.0, "reapply_ms": 1.0, "terms_output": output,
                "terms_upstream": upstream}  # fmt: skip

    clones = [["original layout, stock clone()", {"seconds": 6.0, "rss": 0, "tensors": 1600 * MiB}],
              ["(iii) this pack, stock clone()", {"seconds": 3e-4, "rss": 0, "tensors": 0}]]  # fmt: skip
    clone = {"edits": 3, "results": [
        {"clone_semantics": "deepcopy", "clones": clones, "held_bytes": {"stock": 1600 * MiB, "pack": 20 * MiB},
         "reruns": [rerun(workflow.BASELINE, 2, 1), rerun("this pack", 2, 1)]},
        {"clone_semantics": "list-dict", "clones": clones, "held_bytes": None,
         "reruns": [rerun(workflow.BASELINE, 4, 4), rerun(f"{workflow.BASELINE} + switch", 2, 1),
                    rerun("this pack", 2, 1)]},
    ]}  # fmt: skip
    text = report.headline(workflow_data(), clone)
    lines = text.splitlines()
    assert lines[0].startswith("| ComfyUI |")
    assert all(line.startswith("| until 2026-01") for line in lines[2:8])  # the workflow rows: deepcopy
    assert any(line.startswith("| since 2026-02") and "4 / 4 (wrong)" in line and "COW_MODEL_COMFY_CLONE=1: 2 / 1" in line
               for line in lines)  # fmt: skip
    assert "6,000.00 ms, +1,600 MiB" in text and "bench comfy_clone --clone-semantics both" in text
