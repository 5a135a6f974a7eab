"""``instantid doctor`` on models folders the tests write (small real-format files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import save_file

from instantid.cli import main
from instantid.doctor import ADAPTER, CONTROLNET, INSIGHTFACE, Finding, Status, diagnose
from instantid.testing.adapter_files import write_random_adapter
from instantid.testing.face_models import (
    DETECTOR_FILE,
    RECOGNIZER_FILE,
    build_antelopev2_like,
    build_recognizer,
)

REPO = Path(__file__).resolve().parents[2]


def controlnet_safetensors(path: Path, cross_attention_dim: int) -> Path:
    """A small real diffusers ``ControlNetModel`` (SDXL-style when ``cross_attention_dim`` is 2048)."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    model = ControlNetModel(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1,
        attention_head_dim=2,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
        conditioning_embedding_out_channels=(4, 8),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def adapter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_adapter(
        tmp_path_factory.mktemp("adapter") / "ip-adapter.safetensors", arch="sd15", resampler="small", scale=0
    )


@pytest.fixture(scope="session")
def identitynet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return controlnet_safetensors(tmp_path_factory.mktemp("cn") / "diffusion_pytorch_model.safetensors", 2048)


@pytest.fixture
def complete(tmp_path: Path, antelope_root: Path, adapter_file: Path, identitynet_file: Path) -> Path:
    """A models folder with everything in place (large files linked, not copied)."""
    models = tmp_path / "models"
    (models / "insightface" / "models").mkdir(parents=True)
    (models / "insightface" / "models" / "antelopev2").symlink_to(antelope_root / "models" / "antelopev2")
    (models / "instantid").mkdir()
    (models / "instantid" / "ip-adapter.safetensors").symlink_to(adapter_file)
    (models / "controlnet" / "instantid").mkdir(parents=True)
    (models / "controlnet" / "instantid" / "diffusion_pytorch_model.safetensors").symlink_to(identitynet_file)
    return models


def statuses(findings: list[Finding], component: str) -> list[Status]:
    return [f.status for f in findings if f.component == component]


def only(findings: list[Finding], status: Status) -> Finding:
    (found,) = [f for f in findings if f.status is status]
    return found


def test_complete_folder_passes(complete: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", str(complete)]) == 0
    out = capsys.readouterr().out
    assert "Everything InstantID needs is in place." in out
    assert "InstantID adapter for sd15 (16 cross-attention layers" in out
    assert "controlnet/instantid/diffusion_pytorch_model.safetensors" in out
    assert "an SDXL ControlNet (diffusers layout)" in out
    assert "[missing]" not in out and "[wrong" not in out


def test_empty_folder_lists_where_everything_belongs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for where in (
        f"insightface/models/antelopev2/{DETECTOR_FILE}",
        f"insightface/models/antelopev2/{RECOGNIZER_FILE}",
        f"download ip-adapter.bin from the InstantX/InstantID repository on Hugging Face, into {tmp_path / 'instantid'}",
        f"diffusion_pytorch_model.safetensors from the InstantX/InstantID repository on Hugging Face, into {tmp_path / 'controlnet'}",
    ):
        assert where in out
    assert "4 missing, 0 wrong" in out


def test_models_of_the_wrong_kind_are_named(complete: Path, antelope_root: Path) -> None:
    folder = complete / "insightface" / "models" / "antelopev2"
    folder.unlink()
    folder.mkdir()
    onnx.save(build_recognizer(), str(folder / DETECTOR_FILE))  # a recognizer where the detector belongs
    whole = (antelope_root / "models" / "antelopev2" / RECOGNIZER_FILE).read_bytes()
    (folder / RECOGNIZER_FILE).write_bytes(whole[: len(whole) // 2])  # a truncated download
    findings = diagnose(complete)
    assert statuses(findings, INSIGHTFACE) == [Status.WRONG, Status.WRONG]
    detector, recognizer = (f for f in findings if f.component == INSIGHTFACE)
    assert "expected the SCRFD face detector" in detector.detail and "found 1 inputs" in detector.detail
    assert "not a readable ONNX model" in recognizer.detail


def test_antelopev2_extracted_one_level_too_deep(tmp_path: Path, antelope_root: Path) -> None:
    build_antelopev2_like(
        tmp_path / "insightface" / "models" / "antelopev2"
    )  # -> antelopev2/models/antelopev2
    nested = tmp_path / "insightface" / "models" / "antelopev2" / "antelopev2"
    (tmp_path / "insightface" / "models" / "antelopev2" / "models" / "antelopev2").rename(nested)
    findings = [f for f in diagnose(tmp_path) if f.component == INSIGHTFACE]
    assert [f.status for f in findings] == [Status.MISSING, Status.MISSING]
    assert all(
        f"move it to {tmp_path / 'insightface' / 'models' / 'antelopev2'}" in f.detail for f in findings
    )


def test_wrong_adapter_files(complete: Path, identitynet_file: Path) -> None:
    (complete / "instantid" / "controlnet.safetensors").symlink_to(identitynet_file)
    (complete / "instantid" / "half.safetensors").write_bytes(
        (complete / "instantid" / "ip-adapter.safetensors").read_bytes()[:5000]
    )
    findings = diagnose(complete)
    adapters = {f.path.name: f for f in findings if f.component == ADAPTER}
    assert adapters["ip-adapter.safetensors"].status is Status.OK
    assert adapters["controlnet.safetensors"].status is Status.WRONG
    assert "looks like a ControlNet checkpoint" in adapters["controlnet.safetensors"].detail
    assert adapters["half.safetensors"].status is Status.WRONG
    assert "truncated" in adapters["half.safetensors"].detail
    assert main(["doctor", str(complete)]) == 1


def test_controlnet_for_another_base_model_named_like_identitynet(tmp_path: Path) -> None:
    controlnet_safetensors(tmp_path / "controlnet" / "instantid-controlnet.safetensors", 768)
    finding = only(diagnose(tmp_path), Status.WRONG)
    assert finding.component == CONTROLNET
    assert "cross-attention dim [768], SDXL's is 2048" in finding.detail


def test_adapter_in_the_controlnet_folder(tmp_path: Path, adapter_file: Path) -> None:
    (tmp_path / "controlnet").mkdir()
    (tmp_path / "controlnet" / "ip-adapter.safetensors").symlink_to(adapter_file)
    finding = only(diagnose(tmp_path), Status.WRONG)
    assert f"an InstantID adapter belongs in {tmp_path / 'instantid'}" in finding.detail
    # Only a wrong file there: nothing else is reported missing for the ControlNet.
    assert statuses(diagnose(tmp_path), CONTROLNET) == [Status.WRONG]


def test_unnamed_sdxl_controlnet_is_a_candidate_not_a_failure(complete: Path, identitynet_file: Path) -> None:
    named = complete / "controlnet" / "instantid" / "diffusion_pytorch_model.safetensors"
    named.unlink()
    (complete / "controlnet" / "sdxl-canny.safetensors").symlink_to(identitynet_file)
    controlnet_safetensors(complete / "controlnet" / "sd15-depth.safetensors", 768)
    finding = only(diagnose(complete), Status.UNSURE)
    assert "these SDXL ControlNets have its architecture: sdxl-canny.safetensors." in finding.detail
    assert "sd15-depth" not in finding.detail
    assert main(["doctor", str(complete)]) == 0


def test_truncated_identitynet(tmp_path: Path, identitynet_file: Path) -> None:
    target = tmp_path / "controlnet" / "InstantID" / "diffusion_pytorch_model.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(identitynet_file.read_bytes()[:2000])
    finding = only(diagnose(tmp_path), Status.WRONG)
    assert finding.path == target and "not a readable safetensors file" in finding.detail


def test_default_models_dir_from_environment(
    complete: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COMFYUI_MODELS", str(complete))
    assert main(["doctor"]) == 0
    assert str(complete.resolve()) in capsys.readouterr().out
    monkeypatch.delenv("COMFYUI_MODELS")
    monkeypatch.chdir(complete.parent)  # ./models
    assert main(["doctor"]) == 0


def test_missing_models_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path: Path) -> None:
    declared = re.search(r'^instantid = "([\w.]+):(\w+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert declared, "pyproject.toml declares no instantid console script"
    module, function = declared.groups()
    assert getattr(import_module(module), function) is main
    run = subprocess.run(
        [sys.executable, "-m", "instantid.cli", "doctor", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert run.returncode == 1 and "4 missing, 0 wrong" in run.stdout


@pytest.mark.parametrize(
    ("keys", "status", "detail"),
    [
        (
            {
                "control_model.input_hint_block.0.weight": (4, 3, 3, 3),
                "control_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (4, 2048),
            },
            Status.OK,
            "an SDXL ControlNet (ComfyUI/ldm layout)",
        ),
        (
            {"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)},
            Status.WRONG,
            "a UNet / Stable Diffusion checkpoint, not a ControlNet; expected IdentityNet",
        ),
        (
            {
                "controlnet_cond_embedding.conv_in.weight": (4, 3, 3, 3),
                "controlnet_mid_block.weight": (4, 4, 1, 1),
            },
            Status.WRONG,
            "a diffusers ControlNet without cross-attention layers",
        ),
    ],
)
def test_controlnet_headers(
    tmp_path: Path, keys: dict[str, tuple[int, ...]], status: Status, detail: str
) -> None:
    path = tmp_path / "controlnet" / "instantid.safetensors"
    path.parent.mkdir()
    save_file({k: torch.zeros(shape, dtype=torch.float16) for k, shape in keys.items()}, str(path))
    (finding,) = [f for f in diagnose(tmp_path) if f.component == CONTROLNET]
    assert finding.status is status and detail in finding.detail
