"""Plots and the README's headline table from the benches' JSON files.

``python -m bench report [--out bench-out] [--readme [README.md]]``

Reads ``workflow.json``, ``clone_cost.json``, ``diffusers_identities.json`` and ``serve.json`` from the output
folder (each written by its bench; a missing one is skipped with a note) and writes PNG plots
(matplotlib, headless) beside them:

* ``workflow_faces.png`` / ``workflow_clones.png``: time per prompt and peak memory (VRAM where
  measured, else the server's RSS) against the number of faces and of downstream cloning nodes,
  every variant (this pack and the original layout, with and without the switch);
* ``clone_cost.png``: construction time of one clone against model size, log axes;
* ``diffusers_identities.png``: memory added against the number of identities in diffusers;
* ``serve.png``: throughput and p95 latency on Ray Serve against the identities in round robin
  (``bench/serve.py`` writes it too).

``--readme`` rewrites the table between ``<!-- bench:workflow:start -->`` and
``<!-- bench:workflow:end -->`` in the README from ``workflow.json`` (and ``comfy_clone.json`` when there):
the whole-workflow savings next to the targets, the downstream clone and the re-runs of a second face,
each row naming the ComfyUI generation (clone semantics) it was measured under, and the machine.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from bench._semantics import SEMANTICS
from bench.results import OUT_DIR, REPOSITORY_ROOT, describe_machine, markdown_table, read_result
from bench.serve import plot as plot_serve_rows

MiB = 1024 * 1024
BASELINE = "original layout"
PACK = "this pack"
GENERATION_SHORT = {
    "deepcopy": "until 2026-01 (clone deep-copies)",
    "list-dict": "since 2026-02 (clone shares)",
}
"""The ComfyUI generation of each clone semantics, as the headline table's first column names it."""
START, END = "<!-- bench:workflow:start -->", "<!-- bench:workflow:end -->"


class MarkerError(ValueError):
    """The README lacks the start/end markers, or has them out of order or more than once."""


def replace_between_markers(text: str, body: str, start: str = START, end: str = END) -> str:
    """``text`` with everything between the ``start`` and ``end`` marker lines replaced by ``body``."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise MarkerError(f"expected one {start} line followed by one {end} line")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text, count=1)


# --- the headline table -------------------------------------------------------------------------


def _semantics(row: dict[str, Any]) -> str:
    return str(row.get("clone_semantics", "deepcopy"))  # results written before the option: deepcopy


def _rows(
    data: dict[str, Any], arch: str, scenario: str, semantics: str = "deepcopy", **where: int
) -> dict[str, dict[str, Any]]:
    """Summary rows of one (arch, clone semantics, scenario[, faces, clones]) point by variant."""
    out = {}
    for r in data.get("summary", []):
        if (
            r["arch"] == arch
            and r["scenario"] == scenario
            and _semantics(r) == semantics
            and all(r[k] == v for k, v in where.items())
        ):
            out[r["variant"]] = r
    return out


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:,.0f} ms"


def _share(saved: float | None, base: float | None) -> str:
    return "–" if saved is None or not base else f"{saved / base * 100:.1f}%"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / MiB:,.0f} MiB"


def _largest(data: dict[str, Any], arch: str, scenario: str, key: str, semantics: str) -> int | None:
    values = [
        r[key]
        for r in data.get("summary", [])
        if r["arch"] == arch and r["scenario"] == scenario and _semantics(r) == semantics
    ]
    return max(values) if values else None


def headline_rows(data: dict[str, Any]) -> list[list[str]]:
    """Rows ``[ComfyUI, measure, target, baseline, this pack, saved]`` per clone semantics and architecture."""
    rows: list[list[str]] = []
    present = {_semantics(r) for r in data.get("summary", [])}
    for semantics in [s for s in SEMANTICS if s in present]:
        for row in _workflow_rows(data, semantics):
            rows.append([GENERATION_SHORT[semantics], *row])
    return rows


def _workflow_rows(data: dict[str, Any], semantics: str) -> list[list[str]]:
    rows: list[list[str]] = []
    archs = sorted({r["arch"] for r in data.get("summary", []) if _semantics(r) == semantics})
    for arch in archs:
        plan = data.get("plans", {}).get(arch, {})
        setting = f"{arch}, {plan.get('size', '?')} px, {plan.get('steps', '?')} step(s)"
        edits = _rows(data, arch, "edits", semantics)
        if BASELINE in edits and PACK in edits:
            b, p = edits[BASELINE], edits[PACK]
            saved = b["seconds"] - p["seconds"]
            rows.append([f"cached run (prompt edit; 1 face, 2 downstream clones), {setting}",
                         "100-300 ms saved", _ms(b["seconds"]), _ms(p["seconds"]),
                         f"{_ms(saved)} ({_share(saved, b['seconds'])})"])  # fmt: skip
            cloning = (b["clone_seconds"] + b["instantid_seconds"]) - (
                p["clone_seconds"] + p["instantid_seconds"]
            )
            rows.append([f"  of which InstantID + cloning nodes, {arch}", "",
                         _ms(b["clone_seconds"] + b["instantid_seconds"]),
                         _ms(p["clone_seconds"] + p["instantid_seconds"]), _ms(cloning)])  # fmt: skip
        two = _rows(data, arch, "two_faces", semantics)
        if BASELINE in two and PACK in two:
            b, p = two[BASELINE], two[PACK]
            saved = b["seconds"] - p["seconds"]
            rows.append([f"total workflow time (2 faces, 4 downstream clones), {setting}",
                         "10-15% less", _ms(b["seconds"]), _ms(p["seconds"]),
                         f"{_ms(saved)} ({_share(saved, b['seconds'])})"])  # fmt: skip
            rss = None if b["rss_peak"] is None or p["rss_peak"] is None else b["rss_peak"] - p["rss_peak"]
            rows.append([f"peak RSS of the server (2 faces, 4 clones), {arch}", "",
                         _mib(b["rss_peak"]), _mib(p["rss_peak"]),
                         "–" if rss is None else f"{_mib(rss)} ({_share(rss, b['rss_peak'])})"])  # fmt: skip
            if b["vram_max_allocated"] is not None and p["vram_max_allocated"] is not None:
                vram = b["vram_max_allocated"] - p["vram_max_allocated"]
                rows.append([f"peak VRAM, max allocated (2 faces, 4 clones), {arch}", "50% less",
                             _mib(b["vram_max_allocated"]), _mib(p["vram_max_allocated"]),
                             f"{_mib(vram)} ({_share(vram, b['vram_max_allocated'])})"])  # fmt: skip
            else:
                rows.append([f"peak VRAM, {arch}", "50% less", "not measured (no GPU)", "–", "–"])
        most = _largest(data, arch, "clones", "clones", semantics)
        wide = _rows(data, arch, "clones", semantics, clones=most) if most is not None else {}
        if BASELINE in wide and PACK in wide:
            b, p = wide[BASELINE], wide[PACK]
            saved = b["seconds"] - p["seconds"]
            rows.append([f"1 face, {most} downstream clones, {arch}", "", _ms(b["seconds"]), _ms(p["seconds"]),
                         f"{_ms(saved)} ({_share(saved, b['seconds'])}); peak RSS {_mib(b['rss_peak'])} vs "
                         f"{_mib(p['rss_peak'])}"])  # fmt: skip
    return rows


def clone_rows(clone: dict[str, Any]) -> list[list[str]]:
    """Rows of ``comfy_clone.json`` per clone semantics: a downstream clone, and re-runs of a second face."""
    rows: list[list[str]] = []
    for result in clone.get("results", []):
        generation = GENERATION_SHORT[result["clone_semantics"]]
        by_name = {name.strip(): row for name, row in result["clones"]}
        stock = by_name.get(f"{BASELINE}, stock clone()")
        pack = by_name.get("(iii) this pack, stock clone()")
        if stock is not None and pack is not None:
            rows.append([generation, "downstream clone() of 70 SDXL patches, full-size adapter (in-process)", "",
                         f"{stock['seconds'] * 1e3:,.2f} ms, +{_mib(stock['tensors'])}",
                         f"{pack['seconds'] * 1e3:,.2f} ms, +{_mib(pack['tensors'])}",
                         _ms(stock["seconds"] - pack["seconds"]) if stock["seconds"] > 1e-3 else "none: both share"])  # fmt: skip
        reruns = {x["layout"]: x for x in result["reruns"]}
        if BASELINE in reruns and PACK in reruns:
            b, p = reruns[BASELINE], reruns[PACK]

            def terms(x: dict[str, Any]) -> str:
                ok = x["terms_output"] == 2 and x["terms_upstream"] == 1
                return f"{x['terms_output']} / {x['terms_upstream']}{'' if ok else ' (wrong)'}"

            switched = reruns.get(f"{BASELINE} + switch")
            rows.append([generation, f"terms per patch key after {clone.get('edits', '?')} re-runs of a 2nd face, "
                         "output / cached upstream (fresh run: 2 / 1)", "2 / 1", terms(b), terms(p),
                         f"{BASELINE} + COW_MODEL_COMFY_CLONE=1: {terms(switched)}" if switched else ""])  # fmt: skip
            rows.append([generation, "apply InstantID on 70 SDXL layers: first / re-apply on a cached model (this pack computes the "
                         "face's K/V once; the original computes them at every sampling step)", "",
                         f"{b['first_apply_ms']:,.0f} / {b['reapply_ms']:,.1f} ms",
                         f"{p['first_apply_ms']:,.0f} / {p['reapply_ms']:,.1f} ms", ""])  # fmt: skip
        held = result.get("held_bytes")
        if held:
            rows.append([generation, "tensors the patches hold while sampling (adapter vs K/V)", "",
                         _mib(held["stock"]), _mib(held["pack"]), _mib(held["stock"] - held["pack"])])  # fmt: skip
    return rows


def headline(data: dict[str, Any], clone: dict[str, Any] | None = None) -> str:
    """The README's table (markdown) with the machine and the commands under it."""
    headers = ["ComfyUI", "measure (median per prompt)", "target", BASELINE, PACK, "saved"]
    table = markdown_table(headers, headline_rows(data) + (clone_rows(clone) if clone else []))
    device = data.get("device", "cpu")
    note = (
        f"Measured {data.get('created', '?')[:10]} with `python -m bench workflow{' --quick' if data.get('quick') else ''}"
        f"{' --device cuda' if device == 'cuda' else ''}` on {describe_machine(data.get('machine', {}))}; "
        f"baseline: {data.get('baseline', '?')}. Generated by `python -m bench report --readme` from "
        "`bench-out/workflow.json`."
    )
    if clone:
        note += (
            f" Clone and re-run rows: `python -m bench comfy_clone --clone-semantics both` "
            f"({clone.get('created', '?')[:10]}, {describe_machine(clone.get('machine', {}))})."
        )
    return table + "\n" + note + "\n"


# --- plots --------------------------------------------------------------------------------------


SWEEPS = {"faces": ("clones", 2), "clones": ("faces", 1)}
"""Each sweep's fixed axis: faces are swept at 2 downstream clones, clones at 1 face."""


def _series(data: dict[str, Any], arch: str, axis: str, key: str) -> dict[str, list[tuple[int, float]]]:
    """``{variant: [(x, y)]}`` over every cached-run point with the other axis at its fixed value
    (the sweep's own rows, and the edits graph for the shared point); first runs are left out."""
    other, fixed = SWEEPS[axis]
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in data.get("summary", []):
        if r["arch"] != arch or r["scenario"] == "first_run" or r[other] != fixed or r.get(key) is None:
            continue
        slot = (r["variant"], r[axis])
        rank = (r["scenario"] == axis, r["prompts"])
        if slot not in best or rank > (best[slot]["scenario"] == axis, best[slot]["prompts"]):
            best[slot] = r
    out: dict[str, list[tuple[int, float]]] = {}
    for (variant, x), r in sorted(best.items()):
        out.setdefault(variant, []).append((x, r[key]))
    return out


def plot_workflow(data: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    archs = sorted({r["arch"] for r in data.get("summary", [])})
    gpu = any(r.get("vram_max_allocated") is not None for r in data.get("summary", []))
    memory_key, memory_label = (
        ("vram_max_allocated", "peak VRAM (MiB)") if gpu else ("rss_peak", "peak RSS of the server (MiB)")
    )
    for scenario, axis, label in (
        ("faces", "faces", "faces in the graph"),
        ("clones", "clones", "downstream cloning nodes"),
    ):
        fig, axes = plt.subplots(len(archs), 2, figsize=(11, 4 * len(archs)), squeeze=False)
        for row, arch in enumerate(archs):
            for col, (key, ylabel, scale) in enumerate(
                (("seconds", "time per prompt (s)", 1.0), (memory_key, memory_label, MiB))
            ):
                ax = axes[row][col]
                for variant, points in _series(data, arch, axis, key).items():
                    ax.plot([x for x, _ in points], [y / scale for _, y in points], marker="o", label=variant)
                ax.set_xlabel(label)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{arch}: {ylabel.split(' (')[0]} against {label}")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"workflow_{scenario}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_clone_cost(data: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["construction"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sizes = [r["modules"] for r in rows]
    ax.loglog(sizes, [r["clone_seconds"] * 1e3 for r in rows], marker="o", label="LazyClonedModel")
    ax.loglog(sizes, [r["deepcopy_seconds"] * 1e3 for r in rows], marker="s", label="copy.deepcopy")
    ax.set_xlabel("modules in the model")
    ax.set_ylabel("time of one clone (ms)")
    ax.set_title("clone construction against model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "clone_cost.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_identities(data: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for kind, marker in (("COW clones", "o"), ("deep copies", "s")):
        rows = [r for r in data["rows"] if r["kind"] == kind]
        if rows:
            ax.plot(
                [r["n"] for r in rows],
                [r["rss"] / MiB for r in rows],
                marker=marker,
                label=f"{kind}, RSS added",
            )
            extrapolated = [r for r in rows if r.get("extrapolated")]
            if extrapolated:
                ax.plot([r["n"] for r in extrapolated], [r["rss"] / MiB for r in extrapolated], "x", color="red",
                        label=f"{kind}: extrapolated")  # fmt: skip
    ax.set_xlabel("identities (UNets in memory)")
    ax.set_ylabel("memory added (MiB)")
    ax.set_title(f"diffusers: memory against identities ({data.get('model', '?')} UNet)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "diffusers_identities.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_serve(data: dict[str, Any], out_dir: Path) -> Path:
    return plot_serve_rows(data["rows"], out_dir)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder of the JSON files and plots")
    parser.add_argument(
        "--readme", nargs="?", type=Path, const=REPOSITORY_ROOT / "README.md", default=None,
        help="rewrite the headline table between the bench:workflow markers of this README",
    )  # fmt: skip
    args = parser.parse_args(argv)
    written: list[Path] = []
    workflow = read_result("workflow", args.out)
    if workflow is None:
        print(f"no {args.out / 'workflow.json'}: run `python -m bench workflow --quick` first")
    else:
        written += plot_workflow(workflow, args.out)
        print(headline(workflow, read_result("comfy_clone", args.out)))
    plots = {"clone_cost": plot_clone_cost, "diffusers_identities": plot_identities, "serve": plot_serve}
    for name, plot in plots.items():
        data = read_result(name, args.out)
        if data is None:
            print(f"no {args.out / (name + '.json')}: run `python -m bench {name}` to plot it")
        else:
            written.append(plot(data, args.out))
    for path in written:
        print(f"wrote {path}")
    if args.readme is not None:
        if workflow is None:
            print("not rewriting the README: there is no workflow.json")
            return 1
        text = args.readme.read_text()
        args.readme.write_text(
            replace_between_markers(text, headline(workflow, read_result("comfy_clone", args.out)))
        )
        print(f"rewrote the table between the bench:workflow markers of {args.readme}")
    return 0
