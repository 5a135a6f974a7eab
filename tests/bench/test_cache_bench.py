"""``python -m bench cache``'s scenario graphs (the bench itself runs ComfyUI's executor; too slow for the suite)."""

from __future__ import annotations

from bench.cache import _scenarios


def test_scenarios_are_the_issues_sequences() -> None:
    scenarios = _scenarios(20)
    assert [len(graphs) for graphs in scenarios.values()] == [20, 10, 10, 10, 5]
    a, b, c, d, e = scenarios.values()
    prompts = {g["2"]["inputs"]["name"] for g in a}
    assert len(prompts) == 20  # every run a new prompt, the rest unchanged
    assert {g["10"]["class_type"] for g in b} == {"ApplyInstantIDAdvanced"}
    assert len({g["10"]["inputs"]["ip_weight"] for g in b}) == 10
    assert [g["100"]["inputs"]["name"] for g in c[:3]] == ["face_a", "face_b", "face_a"]
    for graph in d:
        assert graph["11"]["inputs"]["model"] == ["10", 0]  # the second face applies on the first's model
        assert {graph["101"]["inputs"]["name"], graph["111"]["inputs"]["name"]} == {"mask_left", "mask_right"}
    # (e): only the second face's weight changes, so ComfyUI re-runs the second node on the first's output
    assert len({str(g["10"]) for g in e}) == 1 and len({g["11"]["inputs"]["weight"] for g in e}) == 5
    assert {str({k: v for k, v in g.items() if k != "11"}) for g in e} == {
        str({k: v for k, v in e[0].items() if k != "11"})
    }
    for graphs in scenarios.values():
        for graph in graphs:
            assert graph["32"]["class_type"] == "BenchSink"
