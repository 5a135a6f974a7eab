"""Where bench runs leave their figures: ``bench-out/<scenario>.json`` and ``bench-out/<scenario>.md``.

Every JSON file holds ``{"scenario", "created", "machine", "argv", ...}`` plus the scenario's own
data; :func:`machine` describes the computer it ran on (CPU model and count, memory, torch, GPU).
``python -m bench report`` reads these files back.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPOSITORY_ROOT / "bench-out"
"""The default output folder (git-ignored)."""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """The computer a run was measured on, for the JSON files and the README table."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus": usable_cpus(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "gpu": None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        info["torch"] = None
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line: ``2 CPUs (AMD EPYC ...), 24 GiB, torch 2.13.0+cpu, no GPU``."""
    memory = info.get("memory_bytes")
    parts = [f"{info.get('cpus', '?')} CPUs ({info.get('cpu', '?')})"]
    if memory:
        parts.append(f"{memory / 2**30:.0f} GiB")
    if info.get("torch"):
        parts.append(f"torch {info['torch']}")
    parts.append(f"GPU {info['gpu']}" if info.get("gpu") else "no GPU")
    return ", ".join(parts)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are written with ``str`` (``None`` as an en dash)."""

    def cell(value: Any) -> str:
        return "–" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(
    scenario: str, data: dict[str, Any], markdown: str, out_dir: Path = OUT_DIR
) -> tuple[Path, Path]:
    """Write ``out_dir/<scenario>.json`` (``data`` with the run's header) and ``out_dir/<scenario>.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "scenario": scenario,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "argv": sys.argv[1:],
        **data,
    }
    json_path = out_dir / f"{scenario}.json"
    md_path = out_dir / f"{scenario}.md"
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    header = f"# bench {scenario}\n\nMeasured {document['created']} on {describe_machine(document['machine'])}.\n\n"
    md_path.write_text(header + markdown)
    return json_path, md_path


def read_result(scenario: str, out_dir: Path = OUT_DIR) -> dict[str, Any] | None:
    """``out_dir/<scenario>.json`` as written by :func:`write_result`, or ``None`` when there is none."""
    path = out_dir / f"{scenario}.json"
    return json.loads(path.read_text()) if path.is_file() else None  # type: ignore[no-any-return]
