"""``build_app``: the Ray Serve application (ingress + replicas) from :class:`ServeSettings`.

From a config file: ``serve run config.yaml`` with ``import_path: instantid.serve:build_app``
and the settings under ``args`` (docs/serving.md has a complete file). From Python::

    from ray import serve
    from instantid.serve import build_app

    serve.run(build_app({"pipeline": "...", "controlnet": "...", "adapter": "...", "store": "/shared/ids"}))
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from instantid.serve.config import ServeSettings
from instantid.serve.ingress import InstantIDIngress
from instantid.serve.replica import InstantIDModel

__all__ = ["build_app"]


def build_app(args: dict[str, Any] | ServeSettings) -> Application:
    """The application: ``InstantIDIngress`` bound to ``settings.num_replicas`` ``InstantIDModel`` replicas.

    Raises pydantic's ``ValidationError`` (naming each bad key) for settings that do not validate.
    """
    settings = args if isinstance(args, ServeSettings) else ServeSettings.model_validate(args)
    data = settings.model_dump()
    actor_options: dict[str, Any] = {"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus}
    if settings.runtime_env is not None:
        actor_options["runtime_env"] = settings.runtime_env
    model = InstantIDModel.options(  # type: ignore[attr-defined]  # serve.deployment makes it a Deployment
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        health_check_period_s=settings.health_check_period_s,
        ray_actor_options=actor_options,
    ).bind(data)
    ingress_options: dict[str, Any] = {"num_cpus": 0}
    if settings.runtime_env is not None:
        ingress_options["runtime_env"] = settings.runtime_env
    ingress = InstantIDIngress.options(ray_actor_options=ingress_options)  # type: ignore[attr-defined]
    return ingress.bind(model, data)
