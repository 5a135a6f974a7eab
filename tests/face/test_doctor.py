"""``instantid doctor`` on models folders the tests write (small real-format files; the SDXL adapter is a
full-size header over a sparse file of zeros)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
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
from instantid.testing.adapter_files import random_adapter_state
from instantid.testing.face_models import (
    DETECTOR_FILE,
    RECOGNIZER_FILE,
    build_antelopev2_like,
    build_recognizer,
)

REPO = Path(__file__).resolve().parents[2]
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32"}


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


def sparse_adapter(path: Path, arch: str) -> Path:
    """A full-size ``arch`` adapter in safetensors whose tensors are all zero: the header is real, the data
    a hole of the right length (a sparse file: written at once, no disk space; SDXL's is ~0.8 GB)."""
    with torch.device("meta"):  # shapes and dtypes only
        image_proj, ip_adapter = random_adapter_state(arch, scale=0, resampler="small")
    tensors = {f"image_proj.{k}": v for k, v in image_proj.items()} | {
        f"ip_adapter.{k}": v for k, v in ip_adapter.items()
    }
    header, offset = {}, 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(8 + len(encoded) + offset)
    return path


@pytest.fixture(scope="session")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {arch: sparse_adapter(folder / f"{arch}.safetensors", arch) for arch in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def controlnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cn")
    return {
        arch: controlnet_safetensors(folder / f"{arch}.safetensors", dim)
        for arch, dim in (("sd15", 768), ("sdxl", 2048))
    }


@pytest.fixture
def models(tmp_path: Path, antelope_root: Path) -> Path:
    """A models folder with the antelopev2 models only (linked, not copied)."""
    folder = tmp_path / "models"
    (folder / "insightface" / "models").mkdir(parents=True)
    (folder / "insightface" / "models" / "antelopev2").symlink_to(antelope_root / "models" / "antelopev2")
    return folder


def link(target: Path, where: Path) -> Path:
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(target)
    return where


def add_set(
    models: Path, arch: str, adapter_files: dict[str, Path], controlnet_files: dict[str, Path]
) -> None:
    """The adapter and the IdentityNet of ``arch``, where ComfyUI_InstantID users keep them."""
    link(adapter_files[arch], models / "instantid" / f"ip-adapter_{arch}.safetensors")
    link(
        controlnet_files[arch],
        models / "controlnet" / "instantid" / f"{arch}" / "diffusion_pytorch_model.safetensors",
    )


@pytest.fixture
def complete_sdxl(models: Path, adapter_files: dict[str, Path], controlnet_files: dict[str, Path]) -> Path:
    add_set(models, "sdxl", adapter_files, controlnet_files)
    return models


@pytest.fixture
def complete_sd15(models: Path, adapter_files: dict[str, Path], controlnet_files: dict[str, Path]) -> Path:
    add_set(models, "sd15", adapter_files, controlnet_files)
    return models


def statuses(findings: list[Finding], component: str) -> list[Status]:
    return [f.status for f in findings if f.component == component]


def only(findings: list[Finding], status: Status) -> Finding:
    (found,) = [f for f in findings if f.status is status]
    return found


def test_complete_sdxl_set(complete_sdxl: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", str(complete_sdxl)]) == 0
    out = capsys.readouterr().out
    assert "InstantID adapter for SDXL (70 cross-attention layers, 2048-d, float16)" in out
    assert "controlnet/instantid/sdxl/diffusion_pytorch_model.safetensors" in out
    assert "an SDXL ControlNet (diffusers layout)" in out
    assert "  SD1.5: missing an InstantID adapter for SD1.5, an IdentityNet ControlNet for SD1.5\n" in out
    assert (
        "  SDXL:  ready: adapter instantid/ip-adapter_sdxl.safetensors; "
        "IdentityNet controlnet/instantid/sdxl/diffusion_pytorch_model.safetensors; antelopev2\n"
    ) in out
    assert out.endswith("Ready for SDXL.\n")
    assert "[missing]" not in out and "[wrong" not in out


def test_complete_sd15_set_is_ready_and_its_identitynet_is_not_for_another_base_model(
    complete_sd15: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", str(complete_sd15)]) == 0
    out = capsys.readouterr().out
    assert "InstantID adapter for SD1.5 (16 cross-attention layers, 768-d, float16)" in out
    assert "an SD1.5 ControlNet (diffusers layout)" in out
    assert "another base model" not in out and "[wrong" not in out
    assert out.endswith("Ready for SD1.5.\n")


def test_both_sets(
    complete_sd15: Path, adapter_files: dict[str, Path], controlnet_files: dict[str, Path]
) -> None:
    add_set(complete_sd15, "sdxl", adapter_files, controlnet_files)
    run = subprocess.run(
        [sys.executable, "-m", "instantid.doctor", str(complete_sd15)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0 and run.stdout.endswith("Ready for SD1.5 and SDXL.\n"), run.stdout + run.stderr


def test_adapter_and_identitynet_of_different_architectures(
    models: Path,
    adapter_files: dict[str, Path],
    controlnet_files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    link(adapter_files["sd15"], models / "instantid" / "ip-adapter.safetensors")
    link(
        controlnet_files["sdxl"], models / "controlnet" / "instantid" / "diffusion_pytorch_model.safetensors"
    )
    assert main(["doctor", str(models)]) == 1
    out = capsys.readouterr().out
    assert "  SD1.5: missing an IdentityNet ControlNet for SD1.5\n" in out
    assert "  SDXL:  missing an InstantID adapter for SDXL\n" in out
    assert (
        "The InstantID adapter is for SD1.5 but the IdentityNet ControlNet is for SDXL: they do not match; "
        "both must be for the same base model." in out
    )
    assert out.endswith("Not ready for SD1.5 or SDXL yet: see what is missing above.\n")


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
        "  SDXL:  missing an InstantID adapter for SDXL, an IdentityNet ControlNet for SDXL, the antelopev2 face models",
    ):
        assert where in out
    assert out.count("[missing]") == 4


def test_models_of_the_wrong_kind_are_named(complete_sdxl: Path, antelope_root: Path) -> None:
    folder = complete_sdxl / "insightface" / "models" / "antelopev2"
    folder.unlink()
    folder.mkdir()
    onnx.save(build_recognizer(), str(folder / DETECTOR_FILE))  # a recognizer where the detector belongs
    whole = (antelope_root / "models" / "antelopev2" / RECOGNIZER_FILE).read_bytes()
    (folder / RECOGNIZER_FILE).write_bytes(whole[: len(whole) // 2])  # a truncated download
    findings = diagnose(complete_sdxl)
    assert statuses(findings, INSIGHTFACE) == [Status.WRONG, Status.WRONG]
    detector, recognizer = (f for f in findings if f.component == INSIGHTFACE)
    assert "expected the SCRFD face detector" in detector.detail and "found 1 inputs" in detector.detail
    assert "not a readable ONNX model" in recognizer.detail
    assert main(["doctor", str(complete_sdxl)]) == 1


def test_extra_files_are_listed_not_errors(
    complete_sdxl: Path, antelope_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = complete_sdxl / "insightface" / "models" / "antelopev2"
    folder.unlink()
    shutil.copytree(antelope_root / "models" / "antelopev2", folder)
    shutil.copy(folder / RECOGNIZER_FILE, folder / "genderage.onnx")  # the pack's other models
    (complete_sdxl / "instantid" / "README.txt").write_text("where the adapter came from")
    findings = diagnose(complete_sdxl)
    extra = {f.path.name: f for f in findings if f.status is Status.EXTRA}
    assert set(extra) == {"genderage.onnx", "README.txt"}
    assert "not used by InstantID" in extra["genderage.onnx"].detail
    assert main(["doctor", str(complete_sdxl)]) == 0
    assert "[extra  ] insightface antelopev2" in capsys.readouterr().out
    # insightface opens every .onnx file of the folder: an unreadable extra one is wrong.
    (folder / "1k3d68.onnx").write_bytes(b"\x00" * 100)
    assert only(diagnose(complete_sdxl), Status.WRONG).path.name == "1k3d68.onnx"


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


def test_wrong_adapter_files_beside_a_complete_set(
    complete_sd15: Path, controlnet_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = complete_sd15 / "instantid" / "ip-adapter_sd15.safetensors"
    link(controlnet_files["sdxl"], complete_sd15 / "instantid" / "controlnet.safetensors")
    (complete_sd15 / "instantid" / "half.safetensors").write_bytes(adapter.read_bytes()[:5000])
    findings = diagnose(complete_sd15)
    adapters = {f.path.name: f for f in findings if f.component == ADAPTER}
    assert adapters["ip-adapter_sd15.safetensors"].status is Status.OK
    assert adapters["controlnet.safetensors"].status is Status.WRONG
    assert "looks like a ControlNet checkpoint" in adapters["controlnet.safetensors"].detail
    assert adapters["half.safetensors"].status is Status.WRONG
    assert "truncated" in adapters["half.safetensors"].detail
    assert main(["doctor", str(complete_sd15)]) == 0  # SD1.5 is complete
    assert capsys.readouterr().out.endswith("Ready for SD1.5. 2 wrong file(s) listed above.\n")


def test_controlnet_for_neither_architecture_named_like_identitynet(tmp_path: Path) -> None:
    controlnet_safetensors(tmp_path / "controlnet" / "instantid-controlnet.safetensors", 1024)
    finding = only(diagnose(tmp_path), Status.WRONG)
    assert finding.component == CONTROLNET
    assert "a diffusers ControlNet for neither SD1.5 nor SDXL (cross-attention dim [1024]" in finding.detail
    assert "InstantID supports SD1.5 768, SDXL 2048" in finding.detail


def test_adapter_in_the_controlnet_folder(tmp_path: Path, adapter_files: dict[str, Path]) -> None:
    link(adapter_files["sd15"], tmp_path / "controlnet" / "ip-adapter.safetensors")
    finding = only(diagnose(tmp_path), Status.WRONG)
    assert f"an InstantID adapter belongs in {tmp_path / 'instantid'}" in finding.detail
    # Only a wrong file there: nothing else is reported missing for the ControlNet.
    assert statuses(diagnose(tmp_path), CONTROLNET) == [Status.WRONG]


def test_unnamed_controlnets_of_the_adapters_architecture_are_candidates(
    complete_sd15: Path, controlnet_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(complete_sd15 / "controlnet")
    link(controlnet_files["sd15"], complete_sd15 / "controlnet" / "sd15-depth.safetensors")
    link(controlnet_files["sdxl"], complete_sd15 / "controlnet" / "sdxl-canny.safetensors")
    finding = only(diagnose(complete_sd15), Status.UNSURE)
    assert finding.arch == "sd15"
    assert "these SD1.5 ControlNets have its architecture: sd15-depth.safetensors." in finding.detail
    assert "sdxl-canny" not in finding.detail
    assert main(["doctor", str(complete_sd15)]) == 0
    assert "IdentityNet unconfirmed (see the candidates above)" in capsys.readouterr().out


def test_truncated_identitynet(tmp_path: Path, controlnet_files: dict[str, Path]) -> None:
    target = tmp_path / "controlnet" / "InstantID" / "diffusion_pytorch_model.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(controlnet_files["sdxl"].read_bytes()[:2000])
    finding = only(diagnose(tmp_path), Status.WRONG)
    assert finding.path == target and "not a readable safetensors file" in finding.detail


def test_default_models_dir_from_environment(
    complete_sdxl: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COMFYUI_MODELS", str(complete_sdxl))
    assert main(["doctor"]) == 0
    assert str(complete_sdxl.resolve()) in capsys.readouterr().out
    monkeypatch.delenv("COMFYUI_MODELS")
    monkeypatch.chdir(complete_sdxl.parent)  # ./models
    assert main(["doctor"]) == 0


def test_missing_models_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_runs_from_a_pack_cloned_into_custom_nodes_without_installing(
    tmp_path: Path, complete_sdxl: Path
) -> None:
    """``python -m instantid.doctor`` and ``python -m instantid doctor`` in ``ComfyUI/custom_nodes/<pack>``:
    the package comes from that folder, and the models folder defaults to ``ComfyUI/models``."""
    comfyui = tmp_path / "ComfyUI"
    pack = comfyui / "custom_nodes" / "comfyui-instantid-cow"
    shutil.copytree(REPO / "instantid", pack / "instantid", ignore=shutil.ignore_patterns("__pycache__"))
    complete_sdxl.rename(comfyui / "models")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_MODELS")}
    for command in (["instantid.doctor"], ["instantid", "doctor"]):
        run = subprocess.run(
            [sys.executable, "-m", *command], cwd=pack, capture_output=True, text=True, env=env, check=False
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.startswith(f"InstantID doctor: {(comfyui / 'models').resolve()}\n")
        assert run.stdout.endswith("Ready for SDXL.\n")


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
    assert run.returncode == 1 and run.stdout.count("[missing]") == 4


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
            {
                "input_hint_block.0.weight": (4, 3, 3, 3),
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (4, 768),
            },
            Status.OK,
            "an SD1.5 ControlNet (ComfyUI/ldm layout)",
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


# --- the environment: onnxruntime, OpenCV, other node packs ---------------------------------------

STOCK_PACK_SOURCE = '''
class InstantIDModelLoader: ...
NODE_CLASS_MAPPINGS = {
    "InstantIDModelLoader": InstantIDModelLoader,
    "InstantIDFaceAnalysis": InstantIDModelLoader,
    "ApplyInstantID": InstantIDModelLoader,
}
'''


def broken_environment(site: Path) -> Path:
    """A folder to put first on ``PYTHONPATH``: the files pip leaves for an ``onnxruntime-gpu`` installed
    beside the CPU ``onnxruntime`` whose module files won (its dist-info only), and a ``cv2`` whose import
    fails as opencv-python's does on a server without libGL (a stand-in raising that error: this machine
    has libGL)."""
    info = site / "onnxruntime_gpu-1.20.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.0\n")
    (site / "cv2").mkdir()
    (site / "cv2" / "__init__.py").write_text(
        'raise ImportError("libGL.so.1: cannot open shared object file: No such file or directory")\n'
    )
    return site


def test_environment_faults_are_reported_with_their_fix(tmp_path: Path, complete_sdxl: Path) -> None:
    """Complete SDXL models, but onnxruntime shadowing onnxruntime-gpu, a cv2 that cannot load libGL and
    the original pack in custom_nodes: each is reported with its fix, and the exit status is 1."""
    from instantid.doctor import HEADLESS_SWITCH, ONNXRUNTIME_SWITCH

    comfyui = tmp_path / "ComfyUI"
    stock = comfyui / "custom_nodes" / "ComfyUI_InstantID"
    stock.mkdir(parents=True)
    (stock / "InstantID.py").write_text(STOCK_PACK_SOURCE)
    (comfyui / "custom_nodes" / "ComfyUI_InstantID_old.disabled").mkdir()  # ComfyUI skips it: not reported
    (comfyui / "custom_nodes" / "ComfyUI_InstantID_old.disabled" / "x.py").write_text(STOCK_PACK_SOURCE)
    complete_sdxl.rename(comfyui / "models")
    site = broken_environment(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_MODELS"} | {"PYTHONPATH": f"{site}:{REPO}"}
    run = subprocess.run(
        [sys.executable, "-m", "instantid", "doctor", str(comfyui / "models")],
        cwd=REPO, capture_output=True, text=True, env=env, check=False,
    )
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert "onnxruntime-gpu 1.20.0" in out and "the last one installed wins" in out and ONNXRUNTIME_SWITCH in out
    assert "libGL.so.1" in out and HEADLESS_SWITCH in out
    assert f"{stock} (InstantIDModelLoader, InstantIDFaceAnalysis, ApplyInstantID)" in out
    assert "'.disabled'" in out and ".disabled (" not in out
    assert "Ready for SDXL. 3 environment fault(s) listed above" in out


def test_a_clean_environment_is_ok(tmp_path: Path) -> None:
    from instantid.doctor import ENVIRONMENT, check_environment

    (tmp_path / "custom_nodes" / "SomeOtherPack").mkdir(parents=True)
    (tmp_path / "custom_nodes" / "SomeOtherPack" / "nodes.py").write_text('NODE_CLASS_MAPPINGS = {"Other": 1}\n')
    findings = check_environment(tmp_path / "custom_nodes")
    assert [f.component for f in findings] == list(ENVIRONMENT)
    assert [f.status for f in findings] == [Status.OK] * 3, findings
