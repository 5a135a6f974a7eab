"""The workflow bench's diagnostic custom node folder, copied into the server's ``custom_nodes`` by the bench.

Never part of a user's install: ``python -m bench workflow`` writes this file as
``custom_nodes/instantid_bench/__init__.py`` of its private ComfyUI. It registers no node; it adds

* ``GET /instantid_bench/memory``: ``{"layout", "rss", "rss_peak", "cuda"}`` of the server process:
  resident memory now and its peak (``VmHWM``), and on a GPU ``max_allocated`` /
  ``max_reserved`` (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``) and
  ``driver_used_peak`` (the device's used memory, ``total - free`` from ``cudaMemGetInfo``,
  sampled every 10 ms: the driver's figure, context included);
* ``POST /instantid_bench/reset``: starts a new peak for all of them (``/proc/self/clear_refs``
  for ``VmHWM``, ``torch.cuda.reset_peak_memory_stats``, the sampler's maximum).

With ``INSTANTID_BENCH_LAYOUT=stock`` in the server's environment it also emulates the original
ComfyUI_InstantID's patch layout on this pack's nodes: after each Apply InstantID, every attn2
patch of the new model also holds the InstantID adapter as one ``nn.Module`` (Resampler and
every ``to_k_ip`` / ``to_v_ip``, on the model's device in its dtype), as the original's
``Attn2Replace`` holds it in its kwargs lists. So every later ``ModelPatcher.clone()`` with the
stock deep copy copies that module (once per clone, through the deep copy's memo), exactly what
it costs with the original pack; with ``COW_MODEL_COMFY_CLONE=1`` the module is shared. What the
patches compute while sampling stays this pack's (the original recomputes K/V per step:
``python -m bench comfy_sampling`` measures that separately).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any

import torch

log = logging.getLogger("instantid_bench")

LAYOUT = os.environ.get("INSTANTID_BENCH_LAYOUT", "pack")
NODE_CLASS_MAPPINGS: dict[str, Any] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _DriverPeak:
    """Samples the device's used memory (``total - free``) every ``interval`` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0
        self._thread = threading.Thread(target=self._run, name="instantid-bench-vram", daemon=True)
        self._thread.start()

    def used(self) -> int:
        free, total = torch.cuda.mem_get_info()
        return int(total - free)

    def _run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.used())
            except Exception:  # the driver went away (shutdown): stop sampling
                return
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = self.used()


_driver: _DriverPeak | None = None


def memory() -> dict[str, Any]:
    """What ``GET /instantid_bench/memory`` answers (see the module docstring)."""
    rss, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
    cuda = None
    if torch.cuda.is_available():
        cuda = {
            "device": torch.cuda.get_device_name(),
            "max_allocated": torch.cuda.max_memory_allocated(),
            "max_reserved": torch.cuda.max_memory_reserved(),
            "allocated": torch.cuda.memory_allocated(),
            "driver_used_peak": _driver.peak if _driver is not None else None,
            "total": torch.cuda.mem_get_info()[1],
        }
    return {
        "layout": LAYOUT,
        "rss": None if rss is None else rss * 1024,
        "rss_peak": None if hwm is None else hwm * 1024,
        "cuda": cuda,
    }


def reset() -> dict[str, Any]:
    """Start new peaks (see the module docstring); returns :func:`memory` right after."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
    except OSError as err:
        log.warning("cannot reset the RSS peak: %s", err)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        if _driver is not None:
            _driver.reset()
    return memory()


# --- the original pack's layout ---------------------------------------------------------------


class StockLayoutAdapter(torch.nn.Module):
    """The adapter's tensors as one module, as the original pack keeps its ``InstantID`` model in each patch."""

    def __init__(self, weights: Any, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        tensors = {f"image_proj.{k}": v for k, v in weights.image_proj.items()}
        for i, (k, v) in enumerate(zip(weights.to_k_ip, weights.to_v_ip, strict=True)):
            tensors[f"ip.{2 * i + 1}.to_k_ip"], tensors[f"ip.{2 * i + 1}.to_v_ip"] = k, v
        with torch.inference_mode(False):
            for i, tensor in enumerate(tensors.values()):
                self.register_buffer(f"t{i}", tensor.to(device, dtype, copy=True))
        self.names = list(tensors)


_modules: dict[tuple[int, str, torch.dtype], tuple[Any, StockLayoutAdapter]] = {}


def _adapter_module(weights: Any, device: Any, dtype: torch.dtype) -> StockLayoutAdapter:
    """One module per adapter, device and dtype (the original builds one per node and reuses it)."""
    key = (id(weights), str(device), dtype)
    if key not in _modules:
        _modules[key] = (
            weights,
            StockLayoutAdapter(weights, device, dtype),
        )  # holds weights: ids stay unique
    return _modules[key][1]


def _install_stock_layout() -> bool:
    """Wrap this pack's ``apply_identity`` (as ``instantid.comfy.nodes`` calls it); ``False`` until it is imported."""
    import sys

    nodes = sys.modules.get("instantid.comfy.nodes")
    if nodes is None:
        return False
    original = nodes.apply_identity
    if getattr(original, "__instantid_bench__", False):
        return True
    from instantid.comfy.apply import compute_dtype
    from instantid.comfy.patch import attn2_patches

    @functools.wraps(original)
    def apply_identity(model: Any, weights: Any, *args: Any, **kwargs: Any) -> Any:
        work = original(model, weights, *args, **kwargs)
        module = _adapter_module(weights, work.load_device, compute_dtype(work))
        for patch in attn2_patches(work.model_options).values():
            held = getattr(patch, "stock_layout_adapters", [])
            patch.stock_layout_adapters = [*held, module]  # this clone's own patch copy
        return work

    apply_identity.__instantid_bench__ = True  # type: ignore[attr-defined]
    nodes.apply_identity = apply_identity
    log.info("instantid_bench: the original pack's layout (adapter module in every attn2 patch)")
    return True


def _wrap_executor() -> None:
    """Install the stock layout before the first prompt runs (the pack may load after this folder)."""
    import execution

    execute = execution.PromptExecutor.execute
    if getattr(execute, "__instantid_bench__", False):
        return

    @functools.wraps(execute)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _install_stock_layout():
            raise RuntimeError(
                "instantid_bench: instantid.comfy.nodes was not loaded; cannot emulate the layout"
            )
        return execute(self, *args, **kwargs)

    wrapped.__instantid_bench__ = True  # type: ignore[attr-defined]
    execution.PromptExecutor.execute = wrapped


def _register_routes() -> None:
    from aiohttp import web
    from server import PromptServer

    routes = PromptServer.instance.routes

    @routes.get("/instantid_bench/memory")
    async def get_memory(request: web.Request) -> web.Response:
        return web.json_response(memory())

    @routes.post("/instantid_bench/reset")
    async def post_reset(request: web.Request) -> web.Response:
        return web.json_response(reset())


def _setup() -> None:
    global _driver
    if torch.cuda.is_available():
        _driver = _DriverPeak()
    _register_routes()
    if LAYOUT == "stock":
        _wrap_executor()
    elif LAYOUT == "original":  # the original pack runs; the switch comes from cow_model on PYTHONPATH
        from cow_model.comfy import install_from_env

        install_from_env()


if __name__ != "__main__" and os.environ.get("INSTANTID_BENCH_PLUGIN") == "1":
    _setup()
