"""Clone a UNet and patch every cross-attention block: ``copy.deepcopy`` vs ``LazyClonedModel``.

``python -m bench clone [--model sd15|sdxl] [--repeats N]``; ``--scaling`` runs ``bench.clone_cost``
(construction time and Python bytes per clone against model size, next to ``copy.deepcopy``, and
70 SDXL patches against a bare path copy).

Both sides build the same result: a second UNet whose ``attn2`` modules have a new attention
processor (16 blocks for SD1.5, 70 for SDXL) while the base keeps its own. Measured in one run:
median wall time, resident memory added while the clone is alive, and new tensor bytes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.measure import MiB, measure
from cow_model import LazyClonedModel
from cow_model.tree import storage_bytes
from instantid.testing.shapes import UNET_CONFIGS, build_unet


def attn2_paths(unet: torch.nn.Module) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith("attn2")]


def deepcopy_and_patch(unet: torch.nn.Module, paths: list[str], processor: Callable[[], Any]) -> torch.nn.Module:
    copied = copy.deepcopy(unet)
    for path in paths:
        copied.get_submodule(path).set_processor(processor())  # type: ignore[operator]
    return copied


def cow_clone_and_patch(unet: torch.nn.Module, paths: list[str], processor: Callable[[], Any]) -> LazyClonedModel:
    clone = LazyClonedModel(unet)
    for path in paths:
        clone.patch_block(path, lambda attn: attn.set_processor(processor()))  # type: ignore[operator]
    return clone


def new_tensor_bytes(base: torch.nn.Module, result: Any) -> int:
    mine = storage_bytes(result)
    theirs = storage_bytes(base)
    return sum(size for key, size in mine.items() if key not in theirs)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench clone", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(UNET_CONFIGS), default="sd15")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of deepcopy (cow: 10x this)")
    parser.add_argument("--scaling", action="store_true", help="cost against model size (bench.clone_cost)")
    args = parser.parse_args(argv)
    if args.scaling:
        from bench import clone_cost

        return clone_cost.main(["--repeats", str(args.repeats)])

    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    unet = build_unet(args.model, torch.float16)
    paths = attn2_paths(unet)
    params = sum(p.numel() for p in unet.parameters())
    print(
        f"{args.model} UNet: {params / 1e9:.2f} B parameters, fp16, "
        f"{sum(storage_bytes(unet).values()) / MiB:,.0f} MiB, {len(paths)} attn2 blocks "
        f"(built in {time.perf_counter() - start:.1f} s)"
    )
    new_bytes = functools.partial(new_tensor_bytes, unet)
    deep = measure(lambda: deepcopy_and_patch(unet, paths, AttnProcessor2_0), new_bytes, args.repeats)
    cow = measure(lambda: cow_clone_and_patch(unet, paths, AttnProcessor2_0), new_bytes, args.repeats * 10)

    header = f"{'clone + patch ' + str(len(paths)) + ' attn2':<32}{'median time':>14}{'RSS delta':>14}{'new tensors':>14}"
    print(header)
    print("-" * len(header))
    for name, row in (("copy.deepcopy", deep), ("LazyClonedModel", cow)):
        print(
            f"{name:<32}{row['seconds'] * 1e3:>11.2f} ms{row['rss'] / MiB:>10.1f} MiB"
            f"{row['tensors'] / MiB:>10.3f} MiB"
        )
    rss_ratio = f"{deep['rss'] / cow['rss']:>13.0f}x" if cow["rss"] >= MiB else f"{'(cow < 1 MiB)':>14}"
    print(f"{'ratio deepcopy / cow':<32}{deep['seconds'] / cow['seconds']:>13.0f}x{rss_ratio}")
    return 0
