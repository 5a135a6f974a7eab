"""Forward time of an InstantID UNet: copy-on-write clone vs the same processors installed in place.

``python -m bench diffusers_forward [--model sd15|sdxl|tiny] [--latent 16] [--repeats 15] [--dtype fp32|fp16]
[--device cpu|cuda] [--threads N]``

One base UNet (random weights), one identity. The clone comes from ``apply_instantid(unet, ...)``;
the in-place side is the base UNet inside ``instantid_hooks(unet, ...)`` (same adapter, same face,
so the same keys and values). Both run the same classifier-free-guidance batch of 2; the runs
alternate (clone then in place, in place then clone, ...) so that drift in the machine's speed and
the order within a pair hit both alike, and the headline figure is the median of the back-to-back
pairs' ratios, in wall time and in process CPU time (less sensitive to other processes on a shared
machine; ``--threads 1`` steadies it further). The plain base UNet (no identity) is timed first, as
context. Target: the clone within 1% of in place. Since a CPU's run-to-run noise on a large UNet can
exceed 1%, the bench also checks what the difference is made of: the torch operators both sides
run (the same, in the same order) and the cost of the one extra proxy call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from instantid.layout import ARCHS, cross_attention_layers
from instantid.testing.shapes import UNET_CONFIGS, build_unet
from instantid.weights import InstantIDWeights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_layout_adapter(arch: str, seed: int = 0) -> InstantIDWeights:
    """A random fp16 adapter in ``arch``'s published layout with the small Resampler of ``instantid.testing.adapter_files``
    (full-size ``to_k_ip``/``to_v_ip``: ~840 MB for SDXL)."""
    from instantid.resampler import Resampler
    from instantid.testing.adapter_files import RESAMPLER_SIZES

    generator = torch.Generator().manual_seed(seed)
    dim = ARCHS[arch]["cross_attention_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resampler = Resampler(**RESAMPLER_SIZES["small"], output_dim=dim)
    layers = cross_attention_layers(arch)

    def draw(hidden: int) -> torch.Tensor:
        return torch.empty(hidden, dim, dtype=torch.float16).normal_(0.0, 0.02, generator=generator)

    return InstantIDWeights(
        image_proj={k: v.detach() for k, v in resampler.state_dict().items()},
        to_k_ip=tuple(draw(layer.hidden_size) for layer in layers),
        to_v_ip=tuple(draw(layer.hidden_size) for layer in layers),
        arch=arch,
        cross_attention_dim=dim,
        hidden_sizes=tuple(layer.hidden_size for layer in layers),
    )


def unet_inputs(
    unet: Any, latent: int, device: str, dtype: torch.dtype
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A CFG batch of 2 for ``unet`` at ``latent`` x ``latent``, with SDXL's added conditioning when it has one."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    args = (
        rand(2, config.in_channels, latent, latent),
        torch.tensor(500.0, device=device),
        rand(2, 77, config.cross_attention_dim),
    )
    kwargs: dict[str, Any] = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": rand(2, pooled), "time_ids": rand(2, 6)}
    return args, kwargs


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call; CPU time is less sensitive to other processes' load."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def operator_trace(fn: Callable[[], Any]) -> list[str]:
    """The names of the torch operators one call of ``fn`` runs, in order (torch.profiler, CPU side)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as trace:
        fn()
    return [event.name for event in trace.events()]


def proxy_call_seconds(calls: int = 20000) -> float:
    """Extra seconds per call that calling through a ``LazyClonedModel`` adds to calling its module directly."""
    from cow_model import LazyClonedModel

    module = torch.nn.Identity()
    clone = LazyClonedModel(module)
    x = torch.zeros(1)

    def per_call(model: Any) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            model(x)
        return (time.perf_counter() - start) / calls

    return min(per_call(clone) for _ in range(3)) - min(per_call(module) for _ in range(3))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench diffusers_forward", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model",
        choices=[*sorted(UNET_CONFIGS), "tiny"],
        default="sd15",
        help="tiny: instantid.testing.tiny_pipelines' SDXL-architecture UNet, where per-forward Python overhead dominates",
    )
    parser.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8); default 16")
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per side (after 2 warm-ups)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    from instantid.diffusers import apply_instantid, instantid_hooks

    torch.set_grad_enabled(False)
    torch.set_flush_denormal(True)  # random weights give denormal activations, which slow CPUs down
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.model == "tiny":
        from instantid.testing.tiny_pipelines import tiny_instantid_weights, tiny_sdxl_unet

        unet = tiny_sdxl_unet(dtype=dtype).to(args.device)
        adapter = tiny_instantid_weights(unet)
    else:
        unet = build_unet(args.model, dtype, init="random").to(args.device)
        adapter = random_layout_adapter(args.model)
    face = torch.randn(1, 512, generator=torch.Generator().manual_seed(1)) * 20
    inputs, kwargs = unet_inputs(unet, args.latent, args.device, dtype)
    clone = apply_instantid(unet, adapter, face, weight=0.8)

    def forward(model: Any) -> Callable[[], Any]:
        return lambda: model(*inputs, **kwargs).sample

    plain, cow, in_place = (
        "plain base UNet (no identity)",
        "clone (apply_instantid)",
        "in place (instantid_hooks)",
    )
    times: dict[str, list[tuple[float, float]]] = {plain: [], cow: [], in_place: []}
    for _ in range(2):
        timed(forward(unet), args.device)
        timed(forward(clone), args.device)
    for _ in range(args.repeats):
        times[plain].append(timed(forward(unet), args.device))
    with instantid_hooks(unet, adapter, face, weight=0.8):
        for _ in range(2):
            timed(forward(unet), args.device)
        cow_out, in_place_out = forward(clone)(), forward(unet)()
        same_ops = operator_trace(forward(clone)) == operator_trace(forward(unet))
        for index in range(args.repeats):  # pairs alternate which side runs first
            for name, model in ((cow, clone), (in_place, unet))[:: 1 if index % 2 == 0 else -1]:
                times[name].append(timed(forward(model), args.device))

    print(
        f"{args.model} UNet, {args.dtype}, {args.device}, {torch.get_num_threads()} CPU threads, batch 2 (CFG) at "
        f"{args.latent}x{args.latent} latent, {len(adapter.to_k_ip)} identity layers; medians of {args.repeats}"
    )
    header = f"{'forward':<32}{'wall median':>14}{'wall min':>12}{'CPU median':>14}{'CPU vs in place':>18}"
    print(header)
    print("-" * len(header))
    reference = statistics.median(cpu for _, cpu in times[in_place])
    for name, values in times.items():
        walls, cpus = [w for w, _ in values], [c for _, c in values]
        print(
            f"{name:<32}{statistics.median(walls) * 1e3:>11.1f} ms{min(walls) * 1e3:>9.1f} ms"
            f"{statistics.median(cpus) * 1e3:>11.1f} ms{(statistics.median(cpus) / reference - 1) * 100:>+17.2f}%"
        )
    same = torch.equal(cow_out, in_place_out)
    pairs = list(zip(times[cow], times[in_place], strict=True))
    wall_ratio = statistics.median(a[0] / b[0] for a, b in pairs) - 1
    cpu_ratio = statistics.median(a[1] / b[1] for a, b in pairs) - 1
    print(
        f"outputs equal: {same}; clone vs in place, median of {len(pairs)} back-to-back pairs' ratios: "
        f"wall {wall_ratio * 100:+.2f}%, CPU {cpu_ratio * 100:+.2f}% (target: within 1%)"
    )
    overhead = proxy_call_seconds()
    print(
        f"same torch operators in the same order: {same_ops}; the clone's only extra work is the proxy call: "
        f"{overhead * 1e9:+.0f} ns per forward, {overhead / reference * 100:+.6f}% of the in-place forward (timing noise included)"
    )
    return 0 if same and same_ops else 1
