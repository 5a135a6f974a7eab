"""Peak memory of loading a full-size InstantID adapter: ``python -m bench adapter_load [--dtype fp16]``.

Writes a random SDXL adapter (70 layers, ~420 M parameters: ~1.7 GB in float32) in both
formats to a temporary folder, then, for each row, loads it in a fresh Python process that has
already imported everything, resets the peak-RSS mark (``/proc/self/clear_refs``) and reports
``VmHWM - VmRSS-before``. Rows:

* ``load_instantid`` on the safetensors file (the target: peak <= 1.2x the file size),
* ``load_instantid`` on the ``.bin`` (zip pickle, memory-mapped),
* the baseline: ``torch.load(weights_only=True)`` of the ``.bin`` without mmap, which reads it all,
* ``load_instantid`` on the safetensors file followed by reading every tensor once (every page of
  the file becomes resident; still no copy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from instantid.testing.adapter_files import random_adapter_state, write_adapter

TARGET_RATIO = 1.2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# Runs in the child: imports first, then the peak mark is reset, then only the load runs.
_MEASURE = r"""
import json, sys, time
import torch
from instantid.weights import load_instantid

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)

mode, path = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
start = time.perf_counter()
if mode == "instantid":
    loaded = load_instantid(path)
elif mode == "instantid+read":
    loaded = load_instantid(path)
    for t in [*loaded.image_proj.values(), *loaded.to_k_ip, *loaded.to_v_ip]:
        t.sum()
elif mode == "torch.load":
    loaded = torch.load(path, map_location="cpu", weights_only=True)
else:
    raise SystemExit(f"unknown mode {mode}")
seconds = time.perf_counter() - start
print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": seconds}))
"""


def measure(mode: str, path: Path) -> dict[str, float]:
    """Peak RSS above the starting RSS (bytes) and seconds for one load in a fresh process."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, mode, str(path)],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"measuring {mode} on {path} failed:\n{result.stderr}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return {"delta": figures["peak"] - figures["before"], "seconds": figures["seconds"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench adapter_load", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the adapter written"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="folder for the files (default: a temp folder)"
    )
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        print("needs Linux /proc/self/clear_refs and /proc/self/status", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.perf_counter()
        image_proj, ip_adapter = random_adapter_state("sdxl", dtype=DTYPES[args.dtype])
        files = {
            fmt: write_adapter(Path(tmp) / f"ip-adapter.{fmt}", image_proj, ip_adapter, fmt)
            for fmt in ("safetensors", "bin")
        }
        del image_proj, ip_adapter
        print(
            f"wrote a random full-size SDXL adapter ({args.dtype}) in both formats in {time.perf_counter() - start:.1f} s\n"
        )

        rows = [
            ("safetensors", "load_instantid", "instantid"),
            ("bin", "load_instantid (mmap)", "instantid"),
            ("bin", "torch.load, no mmap (baseline)", "torch.load"),
            ("safetensors", "load_instantid + read all", "instantid+read"),
        ]
        print(
            f"{'format':<12} {'loader':<32} {'file MiB':>9} {'peak RSS MiB':>13} {'ratio':>6} {'seconds':>8}"
        )
        ratios = {}
        for fmt, label, mode in rows:
            size = files[fmt].stat().st_size
            figures = measure(mode, files[fmt])
            ratio = figures["delta"] / size
            ratios[(fmt, mode)] = ratio
            print(
                f"{fmt:<12} {label:<32} {size / 2**20:>9.0f} {figures['delta'] / 2**20:>13.1f} "
                f"{ratio:>6.3f} {figures['seconds']:>8.2f}"
            )

    ratio = ratios[("safetensors", "instantid")]
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(
        f"\ntarget: load_instantid(.safetensors) peak RSS <= {TARGET_RATIO}x file size: {ratio:.3f}x {verdict}"
    )
    return 0 if verdict == "PASS" else 1
