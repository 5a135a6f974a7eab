"""``instantid doctor``: check a ComfyUI-style models folder for the three things InstantID needs.

* insightface antelopev2: ``insightface/models/antelopev2/{scrfd_10g_bnkps,glintr100}.onnx``, checked
  to be the detector and recognizer insightface routes on (graph inputs and outputs, read with onnx);
* the InstantID adapter: ``instantid/*.bin|*.safetensors|...``, validated with
  ``instantid.weights.load_instantid`` (memory-mapped: only headers and shapes are read);
* the IdentityNet ControlNet: ``controlnet/**/*.safetensors``, checked from the safetensors header
  (no tensor is loaded) to be an SDXL ControlNet (cross-attention dim 2048). A header cannot tell
  IdentityNet from other SDXL ControlNets, so a file counts as IdentityNet when its path says
  "instantid" or "identitynet"; other SDXL ControlNets are listed as unconfirmed candidates.

Every check returns ``Finding`` records (what, status, where, detail); nothing is printed or changed
here. ``cli.py`` prints ``format_report`` and exits non-zero when ``has_problems``.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from instantid.face import ANTELOPEV2, DETECTOR_FILE, EMBEDDING_DIM, REQUIRED_FILES

INSIGHTFACE = "insightface antelopev2"
ADAPTER = "InstantID adapter"
CONTROLNET = "IdentityNet ControlNet"
ANTELOPEV2_SUBDIR = Path("insightface") / "models" / ANTELOPEV2
ADAPTER_SUBDIR = Path("instantid")
CONTROLNET_SUBDIR = Path("controlnet")
ADAPTER_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".sft")
SDXL_CROSS_ATTENTION_DIM = 2048
IDENTITYNET_NAMES = ("instantid", "identitynet")
DOWNLOADS = {
    INSIGHTFACE: "the antelopev2 pack (insightface model zoo), its .onnx files extracted into {where}",
    ADAPTER: "ip-adapter.bin from the InstantX/InstantID repository on Hugging Face, into {where}",
    CONTROLNET: "ControlNetModel/diffusion_pytorch_model.safetensors from the InstantX/InstantID repository "
    "on Hugging Face, into {where} (e.g. as instantid/diffusion_pytorch_model.safetensors)",
}


class Status(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    WRONG = "wrong"
    UNSURE = "unsure"
    """Present but not confirmable (an SDXL ControlNet not named like IdentityNet); not a failure."""


@dataclass(frozen=True)
class Finding:
    """One observation: ``component`` (INSIGHTFACE, ADAPTER or CONTROLNET), its ``status``, the file or
    folder it is about (where it is, or where it belongs when missing) and a sentence of ``detail``."""

    component: str
    status: Status
    path: Path
    detail: str


def default_models_dir() -> Path:
    """``$COMFYUI_MODELS`` when set, else ``./models``."""
    return Path(os.environ.get("COMFYUI_MODELS") or "models")


def has_problems(findings: Iterable[Finding]) -> bool:
    """True when something is missing or wrong."""
    return any(f.status in (Status.MISSING, Status.WRONG) for f in findings)


def diagnose(models_dir: Path) -> list[Finding]:
    """All three checks on ``models_dir``."""
    return check_insightface(models_dir) + check_adapter(models_dir) + check_controlnet(models_dir)


# --- insightface ---------------------------------------------------------------------------------


def _onnx_interface(path: Path) -> tuple[list[list[int | str]], list[list[int | str]]]:
    """Input and output shapes of an ONNX graph (dims as ints, or names when dynamic)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def dims(values: Iterable[onnx.ValueInfoProto]) -> list[list[int | str]]:
        return [[d.dim_value or d.dim_param or "?" for d in v.type.tensor_type.shape.dim] for v in values]

    return dims(model.graph.input), dims(model.graph.output)


def _check_onnx(path: Path, role: str) -> Finding:
    from google.protobuf.message import DecodeError

    try:
        inputs, outputs = _onnx_interface(path)
    except (DecodeError, OSError, ValueError) as error:
        inputs, outputs, problem = [], [], str(error)
    else:
        problem = "its graph has no inputs or outputs"
    if not inputs or not outputs:
        return Finding(
            INSIGHTFACE, Status.WRONG, path, f"not a readable ONNX model ({problem}); a truncated download?"
        )
    if role == DETECTOR_FILE:
        if len(outputs) != 9 or len(inputs) != 1 or len(inputs[0]) != 4:
            return Finding(
                INSIGHTFACE,
                Status.WRONG,
                path,
                f"expected the SCRFD face detector (1 image input, 9 outputs: scores, boxes and keypoints "
                f"at strides 8, 16, 32); found {len(inputs)} inputs {inputs} and {len(outputs)} outputs",
            )
        return Finding(INSIGHTFACE, Status.OK, path, "SCRFD face detector with keypoints")
    shape = inputs[0] if inputs else []
    out = outputs[0] if outputs else []
    if len(shape) != 4 or shape[2:] != [112, 112] or len(outputs) != 1 or out[-1:] != [EMBEDDING_DIM]:
        return Finding(
            INSIGHTFACE,
            Status.WRONG,
            path,
            f"expected the ArcFace recognizer (input Nx3x112x112, output Nx{EMBEDDING_DIM}); "
            f"found inputs {inputs}, outputs {outputs}",
        )
    return Finding(INSIGHTFACE, Status.OK, path, f"ArcFace recognizer, {EMBEDDING_DIM}-d embeddings")


def check_insightface(models_dir: Path) -> list[Finding]:
    """The antelopev2 detector and recognizer under ``models_dir/insightface/models/antelopev2``."""
    folder = models_dir / ANTELOPEV2_SUBDIR
    findings = []
    for name in REQUIRED_FILES:
        path = folder / name
        if path.is_file():
            findings.append(_check_onnx(path, name))
            continue
        misplaced = [
            p for p in (folder / ANTELOPEV2 / name, models_dir / "insightface" / name) if p.is_file()
        ]
        if misplaced:
            detail = f"found at {misplaced[0]}; move it to {folder}"
        else:
            detail = f"{name} belongs here: download " + DOWNLOADS[INSIGHTFACE].format(where=folder)
        findings.append(Finding(INSIGHTFACE, Status.MISSING, path, detail))
    return findings


# --- the adapter ---------------------------------------------------------------------------------


def check_adapter(models_dir: Path) -> list[Finding]:
    """Every adapter-like file in ``models_dir/instantid``, validated with ``load_instantid``."""
    from instantid.weights import AdapterFormatError, load_instantid

    folder = models_dir / ADAPTER_SUBDIR
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in ADAPTER_SUFFIXES)
    if not files:
        return [
            Finding(
                ADAPTER,
                Status.MISSING,
                folder,
                f"no {'/'.join(ADAPTER_SUFFIXES)} file here: download "
                + DOWNLOADS[ADAPTER].format(where=folder),
            )
        ]
    findings = []
    for path in files:
        try:
            weights = load_instantid(path)
        except (AdapterFormatError, OSError) as error:
            findings.append(Finding(ADAPTER, Status.WRONG, path, str(error)))
            continue
        findings.append(
            Finding(
                ADAPTER,
                Status.OK,
                path,
                f"InstantID adapter for {weights.arch} ({weights.num_layers} cross-attention layers, "
                f"{str(weights.dtype).removeprefix('torch.')})",
            )
        )
    return findings


# --- the ControlNet ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checkpoint:
    kind: str
    """What the header shows, in words."""
    sdxl_controlnet: bool
    is_adapter: bool = False


def _header_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # reads the header only
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}


def _classify(shapes: dict[str, list[int]]) -> _Checkpoint:
    keys = list(shapes)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if starts("image_proj.") and starts("ip_adapter."):
        return _Checkpoint(
            "an adapter (image_proj / ip_adapter keys), not a ControlNet", False, is_adapter=True
        )
    diffusers = "controlnet_cond_embedding.conv_in.weight" in shapes
    ldm = starts("input_hint_block.", "control_model.input_hint_block.")
    if not (diffusers or ldm):
        if starts("model.diffusion_model.", "down_blocks.", "conv_in."):
            return _Checkpoint("a UNet / Stable Diffusion checkpoint, not a ControlNet", False)
        if any("lora" in k for k in keys):
            return _Checkpoint("a LoRA, not a ControlNet", False)
        return _Checkpoint(f"not a ControlNet ({len(keys)} keys, e.g. {', '.join(keys[:3])})", False)
    layout = "diffusers" if diffusers else "ComfyUI/ldm"
    cross = sorted({shapes[k][-1] for k in keys if k.endswith("attn2.to_k.weight")})
    if not cross:
        return _Checkpoint(f"a {layout} ControlNet without cross-attention layers", False)
    if cross != [SDXL_CROSS_ATTENTION_DIM]:
        return _Checkpoint(
            f"a {layout} ControlNet for another base model (cross-attention dim {cross}, SDXL's is "
            f"{SDXL_CROSS_ATTENTION_DIM})",
            False,
        )
    return _Checkpoint(f"an SDXL ControlNet ({layout} layout)", True)


def _named_like_identitynet(path: Path) -> bool:
    lowered = str(path).lower()
    return any(name in lowered for name in IDENTITYNET_NAMES)


def check_controlnet(models_dir: Path) -> list[Finding]:
    """The IdentityNet ControlNet among ``models_dir/controlnet/**/*.safetensors``."""
    from safetensors import SafetensorError

    folder = models_dir / CONTROLNET_SUBDIR
    findings: list[Finding] = []
    candidates: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder)
        named = _named_like_identitynet(rel)
        if path.suffix.lower() not in (".safetensors", ".sft"):
            if named and path.suffix.lower() in ADAPTER_SUFFIXES:
                findings.append(
                    Finding(
                        CONTROLNET,
                        Status.WRONG,
                        path,
                        "a pickle checkpoint, not inspected; IdentityNet is published as safetensors (and an "
                        f"ip-adapter.bin belongs in {models_dir / ADAPTER_SUBDIR})",
                    )
                )
            continue
        try:
            checkpoint = _classify(_header_shapes(path))
        except (SafetensorError, OSError, ValueError) as error:
            if named:
                findings.append(
                    Finding(CONTROLNET, Status.WRONG, path, f"not a readable safetensors file ({error})")
                )
            continue
        if checkpoint.is_adapter:
            findings.append(
                Finding(
                    CONTROLNET,
                    Status.WRONG,
                    path,
                    f"{checkpoint.kind}: an InstantID adapter belongs in {models_dir / ADAPTER_SUBDIR}",
                )
            )
        elif named and checkpoint.sdxl_controlnet:
            findings.append(Finding(CONTROLNET, Status.OK, path, checkpoint.kind))
        elif named:
            findings.append(
                Finding(
                    CONTROLNET,
                    Status.WRONG,
                    path,
                    f"{checkpoint.kind}; expected IdentityNet, an SDXL ControlNet "
                    f"(cross-attention dim {SDXL_CROSS_ATTENTION_DIM})",
                )
            )
        elif checkpoint.sdxl_controlnet:
            candidates.append(path)
    if any(f.status is Status.OK for f in findings):
        return findings
    if candidates:
        names = ", ".join(str(p.relative_to(folder)) for p in candidates)
        findings.append(
            Finding(
                CONTROLNET,
                Status.UNSURE,
                folder,
                f"no file named like IdentityNet ({' or '.join(IDENTITYNET_NAMES)} in its path); these SDXL "
                f"ControlNets have its architecture: {names}. If none is IdentityNet, download "
                + DOWNLOADS[CONTROLNET].format(where=folder),
            )
        )
    elif not any(f.status is Status.WRONG for f in findings):
        findings.append(
            Finding(
                CONTROLNET,
                Status.MISSING,
                folder,
                "no SDXL ControlNet here: download " + DOWNLOADS[CONTROLNET].format(where=folder),
            )
        )
    return findings


# --- report --------------------------------------------------------------------------------------


def format_report(models_dir: Path, findings: Iterable[Finding]) -> str:
    """A plain-text table of ``findings`` (paths relative to ``models_dir``) and a summary line."""
    findings = list(findings)
    lines = [f"InstantID doctor: {models_dir.resolve()}"]
    for f in findings:
        try:
            where = f.path.relative_to(models_dir)
        except ValueError:
            where = f.path
        lines.append(f"  [{f.status.value:7}] {f.component:23} {where}")
        lines.append(f"            {f.detail}")
    counts = {s: sum(f.status is s for f in findings) for s in Status}
    if has_problems(findings):
        lines.append(
            f"{counts[Status.MISSING]} missing, {counts[Status.WRONG]} wrong: InstantID will not run yet."
        )
    else:
        lines.append("Everything InstantID needs is in place.")
    return "\n".join(lines)
