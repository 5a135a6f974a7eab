"""``instantid doctor``: check a ComfyUI-style models folder for what InstantID needs, per base model.

* insightface antelopev2: ``insightface/models/antelopev2/{scrfd_10g_bnkps,glintr100}.onnx``, checked
  to be the detector and recognizer insightface routes on (graph inputs and outputs, read with onnx);
  the pack's other ``.onnx`` files are listed as extra (insightface opens every one, so an unreadable
  one is wrong). The same models serve SD1.5 and SDXL.
* the InstantID adapter: ``instantid/*.bin|*.safetensors|...``, validated with
  ``instantid.weights.load_instantid`` (memory-mapped: only headers and shapes are read), which tells
  SD1.5 (768-d) from SDXL (2048-d);
* the IdentityNet ControlNet: ``controlnet/**/*.safetensors``, checked from the safetensors header (no
  tensor is loaded) to be a ControlNet whose cross-attention reads 768-d (SD1.5) or 2048-d (SDXL)
  context. A header cannot tell IdentityNet from other ControlNets, so a file counts as IdentityNet when
  its path says "instantid" or "identitynet"; other ControlNets of a needed architecture are listed as
  unconfirmed candidates.

Then, per architecture, whether the adapter, the IdentityNet and antelopev2 are all there and of the
same architecture: ``readiness``.

The Python environment and ComfyUI (``check_environment``): one onnxruntime distribution (two, such as
``onnxruntime`` beside ``onnxruntime-gpu``, overwrite each other's module: the CPU one, reinstalled by
insightface's requirements, shadows the GPU one), a ``cv2`` that loads (``opencv-python`` needs libGL,
often absent on headless servers: ``opencv-python-headless`` does not), and no other node pack in
ComfyUI's ``custom_nodes`` registering this pack's node ids (``instantid.comfy.other_packs``).

The exit status is 0 when at least one architecture is complete and the environment has no fault.

Run it as ``python -m instantid.doctor [MODELS_DIR]`` or ``python -m instantid doctor [MODELS_DIR]`` from
the pack's folder (no install needed), or ``instantid doctor`` after ``pip install``. The checks return
``Finding`` records and print nothing; ``run`` prints ``format_report``.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from instantid.face import (
    ANTELOPEV2,
    DETECTOR_FILE,
    EMBEDDING_DIM,
    PROVIDER_PACKAGES,
    REQUIRED_FILES,
    installed_distributions,
    installed_onnxruntime_packages,
)
from instantid.layout import ARCH_NAMES, arch_for_context_dim

INSIGHTFACE = "insightface antelopev2"
ADAPTER = "InstantID adapter"
CONTROLNET = "IdentityNet ControlNet"
ONNXRUNTIME = "onnxruntime"
OPENCV = "OpenCV (cv2)"
NODE_PACKS = "node packs"
ENVIRONMENT = (ONNXRUNTIME, OPENCV, NODE_PACKS)
ANTELOPEV2_SUBDIR = Path("insightface") / "models" / ANTELOPEV2
ADAPTER_SUBDIR = Path("instantid")
CONTROLNET_SUBDIR = Path("controlnet")
ADAPTER_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".sft")
IDENTITYNET_NAMES = ("instantid", "identitynet")
DOWNLOADS = {
    INSIGHTFACE: "the antelopev2 pack (insightface model zoo), its .onnx files extracted into {where}",
    ADAPTER: "ip-adapter.bin from the InstantX/InstantID repository on Hugging Face, into {where}",
    CONTROLNET: "ControlNetModel/diffusion_pytorch_model.safetensors from the InstantX/InstantID repository "
    "on Hugging Face, into {where} (e.g. as instantid/diffusion_pytorch_model.safetensors)",
}
"""Where each part comes from (the published InstantID is for SDXL)."""


class Status(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    WRONG = "wrong"
    UNSURE = "unsure"
    """Present but not confirmable (a ControlNet not named like IdentityNet, a model not inspected)."""
    EXTRA = "extra"
    """Present, not used by InstantID, harmless."""


@dataclass(frozen=True)
class Finding:
    """One observation: ``component`` (INSIGHTFACE, ADAPTER or CONTROLNET), its ``status``, the file or
    folder it is about (where it is, or where it belongs when missing), a sentence of ``detail``, and the
    base architecture (``"sd15"`` / ``"sdxl"``) of an adapter or ControlNet, where known."""

    component: str
    status: Status
    path: Path
    detail: str
    arch: str | None = None


def _comfyui_models_dir_of_this_pack() -> Path | None:
    """``<ComfyUI>/models`` when this package sits in ``<ComfyUI>/custom_nodes/<pack>/instantid``."""
    package = Path(__file__).resolve().parent
    custom_nodes, comfyui = package.parents[1], package.parents[2]
    if custom_nodes.name == "custom_nodes" and (comfyui / "models").is_dir():
        return comfyui / "models"
    return None


def default_models_dir() -> Path:
    """``$COMFYUI_MODELS`` when set; else ``./models`` when it exists; else the models folder of the
    ComfyUI this pack is cloned into (run from ``ComfyUI/custom_nodes/<pack>``); else ``./models``."""
    if os.environ.get("COMFYUI_MODELS"):
        return Path(os.environ["COMFYUI_MODELS"])
    local = Path("models")
    return local if local.is_dir() else _comfyui_models_dir_of_this_pack() or local


def has_problems(findings: Iterable[Finding]) -> bool:
    """True when something is missing or wrong (even if one architecture is ready)."""
    return any(f.status in (Status.MISSING, Status.WRONG) for f in findings)


def diagnose(models_dir: Path) -> list[Finding]:
    """All checks on ``models_dir``. ControlNet candidates are looked for in the architectures of the
    adapters found (in both when there is none)."""
    adapters = check_adapter(models_dir)
    archs = {f.arch for f in adapters if f.status is Status.OK and f.arch} or set(ARCH_NAMES)
    return check_insightface(models_dir) + adapters + check_controlnet(models_dir, archs)


# --- insightface ---------------------------------------------------------------------------------


def _onnx_interface(path: Path) -> tuple[list[list[int | str]], list[list[int | str]]]:
    """Input and output shapes of an ONNX graph (dims as ints, or names when dynamic)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def dims(values: Iterable[onnx.ValueInfoProto]) -> list[list[int | str]]:
        return [[d.dim_value or d.dim_param or "?" for d in v.type.tensor_type.shape.dim] for v in values]

    return dims(model.graph.input), dims(model.graph.output)


def _read_onnx(path: Path) -> tuple[list[list[int | str]], list[list[int | str]]] | Finding:
    """The graph interface of ``path``, or the finding that says why it cannot be read."""
    try:
        from google.protobuf.message import DecodeError
    except ImportError:  # onnx is not installed (it comes with insightface)
        return Finding(
            INSIGHTFACE, Status.UNSURE, path, "present; not inspected (the onnx package is missing)"
        )
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
    return inputs, outputs


def _check_onnx(path: Path, role: str) -> Finding:
    read = _read_onnx(path)
    if isinstance(read, Finding):
        return read
    inputs, outputs = read
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
    shape, out = inputs[0], outputs[0]
    if len(shape) != 4 or shape[2:] != [112, 112] or len(outputs) != 1 or out[-1:] != [EMBEDDING_DIM]:
        return Finding(
            INSIGHTFACE,
            Status.WRONG,
            path,
            f"expected the ArcFace recognizer (input Nx3x112x112, output Nx{EMBEDDING_DIM}); "
            f"found inputs {inputs}, outputs {outputs}",
        )
    return Finding(INSIGHTFACE, Status.OK, path, f"ArcFace recognizer, {EMBEDDING_DIM}-d embeddings")


def _check_extra_onnx(path: Path) -> Finding:
    read = _read_onnx(path)
    if isinstance(read, Finding):
        if read.status is Status.WRONG:
            detail = f"{read.detail} insightface opens every .onnx file in this folder: replace or remove it"
            return Finding(INSIGHTFACE, Status.WRONG, path, detail)
        return read
    return Finding(INSIGHTFACE, Status.EXTRA, path, "part of the antelopev2 pack; not used by InstantID")


def check_insightface(models_dir: Path) -> list[Finding]:
    """The antelopev2 detector and recognizer under ``models_dir/insightface/models/antelopev2``, and
    the folder's other ``.onnx`` files (extra)."""
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
    extra = sorted(p for p in folder.glob("*.onnx") if p.is_file() and p.name not in REQUIRED_FILES)
    return findings + [_check_extra_onnx(path) for path in extra]


# --- the adapter ---------------------------------------------------------------------------------


def _check_adapter_file(path: Path) -> Finding:
    from instantid.weights import AdapterFormatError, load_instantid

    try:
        weights = load_instantid(path)
    except (AdapterFormatError, OSError) as error:
        return Finding(ADAPTER, Status.WRONG, path, str(error))
    return Finding(
        ADAPTER,
        Status.OK,
        path,
        f"InstantID adapter for {ARCH_NAMES[weights.arch]} ({weights.num_layers} cross-attention layers, "
        f"{weights.cross_attention_dim}-d, {str(weights.dtype).removeprefix('torch.')})",
        weights.arch,
    )


def check_adapter(models_dir: Path) -> list[Finding]:
    """Every adapter-like file in ``models_dir/instantid``, validated with ``load_instantid``; other
    files there are listed as extra."""
    folder = models_dir / ADAPTER_SUBDIR
    files = sorted(p for p in folder.glob("*") if p.is_file())
    models = [p for p in files if p.suffix.lower() in ADAPTER_SUFFIXES]
    extra = [
        Finding(ADAPTER, Status.EXTRA, p, "not a model file; the loader does not list it")
        for p in files
        if p not in models
    ]
    if not models:
        missing = Finding(
            ADAPTER,
            Status.MISSING,
            folder,
            f"no {'/'.join(ADAPTER_SUFFIXES)} file here: download " + DOWNLOADS[ADAPTER].format(where=folder),
        )
        return [missing, *extra]
    return [_check_adapter_file(path) for path in models] + extra


# --- the ControlNet ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checkpoint:
    kind: str
    """What the header shows, in words."""
    arch: str | None = None
    """The base architecture of a ControlNet whose cross-attention width is SD1.5's or SDXL's."""
    is_adapter: bool = False


def _header_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # reads the header only
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}


def _supported_widths() -> str:
    from instantid.layout import ARCHS

    return ", ".join(f"{name} {ARCHS[arch]['cross_attention_dim']}" for arch, name in ARCH_NAMES.items())


def _classify(shapes: dict[str, list[int]]) -> _Checkpoint:
    keys = list(shapes)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if starts("image_proj.") and starts("ip_adapter."):
        return _Checkpoint("an adapter (image_proj / ip_adapter keys), not a ControlNet", is_adapter=True)
    diffusers = "controlnet_cond_embedding.conv_in.weight" in shapes
    ldm = starts("input_hint_block.", "control_model.input_hint_block.")
    if not (diffusers or ldm):
        if starts("model.diffusion_model.", "down_blocks.", "conv_in."):
            return _Checkpoint("a UNet / Stable Diffusion checkpoint, not a ControlNet")
        if any("lora" in k for k in keys):
            return _Checkpoint("a LoRA, not a ControlNet")
        return _Checkpoint(f"not a ControlNet ({len(keys)} keys, e.g. {', '.join(keys[:3])})")
    layout = "diffusers" if diffusers else "ComfyUI/ldm"
    cross = sorted({shapes[k][-1] for k in keys if k.endswith("attn2.to_k.weight")})
    if not cross:
        return _Checkpoint(f"a {layout} ControlNet without cross-attention layers")
    arch = arch_for_context_dim(cross[0]) if len(cross) == 1 else None
    if arch is None:
        return _Checkpoint(
            f"a {layout} ControlNet for neither SD1.5 nor SDXL (cross-attention dim {cross}; "
            f"InstantID supports {_supported_widths()})"
        )
    return _Checkpoint(f"an {ARCH_NAMES[arch]} ControlNet ({layout} layout)", arch)


def _named_like_identitynet(path: Path) -> bool:
    lowered = str(path).lower()
    return any(name in lowered for name in IDENTITYNET_NAMES)


def _inspect(path: Path) -> _Checkpoint | str:
    """What the safetensors file at ``path`` holds, or why it cannot be read."""
    from safetensors import SafetensorError

    try:
        return _classify(_header_shapes(path))
    except (SafetensorError, OSError, ValueError) as error:
        return f"not a readable safetensors file ({error})"


def _controlnet_finding(models_dir: Path, path: Path, checkpoint: _Checkpoint | str) -> Finding:
    """The finding for one file of the controlnet folder named like IdentityNet (or holding an adapter)."""
    if isinstance(checkpoint, str):
        return Finding(CONTROLNET, Status.WRONG, path, checkpoint)
    if checkpoint.is_adapter:
        detail = f"{checkpoint.kind}: an InstantID adapter belongs in {models_dir / ADAPTER_SUBDIR}"
        return Finding(CONTROLNET, Status.WRONG, path, detail)
    if checkpoint.arch:
        return Finding(CONTROLNET, Status.OK, path, checkpoint.kind, checkpoint.arch)
    detail = (
        f"{checkpoint.kind}; expected IdentityNet, a ControlNet for SD1.5 or SDXL ({_supported_widths()})"
    )
    return Finding(CONTROLNET, Status.WRONG, path, detail)


def _candidates_finding(folder: Path, arch: str, candidates: list[Path]) -> Finding:
    names = ", ".join(str(p.relative_to(folder)) for p in candidates)
    return Finding(
        CONTROLNET,
        Status.UNSURE,
        folder,
        f"no {ARCH_NAMES[arch]} file named like IdentityNet ({' or '.join(IDENTITYNET_NAMES)} in its path); "
        f"these {ARCH_NAMES[arch]} ControlNets have its architecture: {names}. If none is IdentityNet, download "
        + DOWNLOADS[CONTROLNET].format(where=folder),
        arch,
    )


def check_controlnet(models_dir: Path, archs: Iterable[str] = tuple(ARCH_NAMES)) -> list[Finding]:
    """The IdentityNet ControlNet(s) among ``models_dir/controlnet/**/*.safetensors``.

    Files named like IdentityNet are OK (with their architecture) or wrong; an adapter there is wrong.
    For each of ``archs`` without a named IdentityNet, the ControlNets of that architecture are listed
    as unconfirmed candidates. Missing when nothing fits at all.
    """
    folder = models_dir / CONTROLNET_SUBDIR
    findings: list[Finding] = []
    candidates: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        named = _named_like_identitynet(path.relative_to(folder))
        if path.suffix.lower() not in (".safetensors", ".sft"):
            if named and path.suffix.lower() in ADAPTER_SUFFIXES:
                detail = (
                    "a pickle checkpoint, not inspected; IdentityNet is published as safetensors (and an "
                    f"ip-adapter.bin belongs in {models_dir / ADAPTER_SUBDIR})"
                )
                findings.append(Finding(CONTROLNET, Status.WRONG, path, detail))
            continue
        checkpoint = _inspect(path)
        if named or (isinstance(checkpoint, _Checkpoint) and checkpoint.is_adapter):
            findings.append(_controlnet_finding(models_dir, path, checkpoint))
        elif isinstance(checkpoint, _Checkpoint) and checkpoint.arch:
            candidates.setdefault(checkpoint.arch, []).append(path)
    confirmed = {f.arch for f in findings if f.status is Status.OK}
    for arch in sorted(set(archs) - confirmed):
        if candidates.get(arch):
            findings.append(_candidates_finding(folder, arch, candidates[arch]))
    if not any(f.status in (Status.OK, Status.UNSURE, Status.WRONG) for f in findings):
        detail = "no IdentityNet ControlNet here: download " + DOWNLOADS[CONTROLNET].format(where=folder)
        findings.append(Finding(CONTROLNET, Status.MISSING, folder, detail))
    return findings


# --- the environment -----------------------------------------------------------------------------

ONNXRUNTIME_SWITCH = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
HEADLESS_SWITCH = "pip uninstall -y opencv-python && pip install opencv-python-headless"
OPENCV_PACKAGES = ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")


def check_onnxruntime() -> list[Finding]:
    """One onnxruntime distribution, and the GPU providers of an installed ``onnxruntime-gpu`` present."""
    here = Path(sys.prefix)
    packages = installed_onnxruntime_packages()
    if not packages:
        return [Finding(ONNXRUNTIME, Status.MISSING, here, "no onnxruntime installed: pip install onnxruntime")]
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except Exception as error:  # an overwritten module may fail in many ways
        return [Finding(ONNXRUNTIME, Status.WRONG, here, f"{', '.join(packages)} installed, import fails ({error})")]
    names = [p.split()[0] for p in packages]
    if len(names) > 1:
        gpu = "CUDAExecutionProvider" in providers
        effect = (
            "the GPU providers are there now, but every reinstall of insightface's requirements puts the CPU files back"
            if gpu
            else "the module's files are the CPU package's, so the CUDA face provider is missing (face analysis runs on the CPU)"
        )
        detail = (
            f"{' and '.join(packages)} are all installed: they write the same `onnxruntime` module, the last one "
            f"installed wins ({effect}; providers now: {', '.join(providers)}). Keep one: {ONNXRUNTIME_SWITCH}"
        )
        return [Finding(ONNXRUNTIME, Status.WRONG, here, detail)]
    if names == ["onnxruntime-gpu"] and "CUDAExecutionProvider" not in providers:
        detail = (
            f"{packages[0]} without its CUDA provider (providers: {', '.join(providers)}); reinstall it: "
            f"{ONNXRUNTIME_SWITCH}"
        )
        return [Finding(ONNXRUNTIME, Status.WRONG, here, detail)]
    hint = (
        f'; for the "CUDA" face provider: {PROVIDER_PACKAGES["CUDAExecutionProvider"]}'
        if "CUDAExecutionProvider" not in providers
        else ""
    )
    return [Finding(ONNXRUNTIME, Status.OK, here, f"{packages[0]} (providers: {', '.join(providers)}){hint}")]


def check_opencv() -> list[Finding]:
    """``cv2`` loads (the keypoint image and insightface need it); one OpenCV distribution."""
    here = Path(sys.prefix)
    packages = installed_distributions(OPENCV_PACKAGES)
    try:
        import cv2
    except ImportError as error:
        message = str(error)
        if any(lib in message for lib in ("libGL", "libgthread", "libX", "libSM", "libxcb")):
            detail = (
                f"cv2 cannot load: {message}. {', '.join(packages) or 'opencv-python'} is the GUI build, which "
                f"needs system display libraries a headless server lacks; use the headless build: {HEADLESS_SWITCH} "
                "(or install the system library, e.g. apt-get install libgl1 libglib2.0-0)"
            )
        else:
            detail = f"cv2 cannot load: {message}. Reinstall it: {HEADLESS_SWITCH}"
        return [Finding(OPENCV, Status.WRONG, here, detail)]
    version = getattr(cv2, "__version__", "?")
    if len(packages) > 1:
        detail = (
            f"cv2 {version} loads, but {' and '.join(packages)} are all installed and write the same `cv2`; an "
            f"update of either may break it. Keep one: {HEADLESS_SWITCH}"
        )
        return [Finding(OPENCV, Status.UNSURE, here, detail)]
    return [Finding(OPENCV, Status.OK, here, f"cv2 {version} loads ({', '.join(packages) or 'distribution unknown'})")]


def custom_nodes_dir(models_dir: Path) -> Path | None:
    """ComfyUI's ``custom_nodes`` beside ``models_dir`` (``<ComfyUI>/models``), else the folder this pack
    is cloned into, else None."""
    beside = models_dir.resolve().parent / "custom_nodes"
    if beside.is_dir():
        return beside
    pack = Path(__file__).resolve().parents[1]
    return pack.parent if pack.parent.name == "custom_nodes" else None


def check_other_packs(custom_nodes: Path | None) -> list[Finding]:
    """Other entries of ``custom_nodes`` registering this pack's node ids (``instantid.comfy.other_packs``)."""
    from instantid.comfy.other_packs import describe, find_other_packs

    if custom_nodes is None:
        return []
    own = Path(__file__).resolve().parents[1]
    packs = find_other_packs([custom_nodes], own)
    if not packs:
        return [Finding(NODE_PACKS, Status.OK, custom_nodes, "no other pack registers the InstantID node ids")]
    return [Finding(NODE_PACKS, Status.WRONG, pack.path, describe([pack], own)) for pack in packs]


def check_environment(custom_nodes: Path | None) -> list[Finding]:
    """onnxruntime, OpenCV and the other node packs in ``custom_nodes`` (skipped when None)."""
    return check_onnxruntime() + check_opencv() + check_other_packs(custom_nodes)


# --- per architecture ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    """What one base architecture has: the antelopev2 models (shared by all), its adapters, its IdentityNet
    ControlNets, and ControlNets of its architecture that may be IdentityNet (``candidates``)."""

    arch: str
    antelopev2: bool
    adapters: tuple[Path, ...]
    identitynets: tuple[Path, ...]
    candidates: bool

    @property
    def ready(self) -> bool:
        """Everything InstantID needs for this architecture is there (an unconfirmed IdentityNet counts)."""
        return self.antelopev2 and bool(self.adapters) and (bool(self.identitynets) or self.candidates)

    def missing(self) -> list[str]:
        """What this architecture lacks, in words."""
        name = ARCH_NAMES[self.arch]
        needs = [
            (self.adapters, f"an InstantID adapter for {name}"),
            (self.identitynets or self.candidates, f"an IdentityNet ControlNet for {name}"),
            (self.antelopev2, "the antelopev2 face models"),
        ]
        return [what for present, what in needs if not present]


def readiness(findings: Sequence[Finding]) -> list[Readiness]:
    """Per architecture (SD1.5, SDXL), what of it ``findings`` show to be in place."""
    antelopev2 = all(
        any(
            f.component == INSIGHTFACE and f.path.name == name and f.status in (Status.OK, Status.UNSURE)
            for f in findings
        )
        for name in REQUIRED_FILES
    )

    def paths(component: str, arch: str, status: Status = Status.OK) -> tuple[Path, ...]:
        return tuple(
            f.path for f in findings if f.component == component and f.arch == arch and f.status is status
        )

    return [
        Readiness(
            arch,
            antelopev2,
            paths(ADAPTER, arch),
            paths(CONTROLNET, arch),
            bool(paths(CONTROLNET, arch, Status.UNSURE)),
        )
        for arch in ARCH_NAMES
    ]


# --- report --------------------------------------------------------------------------------------


def _relative(path: Path, models_dir: Path) -> Path:
    try:
        return path.relative_to(models_dir)
    except ValueError:
        return path


def _arch_line(state: Readiness, models_dir: Path) -> str:
    name = f"{ARCH_NAMES[state.arch]}:"
    if state.ready:
        identitynet = (
            ", ".join(str(_relative(p, models_dir)) for p in state.identitynets)
            or "unconfirmed (see the candidates above)"
        )
        adapters = ", ".join(str(_relative(p, models_dir)) for p in state.adapters)
        return f"  {name:6} ready: adapter {adapters}; IdentityNet {identitynet}; antelopev2"
    return f"  {name:6} missing {', '.join(state.missing())}"


def _mismatch_line(states: Sequence[Readiness]) -> str | None:
    """A sentence when the adapters and the IdentityNets found are all for different architectures."""
    with_adapter = [ARCH_NAMES[s.arch] for s in states if s.adapters]
    with_identitynet = [ARCH_NAMES[s.arch] for s in states if s.identitynets]
    if not with_adapter or not with_identitynet or set(with_adapter) & set(with_identitynet):
        return None
    return (
        f"  The InstantID adapter is for {' and '.join(with_adapter)} but the IdentityNet ControlNet is for "
        f"{' and '.join(with_identitynet)}: they do not match; both must be for the same base model."
    )


def format_report(models_dir: Path, findings: Iterable[Finding]) -> str:
    """A plain-text table of ``findings`` (paths relative to ``models_dir``), one line per architecture,
    and a summary line ("Ready for SD1.5.", "Ready for SD1.5 and SDXL." or "Not ready ...")."""
    findings = list(findings)
    lines = [f"InstantID doctor: {models_dir.resolve()}"]
    for f in findings:
        lines.append(f"  [{f.status.value:7}] {f.component:23} {_relative(f.path, models_dir)}")
        lines.append(f"            {f.detail}")
    states = readiness(findings)
    lines.append("Per base model:")
    lines += [_arch_line(state, models_dir) for state in states]
    mismatch = _mismatch_line(states)
    lines += [mismatch] if mismatch else []
    ready = [ARCH_NAMES[s.arch] for s in states if s.ready]
    wrong = sum(f.status is Status.WRONG and f.component not in ENVIRONMENT for f in findings)
    faults = sum(f.status in (Status.WRONG, Status.MISSING) and f.component in ENVIRONMENT for f in findings)
    note = f" {wrong} wrong file(s) listed above." if wrong else ""
    note += f" {faults} environment fault(s) listed above: InstantID will not run right until fixed." if faults else ""
    if ready:
        lines.append(f"Ready for {' and '.join(ready)}.{note}")
    else:
        lines.append(
            f"Not ready for {' or '.join(ARCH_NAMES.values())} yet: see what is missing above.{note}"
        )
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------

DESCRIPTION = (
    "Check MODELS_DIR for insightface/models/antelopev2, instantid/ and controlnet/; print what is present, "
    "missing or wrong and where each file belongs, and per base model (SD1.5, SDXL) whether the adapter, "
    "the IdentityNet ControlNet and antelopev2 are complete and match; then onnxruntime, OpenCV and other node "
    "packs registering the same node ids in ComfyUI's custom_nodes. Exit status 0 when at least one base model "
    "is ready and the environment has no fault, 1 otherwise, 2 when MODELS_DIR is not a folder."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The doctor's command-line arguments (shared by ``python -m instantid.doctor`` and ``instantid doctor``)."""
    parser.add_argument(
        "models_dir",
        nargs="?",
        type=Path,
        metavar="MODELS_DIR",
        help="the ComfyUI models folder (default: $COMFYUI_MODELS, else ./models, else the models folder of "
        "the ComfyUI this pack is cloned into)",
    )


def run(models_dir: Path | None = None) -> int:
    """Print the report for ``models_dir`` (default: ``default_models_dir()``) and return the exit status."""
    models_dir = models_dir or default_models_dir()
    if not models_dir.is_dir():
        print(
            f"instantid doctor: {models_dir} is not a folder; pass the ComfyUI models folder", file=sys.stderr
        )
        return 2
    findings = diagnose(models_dir)
    environment = check_environment(custom_nodes_dir(models_dir))
    print(format_report(models_dir, findings + environment))
    ready = any(state.ready for state in readiness(findings))
    return 0 if ready and not has_problems(environment) else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m instantid.doctor [MODELS_DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m instantid.doctor", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv).models_dir)


if __name__ == "__main__":
    sys.exit(main())
