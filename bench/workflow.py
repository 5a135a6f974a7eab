"""Whole workflows on a real ComfyUI server: this pack against the original pack's layout, in the same run.

``python -m bench workflow [--quick] [--arch sd15,sdxl] [--device cpu|cuda] [--stock PATH] [--repeats N]
[--clone-semantics deepcopy|list-dict|both]``

Each *variant* is a fresh ComfyUI server (``main.py``, started by ``instantid.testing.comfy_server``)
on a private base directory with random-weight models (``bench/workflow_setup.py``), driven only
over HTTP and its websocket:

* ``original layout``: the baseline. This pack's nodes with the original ComfyUI_InstantID's patch
  layout, the adapter module held in every attn2 patch (emulated by the bench's diagnostic folder,
  ``bench/_comfy_plugin.py``), so every downstream ``ModelPatcher.clone()`` deep-copies it; with
  ``--stock PATH``, the original pack itself from that checkout (SDXL only: its block layout is
  SDXL's; it needs a ComfyUI with ``ModelPatcher.get_model_object``, i.e. ``COMFYUI_PATH``);
* ``original layout + switch``: the same with ``COW_MODEL_COMFY_CLONE=1`` (what the global
  switch does for a pack that keeps its weights in patches);
* ``this pack`` and ``this pack + switch``.

Scenarios, in this order on every server: ``first_run`` (the first prompt, one face and two downstream clones: models
load); ``edits`` (prompt-text edits of that graph: loaders cached, everything from the text
encoder on runs again, the "cached run"); ``two_faces`` (two faces with masks and four downstream
cloning nodes: LoRA, RescaleCFG, FreeU, ModelSamplingDiscrete); ``faces`` (2, 4, 8 faces in one
graph, two downstream clones; 1 face is the edits graph); ``clones`` (one face, 0, 1, 4, 8
downstream clones; ``--quick``: 2 and 4 faces, 0, 4, 8 clones: with the original
layout 8 faces hold 44 copies of the adapter, ~18 GB on SD1.5 in fp32). ``--quick`` runs the baseline and this pack only
(``--variants`` picks others). Every prompt after
the first edits the text, so the InstantID and cloning nodes run each time.

Per prompt: the time from ``execution_start`` to the end (websocket; ComfyUI's "Prompt executed in"
from its log beside it), the time of the InstantID nodes and of the cloning nodes (websocket
``executing`` messages), the server's peak RSS (``VmHWM`` after a reset before the prompt, and the
maximum of ``psutil`` samples of the server pid), and on a GPU the peak VRAM
(``torch.cuda.max_memory_allocated`` and the driver's used memory, read inside the server).

Every variant runs once per clone semantics (``--clone-semantics``, ``bench/_semantics.py``; default
``deepcopy``, the installed ComfyUI's own ``clone()``): ``list-dict`` gives the server the test-only folder
that makes ``clone()`` copy ``model_options`` as ComfyUI does since 2026-02 (PR #12382). Every record and
summary row names its semantics (``clone_semantics``).

Writes ``bench-out/workflow.json`` and ``bench-out/workflow.md``; ``python -m bench report`` plots them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._semantics import add_option as semantics_option
from bench._semantics import chosen as semantics_chosen
from bench._semantics import fixture_name
from bench.results import OUT_DIR, markdown_table, write_result
from bench.workflow_setup import CLONE_NODES, INSTANTID_NODES, BenchModels, ensure_models, graph, make_install

log = logging.getLogger(__name__)
MiB = 1024 * 1024
BASELINE = "original layout"


@dataclass(frozen=True)
class Variant:
    name: str
    layout: str  # "stock" (weights in patches) or "pack"
    switch: bool


VARIANTS = (
    Variant(BASELINE, "stock", False),
    Variant("original layout + switch", "stock", True),
    Variant("this pack", "pack", False),
    Variant("this pack + switch", "pack", True),
)


@dataclass(frozen=True)
class Plan:
    """How much to run: sizes and repeat counts per scenario."""

    size: int
    steps: int
    edits: int
    repeats: int
    faces: tuple[int, ...] = (2, 4, 8)  # 1 face (with 2 clones) is the edits graph
    clones: tuple[int, ...] = (0, 1, 4, 8)  # 2 clones (with 1 face) is the edits graph

    def prompts(self) -> int:
        return 1 + self.edits + self.repeats * (1 + len(self.faces) + len(self.clones))


def plan_for(arch: str, device: str, quick: bool, repeats: int | None) -> Plan:
    if device == "cuda":  # sized to finish within 10 minutes on one GPU, model writing included
        size, steps = (1024, 10) if arch == "sdxl" else (512, 10)
        return Plan(size, steps, edits=10, repeats=repeats or 1)
    if quick:
        return Plan(
            size=64 if arch == "sd15" else 128,
            steps=1,
            edits=3,
            repeats=repeats or 1,
            faces=(2, 4),
            clones=(0, 4, 8),
        )
    return Plan(size=128 if arch == "sd15" else 256, steps=2, edits=10, repeats=repeats or 3)


class RssSampler:
    """The maximum RSS of a process (``psutil``), sampled every ``interval`` seconds while active."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        self.peak = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)


def run_prompt(server: Any, sampler: RssSampler, g: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one prompt with fresh memory peaks; its figures (see the module docstring)."""
    server.request("POST", "/instantid_bench/reset", body={})
    logged = len(server.executed_in())
    with sampler.sampling():
        run = server.run(g, timeout=timeout)
    if not run.ok:
        raise RuntimeError(f"the prompt failed: {run.error}\n{server.log_tail()}")
    memory = server.get_json("/instantid_bench/memory")
    executed = server.executed_in()
    by_class = {g[node]["class_type"]: 0.0 for node in run.node_seconds if node in g}
    for node, seconds in run.node_seconds.items():
        if node in g:
            by_class[g[node]["class_type"]] += seconds
    cuda = memory.get("cuda") or {}
    return {
        "seconds": run.seconds,
        "executed_in": executed[-1] if len(executed) > logged else None,
        "instantid_seconds": sum(s for c, s in by_class.items() if c in INSTANTID_NODES),
        "clone_seconds": sum(s for c, s in by_class.items() if c in CLONE_NODES),
        "sampler_seconds": by_class.get("KSampler", 0.0),
        "node_seconds": by_class,
        "cached": len(run.cached),
        "rss_peak": memory.get("rss_peak"),
        "rss_sampled_peak": sampler.peak or None,
        "vram_max_allocated": cuda.get("max_allocated"),
        "vram_driver_peak": cuda.get("driver_used_peak"),
    }


def run_variant(
    variant: Variant,
    root: Path,
    models: BenchModels,
    images: Any,
    plan: Plan,
    *,
    device: str,
    stock: bool,
    progress: Any,
    clone_semantics: str = "deepcopy",
) -> list[dict[str, Any]]:
    """Start a server for ``variant``, run every scenario of ``plan`` on it, stop it; one record per prompt."""
    from instantid.testing.comfy_install import REPOSITORY_ROOT
    from instantid.testing.comfy_server import comfy_server

    env = {
        "INSTANTID_BENCH_PLUGIN": "1",
        "INSTANTID_BENCH_LAYOUT": ("original" if stock else "stock") if variant.layout == "stock" else "pack",
        "COW_MODEL_COMFY_CLONE": "1" if variant.switch else "0",
    }
    if stock and variant.switch:  # the original pack does not install the switch: the bench folder does
        env["PYTHONPATH"] = str(REPOSITORY_ROOT)
    timeout = 1800.0 if device == "cpu" else 600.0
    records: list[dict[str, Any]] = []
    counter = iter(range(1_000_000))

    def text() -> str:
        return f"a portrait photo, soft light, take {next(counter)}"

    with comfy_server(root, env=env, cpu=device == "cpu", timeout=600) as server:
        available = set(server.object_info())
        sampler = RssSampler(server.process.pid)

        def one(scenario: str, faces: int, clones: int, repeat: int) -> None:
            g = graph(
                models, images, faces=faces, clones=clones, text=text(), size=plan.size, steps=plan.steps,
                available=available,
            )  # fmt: skip
            progress.set_postfix_str(
                f"{variant.name}, {clone_semantics}: {scenario} faces={faces} clones={clones}"
            )
            record = run_prompt(server, sampler, g, timeout)
            records.append(
                {"variant": variant.name, "clone_semantics": clone_semantics, "arch": models.arch,
                 "scenario": scenario, "faces": faces, "clones": clones, "repeat": repeat, **record}
            )  # fmt: skip
            progress.update(1)

        one("first_run", 1, 2, 0)
        for i in range(plan.edits):
            one("edits", 1, 2, i)
        for i in range(plan.repeats):
            one("two_faces", 2, 4, i)
        for faces in plan.faces:
            for i in range(plan.repeats):
                one("faces", faces, 2, i)
        for clones in plan.clones:
            for i in range(plan.repeats):
                one("clones", 1, clones, i)
    return records


# --- summaries ----------------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (arch, clone semantics, scenario, faces, clones, variant) of every figure."""
    keys = ("seconds", "executed_in", "instantid_seconds", "clone_seconds", "sampler_seconds", "rss_peak",
            "rss_sampled_peak", "vram_max_allocated", "vram_driver_peak")  # fmt: skip
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        key = (r["arch"], semantics_of(r), r["scenario"], r["faces"], r["clones"], r["variant"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (arch, semantics, scenario, faces, clones, variant), group in groups.items():
        row = {"arch": arch, "clone_semantics": semantics, "scenario": scenario, "faces": faces, "clones": clones,
               "variant": variant, "prompts": len(group)}  # fmt: skip
        row |= {k: median([r[k] for r in group]) for k in keys}
        rows.append(row)
    return rows


def savings(summary: list[dict[str, Any]], variant: str = "this pack") -> list[dict[str, Any]]:
    """Per (arch, clone semantics, scenario, faces, clones): ``variant`` against the baseline (time, memory)."""
    index = {
        (r["arch"], semantics_of(r), r["scenario"], r["faces"], r["clones"], r["variant"]): r for r in summary
    }
    out = []
    for (arch, semantics, scenario, faces, clones, name), base in index.items():
        if name != BASELINE or (arch, semantics, scenario, faces, clones, variant) not in index:
            continue
        other = index[(arch, semantics, scenario, faces, clones, variant)]
        row = {"arch": arch, "clone_semantics": semantics, "scenario": scenario, "faces": faces, "clones": clones,
               "variant": variant}  # fmt: skip
        for key in ("seconds", "rss_peak", "vram_max_allocated", "vram_driver_peak"):
            b, o = base.get(key), other.get(key)
            row[f"{key}_baseline"], row[key] = b, o
            row[f"{key}_saved"] = None if b is None or o is None else b - o
            row[f"{key}_saved_share"] = None if b is None or o is None or not b else (b - o) / b
        out.append(row)
    return out


def semantics_of(row: dict[str, Any]) -> str:
    """A record's or summary row's clone semantics (``deepcopy`` for results written before the option)."""
    return str(row.get("clone_semantics", "deepcopy"))


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0, unit: str = "") -> str | None:
    return None if value is None else f"{value / scale:,.{digits}f}{unit}"


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{value * 100:+.0f}%"


def markdown(summary: list[dict[str, Any]], saved: list[dict[str, Any]]) -> str:
    headers = ["arch", "clone()", "scenario", "faces", "clones", "variant", "prompts", "time / prompt", "InstantID nodes",
               "cloning nodes", "KSampler", "peak RSS", "peak VRAM (alloc / driver)"]  # fmt: skip
    rows = []
    for r in summary:
        vram = None
        if r["vram_max_allocated"] is not None:
            vram = f"{_fmt(r['vram_max_allocated'], MiB)} / {_fmt(r['vram_driver_peak'], MiB)} MiB"
        rows.append([
            r["arch"], semantics_of(r), r["scenario"], r["faces"], r["clones"], r["variant"], r["prompts"],
            _fmt(r["seconds"], 1e-3, 0, " ms"), _fmt(r["instantid_seconds"], 1e-3, 0, " ms"),
            _fmt(r["clone_seconds"], 1e-3, 0, " ms"), _fmt(r["sampler_seconds"], 1e-3, 0, " ms"),
            _fmt(r["rss_peak"], MiB, 0, " MiB"), vram,
        ])  # fmt: skip
    text = "Medians per prompt.\n\n" + markdown_table(headers, rows)
    headers = ["arch", "clone()", "scenario", "faces", "clones", "time saved / prompt", "share of the prompt",
               "peak RSS saved", "peak VRAM saved"]  # fmt: skip
    rows = [
        [s["arch"], semantics_of(s), s["scenario"], s["faces"], s["clones"], _fmt(s["seconds_saved"], 1e-3, 0, " ms"),
         _pct(s["seconds_saved_share"]),
         None if s["rss_peak_saved"] is None else f"{_fmt(s['rss_peak_saved'], MiB)} MiB ({_pct(s['rss_peak_saved_share'])})",
         _pct(s["vram_max_allocated_saved_share"])]
        for s in saved
    ]  # fmt: skip
    return (
        text
        + f"\n\nThis pack against the {BASELINE} (baseline), same run.\n\n"
        + markdown_table(headers, rows)
    )


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench workflow", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="SD1.5, the baseline and this pack, 3 edits, 1 repeat, 64 px, 1 step",
    )
    parser.add_argument(
        "--arch", default=None, help="sd15,sdxl (default: both; --quick: sd15; --device cuda: sdxl)"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the server runs the models"
    )
    parser.add_argument(
        "--stock", type=Path, default=None, help="a ComfyUI_InstantID checkout as the baseline"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="prompts per sweep point (default 1 quick, 3)"
    )
    parser.add_argument(
        "--size", type=int, default=None, help="image side in pixels (default per arch/device)"
    )
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default per arch/device)")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated variant names (default: all; --quick: the baseline and this pack)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default bench-out/)")
    parser.add_argument("--fresh-models", action="store_true", help="rewrite the cached random-weight models")
    semantics_option(parser, default="deepcopy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    default_arch = "sd15" if args.quick else "sdxl" if args.device == "cuda" else "sd15,sdxl"
    archs = (args.arch or default_arch).split(",")
    chosen = args.variants.split(",") if args.variants else ([BASELINE, "this pack"] if args.quick else None)
    variants = [v for v in VARIANTS if chosen is None or v.name in chosen]
    if args.stock is not None and archs != ["sdxl"]:
        parser.error("--stock runs the original pack, which supports SDXL only: add --arch sdxl")
    from tqdm import tqdm

    from instantid.testing.comfyui import load_comfyui

    semantics = semantics_chosen(args.clone_semantics)
    for name in semantics:
        fixture_name(load_comfyui(), name)  # raises for deepcopy on a ComfyUI that shares patch objects
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    plans: dict[str, dict[str, Any]] = {}
    for arch in archs:
        plan = plan_for(arch, args.device, args.quick, args.repeats)
        plan = Plan(**{**plan.__dict__, "size": args.size or plan.size, "steps": args.steps or plan.steps})
        plans[arch] = plan.__dict__
        models = ensure_models(load_comfyui(), args.out / "models" / arch, arch, fresh=args.fresh_models)  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory(prefix="bench-workflow-") as tmp:
            with tqdm(
                total=plan.prompts() * len(variants) * len(semantics), desc=f"workflow {arch}", unit="prompt"
            ) as progress:
                for name in semantics:
                    for variant in variants:
                        stock = args.stock if variant.layout == "stock" else None
                        root, images = make_install(
                            Path(tmp) / f"{variant.name.replace(' ', '_')}-{name}", models, stock=stock,
                            clone_semantics=fixture_name(load_comfyui(), name),
                        )  # fmt: skip
                        records += run_variant(
                            variant, root, models, images, plan, device=args.device, stock=stock is not None,
                            progress=progress, clone_semantics=name,
                        )  # fmt: skip

    summary = summarize(records)
    saved = savings(summary)
    data = {
        "device": args.device,
        "quick": args.quick,
        "baseline": "the original ComfyUI_InstantID at " + str(args.stock) if args.stock else
        "this pack's nodes with the original pack's patch layout (adapter module in every attn2 patch)",
        "plans": plans,
        "clone_semantics": semantics,
        "variants": [v.__dict__ for v in variants],
        "wall_seconds": time.perf_counter() - started,
        "records": records,
        "summary": summary,
        "savings": saved,
        "savings_switch": savings(summary, "original layout + switch"),
    }  # fmt: skip
    text = markdown(summary, saved)
    json_path, md_path = write_result("workflow", data, text, args.out)
    print(text)
    print(f"wrote {json_path} and {md_path} ({data['wall_seconds']:.0f} s)")
    return 0
