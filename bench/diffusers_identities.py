"""Memory of N InstantID identities on one SDXL-shaped UNet: copy-on-write clones vs deep copies.

``python -m bench diffusers_identities [--model sdxl|sd15] [--counts 1,2,4,8] [--max-deep 2] [--quick]
[--device cpu|cuda]``

Each identity is a UNet with its own InstantID processors on every cross-attention layer (70
for SDXL). Clones: ``apply_instantid(unet, adapter, face_i)``. Deep copies: ``copy.deepcopy(unet)``
with the same identity's processors set in place, which is what an in-place pipeline needs per
concurrent identity. For each N: resident memory added while the N identities are alive, and
new tensor bytes (tensors neither in the base UNet nor in another identity). Deep copies are
measured up to ``--max-deep`` and while the machine has room for one more; beyond that the
figure is extrapolated (N x the measured per-copy cost) and marked so. Target: N clones add no
more than N x (their patch payload + 1 MiB), the payload being the identity's keys and values.

Then, on a tiny random SDXL ControlNet pipeline (``instantid.testing.tiny_pipelines``): the time
per identity switch (a view for a new face, for a face seen before, against ``copy.deepcopy`` of
the UNet), and the throughput of 1, 2, 4 views generating in threads against one pipeline
generating the same images one after another. With ``--device cuda`` (a GPU machine): peak
VRAM (``torch.cuda.max_memory_allocated``) of N = 1, 2, 4, 8 identity clones of the fp16 UNet
on the GPU against N deep copies, and the tiny pipeline's figures on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import tempfile
import threading
import time
from pathlib import Path
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


def _tiny_pipeline(device: str) -> tuple[Any, Any, Any]:
    from instantid.keypoints import draw_kps
    from instantid.testing.tiny_pipelines import (
        IMAGE_SIZE,
        tiny_instantid_weights,
        tiny_sdxl_controlnet_pipeline,
    )

    pipe = tiny_sdxl_controlnet_pipeline(Path(tempfile.mkdtemp(prefix="tiny_sdxl_")))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    adapter = tiny_instantid_weights(pipe.unet, seed=3)
    kps = [[5, 6], [11, 6], [8, 9], [5, 12], [11, 12]]
    import numpy as np

    control = draw_kps((IMAGE_SIZE, IMAGE_SIZE), np.array(kps, dtype=np.float32))
    return pipe, adapter, control


def pipeline_figures(device: str, images: int) -> dict[str, Any]:
    """Identity switch time and threaded throughput on the tiny SDXL ControlNet pipeline (module doc)."""
    from instantid.diffusers import apply_instantid
    from instantid.testing.tiny_pipelines import IMAGE_SIZE

    pipe, adapter, control = _tiny_pipeline(device)
    faces = [torch.randn(1, 512, generator=torch.Generator().manual_seed(100 + i)) * 20 for i in range(8)]

    def timed(fn: Any, repeat: int = 5) -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat

    apply_instantid(pipe, adapter, faces[0])  # warm-up
    fresh = iter(range(1, 8))
    switch = {
        "new face": timed(lambda: apply_instantid(pipe, adapter, faces[next(fresh)]), repeat=5),
        "cached face": timed(lambda: apply_instantid(pipe, adapter, faces[0])),
        "baseline: copy.deepcopy(unet)": timed(lambda: copy.deepcopy(pipe.unet)),
    }
    print(f"\nidentity switch on the tiny SDXL ControlNet pipeline ({device}):")
    for name, seconds in switch.items():
        print(f"  {name:<32}{seconds * 1e3:>9.2f} ms")

    def generate(view: Any) -> None:
        view("a photo of a person", image=control, num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
             output_type="np", generator=torch.Generator(device).manual_seed(0))  # fmt: skip

    views = [apply_instantid(pipe, adapter, faces[i]) for i in range(4)]
    generate(views[0])  # warm-up
    total = 4 * images

    def sequential() -> float:
        start = time.perf_counter()
        for _ in range(total):
            generate(views[0])
        return total / (time.perf_counter() - start)

    print(f"throughput, {total} images ({torch.get_num_threads()} torch threads):")
    throughput: dict[str, float] = {"sequential, before": sequential()}
    for count in (1, 2, 4):
        per_view = total // count

        def work(view: Any, n: int = per_view) -> None:
            for _ in range(n):
                generate(view)

        threads = [threading.Thread(target=work, args=(views[i],)) for i in range(count)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        throughput[f"{count} views in threads"] = count * per_view / (time.perf_counter() - start)
    throughput["sequential, after"] = sequential()  # twice: a shared machine's load moves between runs
    for name, value in throughput.items():
        label = f"baseline: one pipeline, {name}" if name.startswith("sequential") else name
        print(f"  {label:<44}{value:>8.2f} images/s")
    return {"switch_seconds": switch, "images_per_second": throughput}


def gpu_vram(model: str, counts: list[int]) -> list[dict[str, Any]]:
    """Peak VRAM of N identity clones of the fp16 UNet on the GPU vs N deep copies (one forward each)."""
    from instantid.diffusers import apply_instantid

    unet = build_unet(model, torch.float16, init="zeros").to("cuda")
    adapter = random_layout_adapter(model)
    sample = torch.zeros(2, 4, 128, 128, device="cuda", dtype=torch.float16)
    text = torch.zeros(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.float16)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.zeros(2, 1280, device="cuda", dtype=torch.float16),
                 "time_ids": torch.zeros(2, 6, device="cuda", dtype=torch.float16)}  # fmt: skip
    rows = []
    print(f"\npeak VRAM, {model} UNet fp16 on {torch.cuda.get_device_name()}:")
    for count in counts:
        for kind in ("COW clones", "deep copies"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base_bytes = torch.cuda.memory_allocated()
            try:
                models = [
                    apply_instantid(unet, adapter, torch.randn(1, 512) * 20)
                    if kind == "COW clones"
                    else copy.deepcopy(unet)
                    for _ in range(count)
                ]
                for m in models:
                    m(sample, torch.tensor(500.0, device="cuda"), text, added_cond_kwargs=added)
                peak, note = torch.cuda.max_memory_allocated() - base_bytes, "measured"
            except torch.cuda.OutOfMemoryError:
                peak, note = float("nan"), "out of memory"
            models = []
            rows.append({"n": count, "kind": kind, "peak_bytes": peak, "note": note})
            print(f"  N={count:<3}{kind:<14}{peak / MiB:>12,.0f} MiB above the base  {note}")
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench diffusers_identities", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", choices=sorted(UNET_CONFIGS), default="sdxl")
    parser.add_argument("--counts", default="1,2,4,8", help="identity counts, comma-separated")
    parser.add_argument("--max-deep", type=int, default=2, help="largest N measured with deep copies")
    parser.add_argument("--quick", action="store_true", help="SD1.5, N = 1, 2, one deep copy; fewer images")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.counts, args.max_deep = "sd15", "1,2", 1
    counts = [int(n) for n in args.counts.split(",")]
    if args.device == "cuda":
        vram_rows = gpu_vram(args.model, [1, 2, 4, 8])
    pipeline_rows = pipeline_figures(args.device, images=2 if args.quick else 4)

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
    extra: dict[str, Any] = {"pipeline": pipeline_rows, "device": args.device}
    if args.device == "cuda":
        extra["vram"] = vram_rows
    json_path, _ = write_result(
        "diffusers_identities",
        {"model": args.model, "unet_bytes": unet_bytes, "within": within, "rows": rows, **extra},
        table,
    )
    print(f"wrote {json_path} (plot: python -m bench report)")
    return 0 if within else 1
