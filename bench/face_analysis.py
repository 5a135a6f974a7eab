"""Face analysis per reference image: one detection for embedding and keypoints vs the stock two passes.

``python -m bench face_analysis [--root INSIGHTFACE_ROOT] [--repeat N]``

The stock ComfyUI_InstantID pack runs its face loop twice per reference image, once for the embedding
(ApplyInstantID) and once for the keypoint image (the keypoints input), each pass detecting and
recognising again. ``instantid.face.analyze_face`` detects once and returns both. Both columns run here
through the same insightface ``FaceAnalysis`` on the same image: a face found at 640, and a large face
found only at 320 after retries. Without ``--root`` the small models of ``instantid.testing.face_models`` (a face
tag on insightface's t1.jpg) are used; with ``--root`` the real antelopev2 on t1.jpg as it is (the
"large face" row is then left out: it needs a tag).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from instantid.face import analyze_face, load_face_analysis
from instantid.keypoints import draw_kps
from instantid.testing.face_images import load_photo


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    run()  # warm-up: sessions for each detection size are built lazily
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _one_detection(app: Any, image: np.ndarray) -> tuple[np.ndarray, Any]:
    face = analyze_face(app, image)
    return face.embedding, draw_kps(image, face.kps)


def _two_passes(app: Any, image: np.ndarray) -> tuple[np.ndarray, Any]:
    embedding = analyze_face(app, image).embedding
    return embedding, draw_kps(image, analyze_face(app, image).kps)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench face_analysis", description=__doc__)
    parser.add_argument(
        "--root", type=Path, help="an insightface root holding models/antelopev2 (real models)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    photo = load_photo()
    with tempfile.TemporaryDirectory() as tmp:
        if args.root is None:
            from instantid.testing.face_models import build_antelopev2_like, paste_face_tag

            app = load_face_analysis(build_antelopev2_like(Path(tmp)))
            cases = {
                "face at 640": paste_face_tag(photo, (640, 384), 80),
                "large face (found at 320)": paste_face_tag(photo, (640, 384), 240),
            }
            models = "small test models (instantid.testing.face_models)"
        else:
            app = load_face_analysis(args.root)
            cases = {"t1.jpg": photo}
            models = f"antelopev2 from {args.root}"
        print(f"face analysis per reference image, {models}, CPU, median of {args.repeat}")
        print(
            f"{'image':28} {'found at':>8} {'stock: 2 passes ms':>19} {'one detection ms':>17} {'speed-up':>9}"
        )
        for name, image in cases.items():
            size = analyze_face(app, image).det_size
            baseline = _median_ms(partial(_two_passes, app, image), args.repeat)
            ours = _median_ms(partial(_one_detection, app, image), args.repeat)
            print(f"{name:28} {size:>8} {baseline:>19.1f} {ours:>17.1f} {baseline / ours:>8.2f}x")
    return 0
