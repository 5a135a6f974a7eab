"""The InstantID caches inside a running ComfyUI: HTTP routes, a log line per run, cleared on "free memory".

:func:`install` (run when the node pack loads) does, each at most once per process:

- with a ComfyUI server (``server.PromptServer.instance``): ``GET /instantid/cache`` answers the
  caches' stats as JSON (``instantid.cache.InstantIDCaches.stats``: per layer hits, misses, evictions,
  bytes, hit rate, time saved; and totals), ``POST /instantid/cache/clear`` empties them and answers
  the stats;
- wraps ``execution.PromptExecutor.execute`` so that each workflow run that looked anything up in the
  caches logs one info line: that run's hits per layer, the bytes held and the time saved;
- clears the caches when ComfyUI is asked to free memory: ``POST /free`` with ``unload_models`` or
  ``free_memory`` (the UI's "Unload models" / "Free model and node cache" buttons) sets that flag on
  the prompt queue (``PromptQueue.set_flag``, wrapped: cleared at once, not when the worker next
  wakes), and the worker then calls ``comfy.model_management.unload_all_models`` (wrapped too, for
  every other caller).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from instantid.cache import LAYERS, caches

logger = logging.getLogger(__name__)

_installed: dict[str, Callable[..., Any]] = {}
"""What this module installed, by name: the wrapper functions (recognised by identity, never by attribute)."""


def _counts() -> dict[str, tuple[int, int]]:
    layers = caches().stats()["layers"]
    return {name: (s["hits"], s["misses"]) for name, s in layers.items()}


def run_summary(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str | None:
    """The info line for one run from the counters before and after it; ``None`` when it looked nothing up."""
    parts = []
    for name in LAYERS:
        if name in before and name in after:
            hits = after[name][0] - before[name][0]
            lookups = hits + after[name][1] - before[name][1]
            if lookups:
                parts.append(f"{name} {hits}/{lookups}")
    if not parts:
        return None
    stats = caches().stats()
    return (
        f"InstantID cache this run: hits {', '.join(parts)}; {stats['bytes'] / 2**20:.1f} MiB held, "
        f"{stats['time_saved_s'] * 1e3:.0f} ms saved in total"
    )


def _wrap_execute(executor_cls: Any) -> None:
    original = executor_cls.execute
    if original is _installed.get("execute"):
        return

    @functools.wraps(original)
    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        before = _counts()
        try:
            return original(self, *args, **kwargs)
        finally:
            line = run_summary(before, _counts())
            if line:
                logger.info(line)

    executor_cls.execute = execute
    _installed["execute"] = execute


def _wrap_unload(model_management: Any) -> None:
    original = model_management.unload_all_models
    if original is _installed.get("unload_all_models"):
        return

    @functools.wraps(original)
    def unload_all_models(*args: Any, **kwargs: Any) -> Any:
        caches().clear()
        logger.info("InstantID caches cleared (ComfyUI unloads all models)")
        return original(*args, **kwargs)

    model_management.unload_all_models = unload_all_models
    _installed["unload_all_models"] = unload_all_models


FREE_FLAGS = ("unload_models", "free_memory")


def _wrap_set_flag(queue_cls: Any) -> None:
    original = queue_cls.set_flag
    if original is _installed.get("set_flag"):
        return

    @functools.wraps(original)
    def set_flag(self: Any, name: str, data: Any) -> Any:
        if name in FREE_FLAGS and data:
            caches().clear()
            logger.info("InstantID caches cleared (ComfyUI was asked to %s)", name.replace("_", " "))
        return original(self, name, data)

    queue_cls.set_flag = set_flag
    _installed["set_flag"] = set_flag


def _add_routes(prompt_server: Any) -> None:
    if _installed.get("routes_for") is prompt_server:
        return
    from aiohttp import web

    routes = prompt_server.routes

    @routes.get("/instantid/cache")
    async def get_cache(request: Any) -> Any:
        return web.json_response(caches().stats())

    @routes.post("/instantid/cache/clear")
    async def clear_cache(request: Any) -> Any:
        caches().clear()
        logger.info("InstantID caches cleared (POST /instantid/cache/clear)")
        return web.json_response(caches().stats())

    _installed["routes_for"] = prompt_server


def install() -> None:
    """Install the routes (when a ComfyUI server exists), the per-run log line and the clear on unload.

    Each part is skipped when the ComfyUI module it needs is not imported (e.g. the nodes used as a
    library); failures are logged, never raised: the nodes work without telemetry.
    """
    try:
        model_management = sys.modules.get("comfy.model_management")
        if model_management is not None:
            _wrap_unload(model_management)
        execution = sys.modules.get("execution")
        if execution is not None and hasattr(execution, "PromptExecutor"):
            _wrap_execute(execution.PromptExecutor)
        if execution is not None and hasattr(getattr(execution, "PromptQueue", None), "set_flag"):
            _wrap_set_flag(execution.PromptQueue)
        server = sys.modules.get("server")
        prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
        if prompt_server is not None:
            _add_routes(prompt_server)
    except Exception:
        logger.exception("InstantID cache telemetry could not be installed; the nodes work without it")
