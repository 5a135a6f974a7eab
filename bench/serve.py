"""InstantID on Ray Serve: identities multiplexed as copy-on-write views vs one full pipeline per identity.

``python -m bench serve [--quick] [--device cpu|cuda] [--budget-mb 128] [--counts 1,8,64] [--requests N]``

One local Ray cluster (2 CPUs, no dashboard), the ``instantid.serve`` application with the tiny
random SDXL ControlNet pipeline (``instantid.testing.serve_models``; 16 x 16 images, 2 steps),
deployed twice: with identities as views of the replica's one base pipeline (the default), and
with the multiplexing Ray documents, each identity a full pipeline of its own (the baseline:
``copy.deepcopy`` of the base pipeline, the identity's processors set on the copy's UNet in
place, its ControlNet fed the face tokens). Both size Ray's ``max_num_models_per_replica`` from
the same memory budget. Measured over HTTP, for each way:

- identities held per replica at the budget, and the replica's RSS (VRAM with ``--device cuda``)
  after the largest round robin;
- time to the first image of a cold identity (registered, never generated) against a warm one;
- throughput and p50/p95 latency with 1, 8 and 64 identities in round robin on 1 and 2 replicas
  (after one untimed pass that loads them), ``2 x replicas`` requests in flight.

Writes ``bench-out/serve.json``, ``serve.md`` and the plot ``serve.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import MiB
from bench.results import OUT_DIR, markdown_table, write_result

MODES = {"views": None, "copies": "bench.serve:DeepCopyPipelines"}
LABELS = {"views": "COW views (instantid.serve)", "copies": "full pipeline per identity"}


class DeepCopyPipelines:
    """The baseline identity factory: each identity a ``copy.deepcopy`` of the base pipeline with InstantID
    installed on the copy in place (what an in-place pipeline needs per identity held)."""

    def __init__(self, pipe: Any, adapter: Any) -> None:
        self.pipe, self.adapter = pipe, adapter

    def build(self, embedding: Any, options: tuple[float, float, float]) -> Any:
        from instantid.diffusers import FaceTokensControlNet, prepare_identity
        from instantid.diffusers.processor import pipeline_layout

        weight, start, end = options
        copied = copy.deepcopy(self.pipe)
        identity = prepare_identity(
            copied.unet, self.adapter, embedding, layout=pipeline_layout(copied), weight=weight, start=start,
            end=end, num_train_timesteps=int(copied.scheduler.config.num_train_timesteps),
        )  # fmt: skip
        copied.unet.set_attn_processor({**copied.unet.attn_processors, **identity.processors})
        if identity.gate is not None:
            copied.unet.time_proj.register_forward_pre_hook(identity.gate.record)
        if getattr(copied, "controlnet", None) is not None:
            copied.controlnet = FaceTokensControlNet(
                copied.controlnet, identity.cond_tokens, identity.uncond_tokens, pipeline_layout(copied)
            )
        return copied

    def bytes_per_identity(self) -> int:
        """Every tensor of the pipeline's modules (a copy holds all of them)."""
        import torch

        storages: dict[int, int] = {}
        for component in self.pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in [*component.parameters(), *component.buffers()]:
                    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return sum(storages.values())


def process_rss(pid: int) -> int:
    import os

    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settings(mode: str, replicas: int, store: Path, budget_mb: float, device: str) -> dict[str, Any]:
    gpu = device == "cuda"
    return {
        "store": str(store),
        "pipeline_factory": "instantid.testing.serve_models:tiny_pipeline",
        "adapter_factory": "instantid.testing.serve_models:tiny_adapter",
        "identity_factory": MODES[mode],
        "device": device,
        "num_replicas": replicas,
        "replica_cpus": 0 if gpu else 1,
        "replica_gpus": 0.5 if gpu else 0,
        "torch_threads": 1,
        "default_steps": 2,
        "identity_memory_mb": budget_mb,
        "max_ongoing_requests": 64,
    }


class Client:
    """HTTP calls to the service (one ``requests.Session`` per thread)."""

    def __init__(self, url: str) -> None:
        import threading

        self.url, self._local = url, threading.local()

    def _session(self) -> Any:
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def register(self, seed: int) -> str:
        embedding = (np.random.default_rng(seed).normal(size=512) * 20).tolist()
        answer = self._session().post(f"{self.url}/identities", json={"embedding": embedding}, timeout=120)
        answer.raise_for_status()
        return str(answer.json()["id"])

    def generate(self, identity: str) -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        answer = self._session().post(
            f"{self.url}/generate", json={"prompt": "a portrait", "format": "json"},
            headers={"serve_multiplexed_model_id": identity}, timeout=600,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        if answer.status_code != 200:
            raise RuntimeError(f"generate answered {answer.status_code}: {answer.text}")
        body = answer.json()
        body.pop("image")
        return seconds, body


def round_robin(client: Client, identities: list[str], requests: int, in_flight: int, label: str) -> dict[str, Any]:
    """One untimed pass over ``identities``, then ``requests`` in round robin with ``in_flight`` at a time."""
    from tqdm import tqdm

    order = [identities[i % len(identities)] for i in range(requests)]
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        list(tqdm(pool.map(client.generate, identities), total=len(identities), desc=f"{label} load", leave=False))
        start = time.perf_counter()
        results = list(tqdm(pool.map(client.generate, order), total=requests, desc=label, leave=False))
        wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in results)
    return {
        "requests": requests,
        "throughput": requests / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "cold_share": sum(1 for _, body in results if body["cold"]) / requests,
    }


def cold_start(client: Client, seeds: range) -> dict[str, float]:
    """Median seconds of the first image of a freshly registered identity, and of its second."""
    cold, warm = [], []
    for seed in seeds:
        identity = client.register(seed)
        cold.append(client.generate(identity)[0])
        warm.append(client.generate(identity)[0])
    return {"cold": statistics.median(cold), "warm": statistics.median(warm)}


def plot(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, marker in (("views", "o"), ("copies", "s")):
        for replicas, style in ((1, "-"), (2, "--")):
            points = [r for r in rows if r["mode"] == mode and r["replicas"] == replicas]
            if not points:
                continue
            label = f"{LABELS[mode]}, {replicas} replica{'s' if replicas > 1 else ''}"
            xs = [r["identities"] for r in points]
            axes[0].plot(xs, [r["throughput"] for r in points], style, marker=marker, label=label)
            axes[1].plot(xs, [r["p95"] * 1e3 for r in points], style, marker=marker, label=label)
    for ax, ylabel in zip(axes, ("throughput (images/s)", "p95 latency (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("identities in round robin")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("InstantID on Ray Serve: identities as views vs a pipeline per identity")
    fig.tight_layout()
    path = out_dir / "serve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench serve", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed requests and cold starts")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--budget-mb", type=float, default=128.0, help="memory per replica for identities")
    parser.add_argument("--counts", default="1,8,64", help="identities in round robin, comma-separated")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per point (default 16 quick, 48)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.counts.split(",")]
    timed = args.requests or (16 if args.quick else 48)

    import tempfile

    from instantid.testing.serve_cluster import deploy, local_cluster, replica_statuses

    rows: list[dict[str, Any]] = []
    modes: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder, local_cluster(num_cpus=2) as url:
        client = Client(url)
        seed = 0
        for mode in MODES:
            for replicas in (1, 2):
                print(f"deploying {LABELS[mode]} on {replicas} replica(s) ...", flush=True)
                deploy(settings(mode, replicas, Path(folder) / mode, args.budget_mb, args.device))
                if replicas == 1:
                    status = next(iter(replica_statuses().values()))
                    modes[mode] = {
                        "capacity": status["capacity"], "bytes_per_identity": status["bytes_per_identity"],
                        **cold_start(client, range(seed, seed + (2 if args.quick else 5))),
                    }  # fmt: skip
                    seed += 10
                    print(
                        f"  {LABELS[mode]}: {status['capacity']} identities per replica in {args.budget_mb:g} MiB "
                        f"({status['bytes_per_identity'] / MiB:.2f} MiB each); first image of a cold identity "
                        f"{modes[mode]['cold'] * 1e3:.0f} ms, warm {modes[mode]['warm'] * 1e3:.0f} ms"
                    )
                for count in counts:
                    identities = [client.register(seed + i) for i in range(count)]
                    seed += count
                    label = f"{mode} {replicas}r {count}id"
                    row = {"mode": mode, "replicas": replicas, "identities": count,
                           **round_robin(client, identities, max(timed, count), 2 * replicas, label)}  # fmt: skip
                    statuses = replica_statuses()
                    row["held"] = sum(len(s["loaded"]) for s in statuses.values())
                    memory = [s["vram_allocated"] if args.device == "cuda" else process_rss(s["pid"])
                              for s in statuses.values()]  # fmt: skip
                    row["memory_per_replica"] = max(memory)
                    rows.append(row)
                    print(
                        f"  {replicas} replica(s), {count:>2} identities: {row['throughput']:.2f} images/s, "
                        f"p50 {row['p50'] * 1e3:.0f} ms, p95 {row['p95'] * 1e3:.0f} ms, "
                        f"{row['cold_share']:.0%} cold, held {row['held']}, "
                        f"{'VRAM' if args.device == 'cuda' else 'RSS'} {row['memory_per_replica'] / MiB:.0f} MiB"
                    )
    seconds = time.perf_counter() - started
    summary = markdown_table(
        ["way", "identities per replica", "per identity", "first image, cold", "warm"],
        [[LABELS[m], d["capacity"], f"{d['bytes_per_identity'] / MiB:.2f} MiB", f"{d['cold'] * 1e3:.0f} ms",
          f"{d['warm'] * 1e3:.0f} ms"] for m, d in modes.items()],
    )  # fmt: skip
    memory_label = "VRAM per replica" if args.device == "cuda" else "RSS per replica"
    table = markdown_table(
        ["way", "replicas", "identities", "images/s", "p50", "p95", "cold", memory_label],
        [[LABELS[r["mode"]], r["replicas"], r["identities"], f"{r['throughput']:.2f}", f"{r['p50'] * 1e3:.0f} ms",
          f"{r['p95'] * 1e3:.0f} ms", f"{r['cold_share']:.0%}", f"{r['memory_per_replica'] / MiB:.0f} MiB"]
         for r in rows],
    )  # fmt: skip
    print(f"\nmemory budget {args.budget_mb:g} MiB per replica, device {args.device}, {seconds:.0f} s\n")
    print(summary)
    print(table)
    json_path, _ = write_result(
        "serve",
        {"quick": args.quick, "device": args.device, "budget_mb": args.budget_mb, "modes": modes, "rows": rows,
         "seconds": seconds},
        f"Memory budget {args.budget_mb:g} MiB per replica, device {args.device}.\n\n{summary}\n{table}",
        args.out,
    )  # fmt: skip
    print(f"wrote {json_path} and {plot(rows, args.out)}")
    return 0
