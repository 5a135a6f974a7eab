"""Face analysis through insightface: one detection per image gives the identity embedding and the keypoints.

Images are ``HxWx3`` ``uint8`` **RGB** numpy arrays (what PIL and ComfyUI give, ComfyUI's after
``* 255``). insightface works on BGR like cv2, so ``analyze_face`` converts RGB to BGR itself before
calling ``app.get``; keypoints and boxes come back in the input image's pixel coordinates (x, y).

The models are insightface's ``antelopev2`` pack, read from ``<root>/models/antelopev2`` (ComfyUI keeps
it in ``models/insightface/models/antelopev2``). Nothing here ever downloads: insightface's
``FaceAnalysis`` downloads a pack whose folder is missing, so ``load_face_analysis`` checks the folder
first and raises ``FaceModelsMissingError`` naming it and the files expected there.

Any object with insightface's ``FaceAnalysis`` interface works as ``app`` (ComfyUI node packs pass their
own): ``app.get(bgr_image)`` returning faces with ``.bbox``, ``.kps``, ``.embedding`` (and
``.det_score``), and ``app.det_model`` with ``prepare(ctx_id, input_size=(w, h))`` or an ``input_size``
attribute. ``analyze_face`` changes the detector's size while retrying and restores it afterwards; like
insightface itself, one ``app`` must not be used from two threads at once.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

ANTELOPEV2 = "antelopev2"
DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
REQUIRED_FILES = (DETECTOR_FILE, RECOGNIZER_FILE)
"""The antelopev2 files InstantID uses (the pack's 1k3d68, 2d106det and genderage models are not loaded)."""
DETECTION_SIZES = tuple(range(640, 191, -64))
"""640, 576, ..., 192: detection retries at smaller sizes when no face is found (large faces)."""
EMBEDDING_DIM = 512

PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCM": "ROCMExecutionProvider",
    "COREML": "CoreMLExecutionProvider",
    "DIRECTML": "DmlExecutionProvider",
    "OPENVINO": "OpenVINOExecutionProvider",
    "TENSORRT": "TensorrtExecutionProvider",
}
"""User-facing provider names (the ComfyUI pack's "CPU", "CUDA", "ROCM", "CoreML"; any case) to onnxruntime's."""

_NVIDIA = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": f"onnxruntime-gpu (NVIDIA, Linux and Windows): {_NVIDIA}",
    "TensorrtExecutionProvider": f"onnxruntime-gpu and NVIDIA TensorRT: {_NVIDIA}",
    "ROCMExecutionProvider": "an onnxruntime built for ROCm (AMD publishes onnxruntime-rocm wheels for Linux): "
    "pip uninstall -y onnxruntime, then install AMD's wheel for your ROCm version",
    "CoreMLExecutionProvider": "the standard onnxruntime package on macOS, where CoreML exists: pip install onnxruntime",
    "DmlExecutionProvider": "onnxruntime-directml (Windows): "
    "pip uninstall -y onnxruntime && pip install onnxruntime-directml",
    "OpenVINOExecutionProvider": "onnxruntime-openvino: pip uninstall -y onnxruntime && pip install onnxruntime-openvino",
}
"""For each onnxruntime provider, the package that has it and how to switch to it."""
ONNXRUNTIME_PACKAGES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-rocm",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-silicon",
)
"""The distributions that install the ``onnxruntime`` module (each one's files overwrite the others')."""

CombineMode = Literal["average", "norm average", "concat"]
COMBINE_MODES: tuple[CombineMode, ...] = ("average", "norm average", "concat")


class FaceModelsMissingError(FileNotFoundError):
    """The antelopev2 folder or one of its required files is missing."""


class NoFaceDetectedError(ValueError):
    """No face was found in an image at any detection size. The message starts with "No face detected"."""


@dataclass(frozen=True)
class FaceResult:
    """The largest face of one image: everything comes from the same detection.

    ``embedding``: ``[512]`` float32, the recognizer's raw (not normalised) output, what InstantID's
    Resampler was trained on. ``kps``: ``[5, 2]`` float32 (x, y) pixels: left eye, right eye, nose,
    mouth corners. ``bbox``: ``[4]`` float32 x1, y1, x2, y2 pixels. ``det_size``: the detection size
    (pixels, square) the face was found at. Arrays are copies, not views of insightface's.
    """

    embedding: np.ndarray
    kps: np.ndarray
    bbox: np.ndarray
    det_score: float
    det_size: int


def onnx_provider(provider: str) -> str:
    """The onnxruntime provider name for ``provider`` ("CPU", "CUDA", "ROCM", "CoreML", ... or a full
    ``...ExecutionProvider`` name). Raises ``ValueError`` for an unknown name."""
    if provider.endswith("ExecutionProvider"):
        return provider
    try:
        return PROVIDERS[provider.upper()]
    except KeyError:
        raise ValueError(
            f"unknown face analysis provider {provider!r}; expected one of {', '.join(PROVIDERS)} "
            "or an onnxruntime provider name ending in 'ExecutionProvider'"
        ) from None


def antelopev2_dir(root: str | Path) -> Path:
    """The antelopev2 folder for an insightface ``root``: ``root/models/antelopev2``, or ``root`` itself
    when it directly holds the required files."""
    root = Path(root).expanduser()
    if all((root / name).is_file() for name in REQUIRED_FILES):
        return root
    return root / "models" / ANTELOPEV2


def check_antelopev2(root: str | Path) -> Path:
    """Return the antelopev2 folder under ``root``; raise ``FaceModelsMissingError`` naming the folder and
    the missing files when it is incomplete (never downloads)."""
    folder = antelopev2_dir(root)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        nested = folder / ANTELOPEV2
        hint = (
            f" They are in {nested}: move them up one level (the zip extracts into a folder of its own)."
            if all((nested / name).is_file() for name in missing)
            else " Download the antelopev2 pack and extract its .onnx files there; nothing is downloaded"
            " automatically."
        )
        raise FaceModelsMissingError(
            f"insightface antelopev2 models missing in {folder}: expected {', '.join(REQUIRED_FILES)}, "
            f"missing {', '.join(missing)}.{hint}"
        )
    return folder


def installed_onnxruntime_packages() -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` module, as ``"name version"``.

    More than one means the last one installed owns the module's files (usually the CPU ``onnxruntime``
    that insightface depends on, installed after ``onnxruntime-gpu``).
    """
    return installed_distributions(ONNXRUNTIME_PACKAGES)


def installed_distributions(names: Sequence[str]) -> list[str]:
    """Those of the distributions ``names`` that are installed, as ``"name version"``, in ``names`` order."""
    from importlib import metadata

    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def session_providers(provider: str) -> list[str]:
    """The onnxruntime providers to create the face analysis sessions with for ``provider``.

    ``[provider, "CPUExecutionProvider"]`` (CPU for operators the provider lacks), or only the CPU when
    ``provider`` is the CPU. A provider this onnxruntime build lacks (e.g. "CUDA" with the CPU-only
    ``onnxruntime`` package) falls back to the CPU with one logged warning that names the missing
    provider, the installed onnxruntime package(s) and how to get the provider; it never fails, so saved
    ComfyUI workflows that carry "CUDA" run on any machine. Raises ``ValueError`` for an unknown name.
    """
    import onnxruntime

    name = onnx_provider(provider)
    if name == "CPUExecutionProvider":
        return [name]
    available = onnxruntime.get_available_providers()
    if name in available:
        return [name, "CPUExecutionProvider"]
    how = PROVIDER_PACKAGES.get(name, f"an onnxruntime package built with {name}")
    logger.warning(
        "face analysis provider %r (%s) is not in this onnxruntime (installed: %s; providers: %s): running "
        "the face analysis on the CPU. To use %s, install %s",
        provider,
        name,
        ", ".join(installed_onnxruntime_packages()) or "unknown",
        ", ".join(available),
        provider,
        how,
    )
    return ["CPUExecutionProvider"]


@contextmanager
def insightface_warnings_silenced() -> Iterator[None]:
    """Inside the block, ignore the FutureWarning / DeprecationWarning noise that insightface's own
    code raises (e.g. scikit-image's deprecated ``SimilarityTransform.estimate`` on every detection).

    Only these two categories and only while the block runs; like ``warnings.catch_warnings`` itself,
    this changes the process's warning filters for that time (ComfyUI runs nodes on one thread).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _face_analysis(folder: Path, providers: list[str]) -> Any:
    """insightface's ``FaceAnalysis`` (detection and recognition) on the models in ``folder``.

    Raises ``RuntimeError`` naming the folder when insightface cannot load or route its models.
    """
    from insightface.app import FaceAnalysis

    try:
        # An existing folder given as `name` is used as is (insightface 0.7 joins it to `root`, which an
        # absolute path overrides): insightface's downloader is never reached.
        with insightface_warnings_silenced():
            return FaceAnalysis(
                name=str(folder.resolve()),
                root=str(folder.parent.resolve()),
                allowed_modules=["detection", "recognition"],
                providers=providers,
            )
    except AssertionError as error:
        raise RuntimeError(
            f"no SCRFD face detector found among the .onnx files in {folder}: expected {DETECTOR_FILE} "
            "(a model with 9 outputs: scores, boxes and keypoints at strides 8, 16, 32)"
        ) from error
    except Exception as error:  # onnxruntime's errors derive from Exception only
        raise RuntimeError(
            f"could not load the insightface models in {folder}: {error}. A truncated download? "
            "`python -m instantid doctor` checks each file."
        ) from error


def load_face_analysis(root: str | Path, provider: str = "CPU", det_size: int = DETECTION_SIZES[0]) -> Any:
    """Load insightface's ``FaceAnalysis`` (detection and recognition only) from ``root``'s antelopev2
    folder on onnxruntime's ``provider`` (see ``session_providers``: CPU for operators it lacks, and the
    CPU with one warning when this onnxruntime lacks the provider), prepared at ``det_size`` x ``det_size``.

    Raises ``FaceModelsMissingError`` when files are missing, ``ValueError`` for an unknown provider
    name, ``RuntimeError`` when the folder's models are not a detector and a recognizer insightface can
    route.
    """
    folder = check_antelopev2(root)
    app = _face_analysis(folder, session_providers(provider))
    if not app.det_model.use_kps:
        raise RuntimeError(
            f"the face detector in {folder} gives no keypoints (a 6-output SCRFD); InstantID needs keypoints: "
            f"expected {DETECTOR_FILE} (9 outputs: scores, boxes and keypoints at strides 8, 16, 32)"
        )
    if "recognition" not in app.models:
        raise RuntimeError(
            f"no ArcFace recognizer found among the .onnx files in {folder}: expected {RECOGNIZER_FILE} "
            "(input 1x3x112x112, output 512)"
        )
    app.prepare(ctx_id=0, det_size=(det_size, det_size))
    return app


def image_label(index: int, count: int = 1, source: str | None = None) -> str:
    """How messages name one image of a batch.

    Without ``source``: ``"image 0"`` (0-based, as in a Python list). With the name of the input the
    batch came from (a ComfyUI node's ``image`` / ``image_kps``): ``"input `image`"`` for a batch of one,
    ``"input `image`, image 2 of 3"`` (1-based, as a user counts a batch) otherwise.
    """
    if source is None:
        return f"image {index}"
    if count == 1:
        return f"input `{source}`"
    return f"input `{source}`, image {index + 1} of {count}"


def check_image(image: np.ndarray, index: int = 0, *, label: str | None = None) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-array) unless ``image`` is a non-empty ``HxWx3``
    ``uint8`` RGB array. Messages name the image ``label`` (default ``"image <index>"``)."""
    name = label or image_label(index)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected an HxWx3 uint8 RGB numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{name}: expected an HxWx3 RGB image, got shape {tuple(image.shape)} "
            "(convert grayscale or RGBA images to RGB first)"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected dtype uint8 (0-255), got {image.dtype}; "
            "scale float images in [0, 1] by 255 and convert"
        )


def check_embedding(embedding: np.ndarray, index: int = 0) -> None:
    """Raise ``ValueError`` unless ``embedding`` is a finite, non-zero ``[512]`` vector."""
    if embedding.shape != (EMBEDDING_DIM,):
        raise ValueError(f"face embedding {index}: expected shape ({EMBEDDING_DIM},), got {embedding.shape}")
    if not np.all(np.isfinite(embedding)):
        raise ValueError(
            f"face embedding {index} contains NaN or infinite values: the recognizer model is broken"
        )
    if not np.any(embedding):
        raise ValueError(f"face embedding {index} is all zero: the recognizer model is broken")


def _detector_size(det_model: Any) -> Any:
    sizes = getattr(det_model, "input_sizes", None)
    return list(sizes) if sizes else det_model.input_size


def _set_detector_size(det_model: Any, size: Any) -> None:
    prepare = getattr(det_model, "prepare", None)
    if callable(prepare):
        prepare(0, input_size=size)  # ctx_id 0: providers are left as they are
    else:
        det_model.input_size = size


@contextmanager
def _detection_size(app: Any, size: int) -> Iterator[None]:
    """Detect at ``size`` x ``size`` inside the block; restore the detector's sizes after it."""
    saved = _detector_size(app.det_model)
    _set_detector_size(app.det_model, (size, size))
    try:
        yield
    finally:
        _set_detector_size(app.det_model, saved)


def _area(face: Any) -> float:
    x1, y1, x2, y2 = (float(v) for v in face.bbox[:4])
    return (x2 - x1) * (y2 - y1)


def _sizes_tried(det_sizes: Sequence[int]) -> str:
    return f"detection sizes {det_sizes[0]} down to {det_sizes[-1]}"


def analyze_face(
    app: Any,
    image: np.ndarray,
    *,
    index: int = 0,
    det_sizes: Sequence[int] = DETECTION_SIZES,
    label: str | None = None,
) -> FaceResult:
    """Detect faces in one RGB ``image`` and return the largest (by box area), with its embedding and
    keypoints from that one detection. Tries ``det_sizes`` in order and stops at the first size that
    finds a face. Raises ``NoFaceDetectedError`` ("No face detected in <label> (WxH) at detection sizes
    640 down to 192") when none does, ``ValueError`` on a bad image or a NaN / all-zero embedding.
    ``index`` and ``label`` (default ``"image <index>"``, see ``image_label``) only name the image in
    messages. insightface's deprecation warnings are silenced for the call.
    """
    name = label or image_label(index)
    check_image(image, index, label=name)
    bgr = np.ascontiguousarray(image[..., ::-1])
    for size in det_sizes:
        with _detection_size(app, size), insightface_warnings_silenced():
            faces = app.get(bgr)
        if faces:
            break
    else:
        raise NoFaceDetectedError(
            f"No face detected in {name} ({image.shape[1]}x{image.shape[0]}) at {_sizes_tried(det_sizes)}"
        )
    if size != det_sizes[0]:
        logger.info("face in %s found at detection size %d (not at %d)", name, size, det_sizes[0])
    face = max(faces, key=_area)
    if face.embedding is None:
        raise ValueError(f"{name}: the face analysis returned no embedding (is a recognition model loaded?)")
    embedding = np.array(face.embedding, dtype=np.float32).reshape(-1)
    check_embedding(embedding, index)
    return FaceResult(
        embedding=embedding,
        kps=np.array(face.kps, dtype=np.float32).reshape(5, 2),
        bbox=np.array(face.bbox[:4], dtype=np.float32),
        det_score=float(face.det_score),
        det_size=size,
    )


def as_image_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """One ``HxWx3`` array, a batch ``NxHxWx3`` array or a sequence of ``HxWx3`` arrays, as a list."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        return [images]
    return list(images)


def analyze_faces(
    app: Any,
    images: np.ndarray | Sequence[np.ndarray],
    *,
    skip_missing: bool = False,
    source: str | None = None,
    analyze: Callable[..., FaceResult] | None = None,
) -> list[FaceResult]:
    """``analyze_face`` on every image (see ``as_image_list`` for the accepted forms).

    With ``skip_missing`` images without a face are left out (one warning each) and
    ``NoFaceDetectedError`` is raised only when no image has one, as the ComfyUI pack does; otherwise
    any image without a face raises. ``source``, the name of the input the images came from, goes into
    the messages (see ``image_label``): "No face detected in input `image`, image 2 of 3 (WxH) at
    detection sizes 640 down to 192"; when a whole batch of several has no face, "No face detected in
    any of the 3 images of input `image` (detection sizes 640 down to 192)". Raises ``ValueError`` on an
    empty batch. ``analyze`` replaces ``analyze_face`` (same signature; e.g. a cache's).
    """
    analyze = analyze or analyze_face
    batch = as_image_list(images)
    if not batch:
        raise ValueError(
            f"no images given{f' in input `{source}`' if source else ''}: expected at least one HxWx3 uint8 "
            "RGB image"
        )
    results: list[FaceResult] = []
    missing: list[NoFaceDetectedError] = []
    for index, image in enumerate(batch):
        try:
            results.append(analyze(app, image, index=index, label=image_label(index, len(batch), source)))
        except NoFaceDetectedError as error:
            if not skip_missing:
                raise
            missing.append(error)
    if not results:
        if len(missing) == 1:
            raise missing[0]
        of = f" of input `{source}`" if source else ""
        raise NoFaceDetectedError(
            f"No face detected in any of the {len(batch)} images{of} ({_sizes_tried(DETECTION_SIZES)})"
        )
    for skipped in missing:
        logger.warning("%s; image skipped", skipped)
    return results


def face_embeddings(results: Sequence[FaceResult], combine: CombineMode = "average") -> torch.Tensor:
    """Stack the embeddings of ``results`` into a float32 tensor and combine them across images.

    ``"average"``: their mean, ``[1, 512]``. ``"norm average"``: as the ComfyUI InstantID pack defines it,
    the mean after dividing each of the 512 features by its L2 norm *across the images*, ``[1, 512]``.
    ``"concat"``: all of them, ``[N, 512]``. One embedding is returned as ``[1, 512]`` unchanged by
    every mode (the pack combines only batches of two or more). Raises ``ValueError`` on an empty list,
    an unknown mode or a NaN / all-zero embedding; the tensor is new (no memory shared with ``results``).
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {', '.join(map(repr, COMBINE_MODES))}, got {combine!r}")
    if not results:
        raise ValueError("no face results to combine: expected at least one")
    for index, result in enumerate(results):
        check_embedding(np.asarray(result.embedding), index)
    embeds = torch.from_numpy(np.stack([np.asarray(r.embedding, dtype=np.float32) for r in results]))
    if embeds.shape[0] == 1 or combine == "concat":
        return embeds
    if combine == "norm average":
        embeds = embeds / torch.linalg.vector_norm(embeds, dim=0, keepdim=True).clamp_min(
            torch.finfo(embeds.dtype).tiny
        )
    return embeds.mean(dim=0, keepdim=True)
