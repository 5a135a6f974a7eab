"""Re-runs on a real ComfyUI server under both clone semantics, over HTTP only (issue 13).

Since ComfyUI PR #12382 (2026-02-10) ``ModelPatcher.clone()`` copies ``model_options`` with
``deepcopy_list_dict`` and shares patch objects with the model it cloned. A user with two faces who
edits only the second face's weight makes ComfyUI re-run the second Apply InstantID on the first one's
cached output; a pack that mutates a patch it got from that clone changes the cached model, and the
edits accumulate. Here the graph runs first with the second face's weight at 2.0, then with three
edits of that weight alone, the last one back to 2.0; its sampled latent (``SaveLatent``, read from the
server's output folder: the 8-bit image of these random-weight models barely moves with the weight)
must equal the first run's, which the server made before any edit.

Servers: ``[installed]`` is the session's server with the installed ComfyUI's own ``clone()`` (it has
run other tests' graphs, never this one); ``[list-dict]`` a server started for this test whose
``clone()`` copies as since that PR (the test-only folder of ``instantid.testing.comfy_clone_node``),
so its first prompt is a fresh server's run. On a ComfyUI that already copies so (0.3.64 with
``clone-semantics-2026.patch`` in CI) ``[installed]`` is that run and ``[list-dict]`` is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from instantid.testing.comfy_clone_semantics import copies_with_list_dict
from instantid.testing.comfy_fixture import TestInstall, prepare_sibling, use_test_files
from instantid.testing.comfy_install import install_clone_semantics
from instantid.testing.comfy_server import ComfyServer, PromptRun
from instantid.testing.comfy_server import comfy_server as running_server
from instantid.testing.workflows import load_workflow, node_ids, set_inputs, to_api

EXAMPLES = Path(__file__).resolve().parent / "workflows"
WEIGHTS = (2.0, 0.8, 1.4, 2.0)
"""The second face's weight: the first prompt, then three edits of it alone, the last back to the first."""


def _latent(server: ComfyServer, run: PromptRun) -> torch.Tensor:
    """The latent the run's ``SaveLatent`` wrote into the server's output folder."""
    from safetensors.torch import load_file

    assert run.ok, f"prompt failed: {run.error}\n{server.log_tail()}"
    (saved,) = [item for output in run.outputs.values() for item in output.get("latents", [])]
    path = server.root / "output" / saved["subfolder"] / saved["filename"]
    return load_file(str(path))["latent_tensor"]


def _graph(server: ComfyServer, install: TestInstall, weight: float) -> dict[str, Any]:
    graph = to_api(load_workflow(EXAMPLES / "instantid_two_faces_masks.json"), server.object_info())
    graph = set_inputs(use_test_files(graph, install), "KSampler", steps=1, seed=21)
    (sampler,) = node_ids(graph, "KSampler")
    graph["clone_semantics_latent"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [sampler, 0], "filename_prefix": "clone_semantics/latent"},
    }
    return set_inputs(graph, "ApplyInstantID", index=1, weight=weight)


@pytest.fixture(scope="module")
def list_dict_server(
    comfy_install: TestInstall, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComfyServer]:
    sibling = prepare_sibling(comfy_install, tmp_path_factory.mktemp("list_dict_server"), "list-dict")
    with running_server(sibling.root) as server:
        yield server


@pytest.mark.parametrize("semantics", ["installed", "list-dict"])
def test_editing_the_second_face_weight_three_times_gives_the_first_runs_output(
    semantics: str, request: pytest.FixtureRequest, comfy_install: TestInstall
) -> None:
    installed_clone = request.getfixturevalue("comfy").ModelPatcher.__dict__["clone"]
    if semantics == "list-dict" and copies_with_list_dict(installed_clone):
        pytest.skip("this ComfyUI's own clone() copies with deepcopy_list_dict: [installed] is that run")
    server: ComfyServer = request.getfixturevalue(
        "comfy_server" if semantics == "installed" else "list_dict_server"
    )
    if semantics == "list-dict":
        assert "ModelPatcher.clone" in server.log_text() and "deepcopy_list_dict" in server.log_text(), (
            "the clone-semantics folder did not load:\n" + server.log_tail()
        )
    latents = []
    for i, weight in enumerate(WEIGHTS):
        run = server.run(_graph(server, comfy_install, weight), timeout=900)  # a loaded shared machine
        latents.append(_latent(server, run))
        if i:
            first_face, second_face = node_ids(_graph(server, comfy_install, weight), "ApplyInstantID")
            assert first_face in run.cached and second_face not in run.cached, (run.cached, "not a re-run")
    reference = latents[0]
    tolerance = 1e-5 * float(reference.abs().max())
    assert float((latents[1] - reference).abs().max()) > 100 * tolerance, (
        "the second face's weight does not change the latent: the test cannot fail"
    )
    difference = float((latents[-1] - reference).abs().max())
    assert difference <= tolerance, (
        f"after {len(WEIGHTS) - 1} edits of the second face's weight the latent differs from the first run's "
        f"by {difference:.3g} (tolerance {tolerance:.3g}): the re-runs changed the cached first face's model"
    )


def test_the_clone_semantics_folder_is_written_only_for_list_dict(tmp_path: Path) -> None:
    assert install_clone_semantics(tmp_path, "installed") is None and not any(tmp_path.iterdir())
    folder = install_clone_semantics(tmp_path, "list-dict")
    assert folder is not None and sorted(p.name for p in folder.iterdir()) == [
        "__init__.py",
        "comfy_clone_semantics.py",
    ]
    assert "list_dict_clone" in (folder / "__init__.py").read_text()
    with pytest.raises(ValueError, match="expected one of"):
        install_clone_semantics(tmp_path / "other", "deepcopy")
