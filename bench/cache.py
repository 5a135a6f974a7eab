"""Re-running InstantID nodes with ``instantid.cache`` on and off (tiny models; a first cut of issue 9's bench).

``python -m bench cache [--repeat N]``

On a tiny SDXL-layout ComfyUI model (70 cross-attention layers, narrow widths), an adapter with the
full-size Resampler (1280-d, depth 4) and K/V widths read from the model, and the small face-analysis
stand-ins of ``instantid.testing.face_models`` on a 320 px image, this times ``InstantIDAttentionPatch``:

- uncached: every call with the caches disabled (``INSTANTID_CACHE_MB=0``);
- cached re-run: the same inputs again (what a prompt edit costs the node);
- cached, weight only: a new ``weight`` each call (K/V reused, the terms rebuilt);
- a 20-run prompt-edit sequence through ``ApplyInstantID``: the hit rate of each layer.

Not yet here (issue 9): ComfyUI's executor, the scenarios (b)-(d), the stock-layout baseline, the
real-cost face models and full-size layer widths.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from instantid import cache as instantid_cache
from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.face import load_face_analysis
from instantid.resampler import Resampler
from instantid.testing import comfyui
from instantid.testing.adapter_files import RESAMPLER_SIZES
from instantid.testing.face_images import tagged_crop, to_comfy_image
from instantid.testing.face_models import build_antelopev2_like
from instantid.weights import InstantIDWeights


def adapter_for(patcher: Any, arch: str, seed: int = 0) -> InstantIDWeights:
    """Random adapter weights with the full-size Resampler and K/V widths of ``patcher``'s layers."""
    sites = cross_attention_sites(diffusion_model_of(patcher))
    context = sites[0].context_dim
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = Resampler(**RESAMPLER_SIZES["full"], output_dim=context).state_dict()
    image_proj = {k: torch.randn(m.shape, generator=generator) * 0.02 for k, m in shapes.items()}
    return InstantIDWeights(
        image_proj=image_proj,
        to_k_ip=tuple(torch.randn(s.hidden_size, context, generator=generator) * 0.02 for s in sites),
        to_v_ip=tuple(torch.randn(s.hidden_size, context, generator=generator) * 0.02 for s in sites),
        arch=arch,
        cross_attention_dim=context,
        hidden_sizes=tuple(s.hidden_size for s in sites),
    )


def _median_ms(run: Callable[[int], object], repeat: int) -> float:
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)

    comfy = comfyui.load_comfyui()
    import importlib

    nodes = importlib.import_module("instantid.comfy.nodes")
    model = comfyui.tiny_sdxl_patcher(comfy)
    adapter = adapter_for(model, "sdxl")
    app = load_face_analysis(build_antelopev2_like(Path(tempfile.mkdtemp())), provider="CPU")
    image = to_comfy_image(tagged_crop(40, 60))
    inputs = {
        "instantid": adapter,
        "insightface": app,
        "image": image,
        "model": model,
        "start_at": 0.0,
        "end_at": 1.0,
        "noise": 0.35,
    }
    patch = nodes.InstantIDAttentionPatch

    def call(weight: float) -> Any:
        return comfyui.run_node(patch, weight=weight, **inputs)

    instantid_cache.configure(max_mb=0)
    call(0.8)  # warm-up (onnxruntime sessions, allocator)
    uncached = _median_ms(lambda i: call(0.8), args.repeat)
    instantid_cache.configure()
    call(0.8)
    rerun = _median_ms(lambda i: call(0.8), args.repeat)
    weight_only = _median_ms(lambda i: call(0.5 + 0.01 * i), args.repeat)
    print("InstantIDAttentionPatch, tiny SDXL-layout model (70 layers), full-size Resampler, small face models")
    print(f"  uncached apply            {uncached:8.1f} ms")
    print(f"  cached re-run, same input {rerun:8.2f} ms  ({100 * rerun / uncached:.1f}% of uncached)")
    print(f"  cached, new weight only   {weight_only:8.2f} ms  ({100 * weight_only / uncached:.1f}% of uncached)")

    caches = instantid_cache.configure()
    control_net = comfyui.tiny_controlnet(comfy, "sdxl")
    apply_inputs = {k: v for k, v in inputs.items() if k != "noise"} | {"control_net": control_net}
    for edit in range(20):
        comfyui.run_node(
            nodes.ApplyInstantID,
            positive=comfyui.conditioning("sdxl", edit),
            negative=comfyui.conditioning("sdxl", 100),
            weight=0.8,
            **apply_inputs,
        )
    stats = caches.stats()
    print("ApplyInstantID, 20 prompt edits: " + caches.summary())
    print(f"  overall hit rate {100 * stats['hit_rate']:.1f}%")
    return 0
