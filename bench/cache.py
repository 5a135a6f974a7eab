"""The InstantID caches on and off, in issue 9's user scenarios, through ComfyUI's own executor.

``python -m bench cache [--face-models real|small] [--repeat N] [--edits N] [--clone-semantics deepcopy|list-dict|both]``

Each scenario is a sequence of API-format graphs run by ``execution.PromptExecutor`` of the installed
ComfyUI (in-process, its own output cache active, one executor per sequence as one server would keep):
source nodes the bench registers (the model, adapter, face analysis, ControlNet, reference images,
prompt conditionings and masks; tiny SDXL-layout ComfyUI models, 70 cross-attention layers, an adapter
with the full-size Resampler), this pack's ``ApplyInstantID`` / ``ApplyInstantIDAdvanced``, the stock
``EmptyLatentImage`` and ``KSampler`` (1 step, 64 px), and a sink node keeping the sampled latent.
Each sequence runs twice: caches disabled (``instantid.cache.configure(max_mb=0)``, as
``INSTANTID_CACHE_MB=0``) and caches on (defaults). Per scenario: the caches' hit rate (all layers'
lookups), the median time of an InstantID node execution after the first run, uncached vs cached (timed
around the node's function inside the executor), and whether every run's sampled latent is bit-equal
between the two.

(a) 20 prompt edits; (b) an ``ip_weight`` sweep of 10 values (``ApplyInstantIDAdvanced``); (c) 10 runs
alternating between two reference faces; (d) two faces with masks, 10 edits of the prompt; (e) two faces
with masks, the second face's weight edited 5 times (ComfyUI re-runs the second node on the first one's
cached output). Per scenario also: whether the last run's latent equals that of a fresh executor running
only the last graph (caches off), for both sequences: a pack whose re-runs change a cached model fails it.

Everything runs once per clone semantics (``--clone-semantics``, ``bench/_semantics.py``): ComfyUI until
2026-01 (``copy.deepcopy``) and since 2026-02 (``deepcopy_list_dict``, PR #12382).

``--face-models real`` (default) uses the real-cost antelopev2 stand-ins of
``instantid.testing.face_models.real_cost_root`` (SCRFD-10G and iResNet-100 compute, built once into
the user's cache folder); ``small`` the tiny ones. Also timed, outside the executor:
``InstantIDAttentionPatch`` uncached, re-run with the same inputs, and with a new weight only.

Not here: the stock-layout baseline in the executor (the original pack defers K/V to sampling; see
``bench workflow``; its accumulation on re-runs: ``bench comfy_clone``), full-size UNet widths, GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from bench._semantics import GENERATION, chosen, in_process
from bench._semantics import add_option as semantics_option
from bench.comfy_clone import stock_pack_model
from instantid import cache as instantid_cache
from instantid.attention import face_tokens
from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.comfy.faces import embeddings
from instantid.face import load_face_analysis
from instantid.resampler import Resampler
from instantid.testing import comfyui
from instantid.testing.adapter_files import RESAMPLER_SIZES
from instantid.testing.comfy_executor import object_node
from instantid.testing.face_images import tagged_crop, to_comfy_image
from instantid.testing.face_models import build_antelopev2_like, real_cost_root
from instantid.weights import InstantIDWeights

Graph = dict[str, dict[str, Any]]


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


# --- the executor harness -------------------------------------------------------------------------


class _Server:
    """What ``PromptExecutor`` needs of ``server.PromptServer``: a client id and the messages it sends."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.errors: list[Any] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        if event == "execution_error":
            self.errors.append(data)


class _Bench:
    """Source nodes for the objects the bench builds, a sink, and timing around the InstantID nodes."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects
        self.latents: list[torch.Tensor] = []
        self.instantid_seconds: list[float] = []

    def register(self, comfy_nodes: Any) -> None:
        bench = self
        pack = importlib.import_module("instantid.comfy.nodes")

        BenchObject = object_node(self.objects, "bench")

        class BenchSink:
            RETURN_TYPES = ()
            FUNCTION = "keep"
            OUTPUT_NODE = True
            CATEGORY = "bench"

            @classmethod
            def INPUT_TYPES(cls) -> dict[str, Any]:
                return {"required": {"samples": ("LATENT",)}}

            def keep(self, samples: dict[str, torch.Tensor]) -> tuple[()]:
                bench.latents.append(samples["samples"].clone())
                return ()

        def timed(node_cls: Any) -> type:
            method = getattr(node_cls, node_cls.FUNCTION)

            def run(self: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return method(self, **kwargs)
                finally:
                    bench.instantid_seconds.append(time.perf_counter() - start)

            return type(node_cls.__name__, (node_cls,), {node_cls.FUNCTION: run})

        mappings = comfy_nodes.NODE_CLASS_MAPPINGS
        mappings.update(pack.NODE_CLASS_MAPPINGS)
        for name in ("ApplyInstantID", "ApplyInstantIDAdvanced"):
            mappings[name] = timed(pack.NODE_CLASS_MAPPINGS[name])
        mappings["BenchObject"] = BenchObject
        mappings["BenchSink"] = BenchSink


def _graph(
    faces: list[dict[str, Any]], *, prompt: int, advanced: bool = False, ip_weight: float = 0.8
) -> Graph:
    """A graph applying ``faces`` (each: image, optional mask) in a chain, then KSampler and the sink."""
    graph: Graph = {}

    def obj(node_id: str, name: str) -> list[Any]:
        graph[node_id] = {"class_type": "BenchObject", "inputs": {"name": name}}
        return [node_id, 0]

    model, positive, negative = obj("1", "model"), obj("2", f"prompt_{prompt}"), obj("3", "negative")
    adapter, app, control = obj("4", "adapter"), obj("5", "face_analysis"), obj("6", "control_net")
    for i, face in enumerate(faces):
        node = str(10 + i)
        inputs: dict[str, Any] = {
            "instantid": adapter,
            "insightface": app,
            "control_net": control,
            "image": obj(f"{node}0", face["image"]),
            "model": model,
            "positive": positive,
            "negative": negative,
            "start_at": 0.0,
            "end_at": 1.0,
        }
        if face.get("mask"):
            inputs["mask"] = obj(f"{node}1", face["mask"])
        if advanced:
            inputs |= {"ip_weight": ip_weight, "cn_strength": 0.8, "noise": 0.0, "combine_embeds": "average"}
        else:
            inputs["weight"] = face.get("weight", 0.8)
        graph[node] = {
            "class_type": "ApplyInstantIDAdvanced" if advanced else "ApplyInstantID",
            "inputs": inputs,
        }
        model, positive, negative = [node, 0], [node, 1], [node, 2]
    graph["30"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    graph["31"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "seed": 0,
            "steps": 1,
            "cfg": 5.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": positive,
            "negative": negative,
            "latent_image": ["30", 0],
            "denoise": 1.0,
        },
    }
    graph["32"] = {"class_type": "BenchSink", "inputs": {"samples": ["31", 0]}}
    return graph


def _run_sequence(execution: Any, bench: _Bench, graphs: Iterable[Graph], cached: bool) -> dict[str, Any]:
    caches = instantid_cache.configure() if cached else instantid_cache.configure(max_mb=0)
    bench.latents.clear()
    bench.instantid_seconds.clear()
    server = _Server()
    executor = execution.PromptExecutor(server)
    runs = 0
    for n, graph in enumerate(graphs):
        executor.execute(graph, f"bench-{n}", {}, ["32"])
        if server.errors or not executor.success:
            raise RuntimeError(f"graph {n} failed in ComfyUI's executor: {server.errors[-1:]}")
        runs += 1
    stats = caches.stats()
    return {
        "runs": runs,
        "latents": list(bench.latents),
        "node_ms": [1000 * s for s in bench.instantid_seconds],
        "hit_rate": stats["hit_rate"],
        "layers": {name: (s["hits"], s["hits"] + s["misses"]) for name, s in stats["layers"].items()},
    }


def _scenarios(edits: int) -> dict[str, list[Graph]]:
    one = [{"image": "face_a"}]
    two = [{"image": "face_a", "mask": "mask_left"}, {"image": "face_b", "mask": "mask_right"}]
    sweep = [0.3 + 0.1 * i for i in range(10)]
    return {
        f"(a) {edits} prompt edits": [_graph(one, prompt=i) for i in range(edits)],
        "(b) ip_weight sweep, 10 values": [_graph(one, prompt=0, advanced=True, ip_weight=w) for w in sweep],
        "(c) two reference faces, alternating x10": [
            _graph([{"image": "face_a" if i % 2 == 0 else "face_b"}], prompt=0) for i in range(10)
        ],
        "(d) two faces + masks, 10 prompt edits": [_graph(two, prompt=i) for i in range(10)],
        "(e) two faces + masks, second face's weight edited x5": [
            _graph([two[0], {**two[1], "weight": w}], prompt=0) for w in (0.8, 1.1, 1.4, 1.7, 2.0)
        ],
    }


def _executor_scenarios(comfy: Any, app: Any, edits: int) -> list[dict[str, Any]]:
    execution = importlib.import_module("execution")
    model = comfyui.tiny_sdxl_patcher(comfy)
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1.0
    masks[1, :, 32:] = 1.0
    objects: dict[str, Any] = {
        "model": model,
        "adapter": adapter_for(model, "sdxl"),
        "face_analysis": app,
        "control_net": comfyui.tiny_controlnet(comfy, "sdxl"),
        "face_a": to_comfy_image(tagged_crop(40, 60)),
        "face_b": to_comfy_image(tagged_crop(200, 120)),
        "negative": comfyui.conditioning("sdxl", 1000),
        "mask_left": masks[:1],
        "mask_right": masks[1:],
    }
    objects |= {f"prompt_{i}": comfyui.conditioning("sdxl", i) for i in range(max(edits, 10))}
    bench = _Bench(objects)
    bench.register(comfy.nodes)
    results = []
    for name, graphs in _scenarios(edits).items():
        uncached = _run_sequence(execution, bench, graphs, cached=False)
        cached = _run_sequence(execution, bench, graphs, cached=True)
        equal = len(uncached["latents"]) == len(cached["latents"]) and all(
            torch.equal(u, c) for u, c in zip(uncached["latents"], cached["latents"], strict=True)
        )
        (fresh,) = _run_sequence(execution, bench, graphs[-1:], cached=False)["latents"]
        fresh_equal = torch.equal(uncached["latents"][-1], fresh) and torch.equal(
            cached["latents"][-1], fresh
        )
        per_run = len(uncached["node_ms"]) // len(graphs)
        results.append(
            {
                "scenario": name,
                "runs": len(graphs),
                "nodes_per_run": per_run,
                "hit_rate": cached["hit_rate"],
                "layers": cached["layers"],
                "first_uncached_ms": sum(uncached["node_ms"][:per_run]),
                "first_cached_ms": sum(cached["node_ms"][:per_run]),
                "uncached_ms": statistics.median(uncached["node_ms"][per_run:]),
                "cached_ms": statistics.median(cached["node_ms"][per_run:]),
                "bit_equal": equal,
                "fresh_equal": fresh_equal,
            }
        )
        r = results[-1]
        print(
            f"{name}: hit rate {100 * r['hit_rate']:.1f}% "
            f"({', '.join(f'{k} {h}/{n}' for k, (h, n) in r['layers'].items())}); "
            f"InstantID node after run 1: uncached {r['uncached_ms']:.1f} ms, cached {r['cached_ms']:.2f} ms "
            f"({100 * r['cached_ms'] / r['uncached_ms']:.1f}%); outputs bit-equal: {equal}; "
            f"last run equals a fresh executor's: {fresh_equal}",
            flush=True,
        )
    comfyui.release_models(comfy)
    return results


def _attention_patch(comfy: Any, app: Any, repeat: int) -> dict[str, float]:
    nodes = importlib.import_module("instantid.comfy.nodes")
    model = comfyui.tiny_sdxl_patcher(comfy)
    inputs = {
        "instantid": adapter_for(model, "sdxl"),
        "insightface": app,
        "image": to_comfy_image(tagged_crop(40, 60)),
        "model": model,
        "start_at": 0.0,
        "end_at": 1.0,
        "noise": 0.35,
    }

    def call(weight: float) -> Any:
        return comfyui.run_node(nodes.InstantIDAttentionPatch, weight=weight, **inputs)

    instantid_cache.configure(max_mb=0)
    call(0.8)  # warm-up (onnxruntime sessions, allocator)
    uncached = _median_ms(lambda i: call(0.8), repeat)
    # The original pack's re-run, face analysis free (as the issue measured it): the Resampler, then
    # 70 patches holding the adapter (its K/V work is deferred to sampling).
    weights = inputs["instantid"]
    embeds = embeddings(app, inputs["image"])
    stock = _median_ms(lambda i: stock_pack_model(model, weights, *face_tokens(weights, embeds)), repeat)
    instantid_cache.configure()
    call(0.8)
    rerun = _median_ms(lambda i: call(0.8), repeat)
    weight_only = _median_ms(lambda i: call(0.5 + 0.01 * i), repeat)
    print("InstantIDAttentionPatch (called directly):")
    print(f"  original pack's re-run    {stock:8.1f} ms  (stock layout, face analysis free)")
    print(f"  uncached apply            {uncached:8.1f} ms")
    print(
        f"  cached re-run, same input {rerun:8.2f} ms  ({100 * rerun / uncached:.1f}% of uncached, "
        f"{100 * rerun / stock:.1f}% of the original pack's re-run)"
    )
    print(
        f"  cached, new weight only   {weight_only:8.2f} ms  ({100 * weight_only / uncached:.1f}% of uncached)"
    )
    return {
        "stock_rerun_ms": stock,
        "uncached_ms": uncached,
        "rerun_ms": rerun,
        "weight_only_ms": weight_only,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--face-models", choices=("real", "small"), default="real")
    parser.add_argument("--repeat", type=int, default=5, help="calls per InstantIDAttentionPatch timing")
    parser.add_argument("--edits", type=int, default=20, help="prompt edits in scenario (a)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)"
    )
    semantics_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    comfy = comfyui.load_comfyui()
    root = real_cost_root() if args.face_models == "real" else build_antelopev2_like(Path(tempfile.mkdtemp()))
    app = load_face_analysis(root, provider="CPU")
    print(
        f"face models: {args.face_models} ({root}); tiny SDXL-layout ComfyUI model (70 layers), full-size "
        "Resampler; ComfyUI's PromptExecutor, KSampler 1 step at 64 px",
        flush=True,
    )
    runs = []
    for semantics in chosen(args.clone_semantics):
        print(f"\n== {GENERATION[semantics]}", flush=True)
        with in_process(comfy, semantics):
            patch = _attention_patch(comfy, app, args.repeat)
            scenarios = _executor_scenarios(comfy, app, args.edits)
        runs.append({"clone_semantics": semantics, "attention_patch": patch, "scenarios": scenarios})
    out = Path("bench-out")
    out.mkdir(exist_ok=True)
    result = {"face_models": args.face_models, "runs": runs}
    (out / "cache.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'cache.json'}")
    return 0
