"""A local Ray cluster running the ``instantid.serve`` application, for tests and ``bench serve``.

``local_cluster(num_cpus)`` starts Ray on this machine (no dashboard, this checkout first on
every worker's ``sys.path``) and Serve's HTTP proxy on a free port of 127.0.0.1, and shuts both
down on exit, whatever happened. ``deploy(settings)`` (re)deploys the application into it and
returns its base URL. ``replica_actors()`` names the live replicas of a deployment, for tests
that kill one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "instantid"

__all__ = ["APP_NAME", "deploy", "free_port", "local_cluster", "replica_actors", "replica_statuses", "wait_for"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def local_cluster(num_cpus: int = 2) -> Iterator[str]:
    """Ray with ``num_cpus`` CPUs and Serve on 127.0.0.1; yields the HTTP base URL; shuts both down."""
    import ray
    from ray import serve

    path = os.pathsep.join(p for p in (str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_SERVE_LOG_TO_STDERR": "0"}},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def deploy(settings: Any) -> None:
    """Deploy (or update) the application from ``settings`` and wait until it is ready."""
    from ray import serve

    from instantid.serve import build_app

    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")


def replica_actors(deployment: str = "InstantIDModel") -> list[str]:
    """Names of the live replica actors of ``deployment`` (namespace ``serve``)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def replica_statuses(attempts: int = 40) -> dict[str, dict[str, Any]]:
    """``InstantIDModel.status()`` of every live replica, by replica tag: asked through a deployment
    handle until each live replica has answered (Ray routes each call to one of them)."""
    from ray import serve

    handle = serve.get_deployment_handle("InstantIDModel", app_name=APP_NAME)
    wanted = len(replica_actors())
    statuses: dict[str, dict[str, Any]] = {}
    for _ in range(attempts):
        status = handle.status.remote().result(timeout_s=60)
        statuses[status["replica"]] = status
        if len(statuses) >= wanted:
            break
    return statuses


def wait_for(condition: Any, timeout_s: float, interval_s: float = 0.25) -> Any:
    """Poll ``condition()`` until it is truthy (returned) or ``timeout_s`` passed (``TimeoutError``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
