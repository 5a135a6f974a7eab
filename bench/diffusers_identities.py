"""Memory of N InstantID identities on one SDXL-shaped UNet: copy-on-write clones vs deep copies.

``python -m bench diffusers_identities [--model sdxl|sd15] [--counts 1,2,4,8] [--max-deep 2]``

Each identity is a UNet with its own InstantID processors on every cross-attention layer (70
for SDXL). Clones: ``apply_instantid(unet, adapter, face_i)``. Deep copies: ``copy.deepcopy(unet)``
with the same identity's processors set in place, which is what an in-place pipeline needs per
concurrent identity. For each N: resident memory added while the N identities are alive, and
new tensor bytes (tensors neither in the base UNet nor in another identity). Deep copies are
measured up to ``--max-deep`` and while the machine has room for one more; beyond that the
figure is extrapolated (N x the measured per-copy cost) and marked so. Target: N clones add no
more than N x (their patch payload + 1 MiB), the payload being the identity's keys and values.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import time
from typing import Any

import torch

from bench.diffusers_forward import random_layout_adapter
from bench.measure import MiB, rss_bytes
from bench.results import markdown_table, write_result
from cow_model.tree import storage_bytes
from instantid.testing.shapes import UNET_CONFIGS, build_unet


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def payload_bytes(models: list[Any]) -> int:
    """Bytes of the identity keys/values held by the processors of ``models`` (distinct storages)."""
    from instantid.diffusers.identity import payload_bytes as processor_payload

    return processor_payload(p for model in models for p in model.attn_processors.values())


def new_tensor_bytes(base: torch.nn.Module, models: list[Any]) -> int:
    """Bytes of module tensor storage in ``models`` that ``base`` does not hold, plus their identity payloads."""
    known = storage_bytes(base)
    new: dict[Any, int] = {}
    for model in models:
        new.update({key: size for key, size in storage_bytes(model).items() if key not in known})
    return sum(new.values()) + payload_bytes(models)


def settled_rss() -> int:
    """RSS after a garbage collection and after glibc returns freed heap memory to the system (when it can)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def measure(make: Any, count: int, base: torch.nn.Module) -> dict[str, float]:
    """Build ``count`` identities with ``make(i)``; RSS added while alive, new tensor bytes, seconds per identity."""
    make(0)  # warm-up: first-use allocations (Resampler, caches) are not the identities' cost
    before = settled_rss()
    start = time.perf_counter()
    models = [make(i) for i in range(count)]
    seconds = (time.perf_counter() - start) / count
    after = settled_rss()
    row = {
        "rss": float(after - before),
        "tensors": float(new_tensor_bytes(base, models)),
        "payload": float(payload_bytes(models)),
        "seconds": seconds,
    }
    del models
    gc.collect()
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench diffusers_identities", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", choices=sorted(UNET_CONFIGS), default="sdxl")
    parser.add_argument("--counts", default="1,2,4,8", help="identity counts, comma-separated")
    parser.add_argument("--max-deep", type=int, default=2, help="largest N measured with deep copies")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.counts.split(",")]

    from instantid.diffusers import apply_instantid, prepare_identity
    from instantid.diffusers.processor import fixed_layout

    torch.set_grad_enabled(False)
    unet = build_unet(args.model, torch.float16, init="zeros")
    unet_bytes = sum(storage_bytes(unet).values())
    adapter = random_layout_adapter(args.model)
    faces = [torch.randn(1, 512, generator=torch.Generator().manual_seed(i)) * 20 for i in range(max(counts))]
    print(
        f"{args.model} UNet fp16: {unet_bytes / MiB:,.0f} MiB, {adapter.num_layers} cross-attention layers; "
        f"identity payload (K/V, cond + uncond): "
        f"{payload_bytes([apply_instantid(unet, adapter, faces[0])]) / MiB:.2f} MiB"
    )

    def clone(i: int) -> Any:
        return apply_instantid(unet, adapter, faces[i])

    def deep(i: int) -> Any:
        copied = copy.deepcopy(unet)
        identity = prepare_identity(copied, adapter, faces[i], layout=fixed_layout(True))
        copied.set_attn_processor({**copied.attn_processors, **identity.processors})
        return copied

    header = (
        f"{'N':>3}  {'identities':<12}{'RSS added':>14}{'new tensors':>14}{'N x (payload + 1 MiB)':>24}"
        f"{'per identity':>14}  note"
    )
    print(header)
    print("-" * len(header))
    within = True
    per_deep: dict[str, float] | None = None
    rows: list[dict[str, Any]] = []
    for count in counts:
        row = measure(clone, count, unet)
        rows.append({"n": count, "kind": "COW clones", **row, "extrapolated": False})
        budget = row["payload"] + count * MiB
        within &= row["rss"] <= budget and row["tensors"] <= budget
        print(
            f"{count:>3}  {'COW clones':<12}{row['rss'] / MiB:>10.1f} MiB{row['tensors'] / MiB:>10.1f} MiB"
            f"{budget / MiB:>20.1f} MiB{row['seconds'] * 1e3:>11.0f} ms  "
            f"{'within' if row['rss'] <= budget else 'OVER'} budget"
        )
        room = available_bytes() > count * unet_bytes * 1.1 + 2 * 1024 * MiB
        if count <= args.max_deep and room:
            deep_row, note = measure(deep, count, unet), "measured"
            per_deep = {key: value if key == "seconds" else value / count for key, value in deep_row.items()}
        elif per_deep is not None:
            deep_row = {key: value if key == "seconds" else value * count for key, value in per_deep.items()}
            note = "EXTRAPOLATED from the measured per-copy cost"
        else:
            continue
        rows.append({"n": count, "kind": "deep copies", **deep_row, "extrapolated": note != "measured"})
        print(
            f"{count:>3}  {'deep copies':<12}{deep_row['rss'] / MiB:>10.1f} MiB{deep_row['tensors'] / MiB:>10.1f} MiB"
            f"{'':>24}{deep_row['seconds'] * 1e3:>11.0f} ms  {note}"
        )
    print(
        f"target (N clones add <= N x (payload + 1 MiB), RSS and tensors): {'met' if within else 'NOT met'}"
    )
    table = markdown_table(
        ["N", "identities", "RSS added", "new tensors", "per identity", "note"],
        [[r["n"], r["kind"], f"{r['rss'] / MiB:,.1f} MiB", f"{r['tensors'] / MiB:,.1f} MiB",
          f"{r['seconds'] * 1e3:,.0f} ms", "extrapolated" if r["extrapolated"] else "measured"] for r in rows],
    )  # fmt: skip
    json_path, _ = write_result(
        "diffusers_identities",
        {"model": args.model, "unet_bytes": unet_bytes, "within": within, "rows": rows},
        table,
    )
    print(f"wrote {json_path} (plot: python -m bench report)")
    return 0 if within else 1
