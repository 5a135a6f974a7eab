"""What a clone costs in Python: construction against model size, and patching against a bare path copy.

``python -m bench clone_cost [--repeats N]`` (also ``python -m bench clone --scaling``)

1. Construction: ``LazyClonedModel(model)`` for models of 100 ... 30,000 modules (a tree of
   small blocks, tensors on the meta device so only the Python structure counts), median time
   and Python bytes allocated per clone (``tracemalloc``), next to ``copy.deepcopy`` of the
   same model. The contract: flat in the model's size.
2. Patching: an SDXL-architecture UNet (structure only, meta tensors): a clone plus 70 ``attn2``
   patches running diffusers' ``set_processor``, against the floor: a minimal path copy of the
   same 70 modules and their ancestors (per module a new object, its ``__dict__`` and its three
   module dicts copied, nothing else; none of ``cow_model``) running the same function. The
   limit is 4x the floor.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.results import markdown_table, write_result
from cow_model import LazyClonedModel
from instantid.testing.shapes import UNET_CONFIGS

SIZES = (100, 1_000, 10_000, 30_000)


FAN_OUT = 8


def model_of(modules: int) -> nn.Module:
    """A tree of about ``modules`` modules on the meta device: blocks of (Linear, LayerNorm) grouped
    eight to a ``Sequential``, level by level, as real models nest (a UNet's root has a dozen children)."""
    with torch.device("meta"):
        level: list[nn.Module] = [
            nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(max(1, modules // 3))
        ]
        while len(level) > 1:
            level = [nn.Sequential(*level[i : i + FAN_OUT]) for i in range(0, len(level), FAN_OUT)]
        return level[0].eval()


def median_seconds(make: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = make()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times)


def python_bytes(make: Callable[[], Any]) -> int:
    """Bytes of Python memory the result of ``make()`` holds (``tracemalloc``)."""
    gc.collect()
    tracemalloc.start()
    result = make()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del result
    return held


LIMIT = 4.0
"""Most a clone plus its patches may cost, as a multiple of the minimal path copy."""


def minimal_shell(module: nn.Module) -> nn.Module:
    """A new object of ``module``'s class with its ``__dict__`` and its child, parameter and buffer dicts copied."""
    shell: nn.Module = object.__new__(type(module))
    state = module.__dict__.copy()
    for kind in ("_modules", "_parameters", "_buffers"):
        state[kind] = state[kind].copy()
    object.__setattr__(shell, "__dict__", state)
    return shell


def bare_path_copy(unet: nn.Module, paths: list[str], patch: Callable[[nn.Module], None]) -> nn.Module:
    """The floor: a minimal shell of the root and of each path's modules once, then ``patch``; nothing else."""
    root = minimal_shell(unet)
    copied: dict[str, nn.Module] = {}
    for path in paths:
        module, prefix = root, ""
        for name in path.split("."):
            prefix = f"{prefix}.{name}" if prefix else name
            child = copied.get(prefix)
            if child is None:
                child = copied[prefix] = minimal_shell(module._modules[name])  # type: ignore[arg-type]
                module._modules[name] = child
            module = child
        patch(module)
    return root


def cow_patch(unet: nn.Module, paths: list[str], patch: Callable[[nn.Module], None]) -> nn.Module:
    clone = LazyClonedModel(unet)
    for path in paths:
        clone.patch_block(path, patch)
    return clone


def scaling(repeats: int) -> list[dict[str, float]]:
    header = (
        f"{'modules':>8}{'clone median':>16}{'clone bytes':>14}{'deepcopy median':>18}{'deepcopy bytes':>17}"
    )
    print("1. construction of one clone against model size (meta tensors)")
    print(header)
    print("-" * len(header))
    rows = []
    for size in SIZES:
        model = model_of(size)
        count = sum(1 for _ in model.modules())
        cow = median_seconds(lambda m=model: LazyClonedModel(m), repeats * 10)
        cow_bytes = python_bytes(lambda m=model: LazyClonedModel(m))
        deep = median_seconds(lambda m=model: copy.deepcopy(m), max(1, repeats // 3))
        deep_bytes = python_bytes(lambda m=model: copy.deepcopy(m))
        print(f"{count:>8,}{cow * 1e3:>13.3f} ms{cow_bytes:>12,} B{deep * 1e3:>15.1f} ms{deep_bytes:>15,} B")
        rows.append(
            {"modules": count, "clone_seconds": cow, "clone_bytes": cow_bytes, "deepcopy_seconds": deep,
             "deepcopy_bytes": deep_bytes}
        )  # fmt: skip
    return rows


def patching(repeats: int) -> dict[str, float]:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sdxl"]).eval()
    paths = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    processor = AttnProcessor2_0()

    def patch(attn: nn.Module) -> None:
        attn.set_processor(processor)  # type: ignore[operator]

    rounds = []
    for _ in range(repeats * 10):  # alternate the two, so both see the same machine
        bare = median_seconds(lambda: bare_path_copy(unet, paths, patch), 1)
        cow = median_seconds(lambda: cow_patch(unet, paths, patch), 1)
        rounds.append((bare, cow))
    bare = statistics.median(b for b, _ in rounds)
    cow = statistics.median(c for _, c in rounds)
    ratio = statistics.median(c / b for b, c in rounds)
    print(
        f"\n2. SDXL-architecture UNet, {len(paths)} attn2 patches (set_processor), median of {len(rounds)} rounds"
    )
    print(f"{'minimal path copy (the floor)':<40}{bare * 1e3:>9.2f} ms")
    print(f"{'LazyClonedModel + patch_block':<40}{cow * 1e3:>9.2f} ms")
    print(f"{'ratio (median of paired rounds)':<40}{ratio:>9.2f}x   (limit {LIMIT:g}x)")
    return {
        "patches": len(paths),
        "rounds": len(rounds),
        "bare_seconds": bare,
        "clone_seconds": cow,
        "ratio": ratio,
        "limit": LIMIT,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench clone_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (clone construction: 10x this)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    construction = scaling(args.repeats)
    patch = patching(args.repeats)
    headers = ["modules", "clone", "clone bytes", "deepcopy", "deepcopy bytes"]
    rows = [
        [f"{r['modules']:,}", f"{r['clone_seconds'] * 1e3:.3f} ms", f"{r['clone_bytes']:,} B",
         f"{r['deepcopy_seconds'] * 1e3:.1f} ms", f"{r['deepcopy_bytes']:,} B"]
        for r in construction
    ]  # fmt: skip
    text = markdown_table(headers, rows) + (
        f"\n{patch['patches']} attn2 patches on an SDXL-architecture UNet: minimal path copy (the floor) "
        f"{patch['bare_seconds'] * 1e3:.2f} ms, LazyClonedModel + patch_block {patch['clone_seconds'] * 1e3:.2f} ms "
        f"(ratio {patch['ratio']:.2f}x, limit {LIMIT:g}x)\n"
    )
    json_path, _ = write_result("clone_cost", {"construction": construction, "patching": patch}, text)
    print(f"wrote {json_path} (plot: python -m bench report)")
    return 0
