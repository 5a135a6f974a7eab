"""The service's settings: the ``args`` of ``serve run config.yaml``, or keyword arguments in Python.

One pydantic model validates both (Ray Serve's typed application builders): unknown keys and
wrong types are refused when the application is built, not when the first request arrives.
Ray's own ``deployments:`` section of a config file overrides the replica options set here
(``num_replicas``, ``max_ongoing_requests``, ``ray_actor_options``) per deployment, by name
(``InstantIDModel``, ``InstantIDIngress``).

Whatever builds a model is given either as data (a ``from_pretrained`` path, an adapter file)
or as a callable, or as the import path of one (``"package.module:function"``), which is what a
YAML file can hold. Callables travel to the replicas by reference (cloudpickle) and run there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ServeSettings", "resolve"]

DTYPES = ("float32", "float16", "bfloat16")


def resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """``target`` itself when callable, else the object at ``"module:attribute"`` (``ValueError`` naming it)."""
    if callable(target):
        return target
    module_name, sep, attribute = str(target).partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected an import path 'package.module:attribute', got {target!r}")
    try:
        value = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {target!r}: {error}") from error
    if not callable(value):
        raise ValueError(f"{target!r} is a {type(value).__name__}, not a callable")
    return value


class ServeSettings(BaseModel):
    """Everything ``instantid.serve.build_app`` needs; see docs/serving.md for a full config file.

    Exactly one of ``pipeline`` (a ``from_pretrained`` path or hub id, with ``controlnet`` for
    IdentityNet) and ``pipeline_factory`` (a zero-argument callable returning the pipeline),
    and one of ``adapter`` (an InstantID ``ip-adapter.bin`` / ``.safetensors``) and
    ``adapter_factory`` (a callable taking the pipeline). ``face_models``: an insightface root
    holding ``models/antelopev2`` (without it, registration takes embeddings only).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    store: str = Field(description="identity store: a directory every replica can read, or an fsspec URL")
    pipeline: str | None = None
    pipeline_class: str | None = Field(
        None, description="import path of the pipeline class; default: SDXL ControlNet with `controlnet`, else auto"
    )
    controlnet: str | None = Field(None, description="from_pretrained path of the IdentityNet ControlNet")
    pipeline_factory: str | Callable[[], Any] | None = None
    adapter: str | None = None
    adapter_factory: str | Callable[[Any], Any] | None = None
    face_models: str | None = None
    face_provider: str = "CPU"
    identity_factory: str | Callable[..., Any] | None = Field(
        None,
        description="import path of the class that makes an identity's pipeline (default: copy-on-write views)",
    )
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in each replica")

    identity_memory_mb: float = Field(2048.0, gt=0, description="memory per replica for identities (sizes the LRU)")
    max_identities_per_replica: int | None = Field(None, ge=1, description="caps the LRU size computed from memory")
    sweep_interval_s: float = Field(2.0, gt=0, description="how often replicas drop identities deleted from the store")

    num_replicas: int = Field(1, ge=1)
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(16, ge=1, description="per replica; generations run one at a time")
    health_check_period_s: float = Field(10.0, gt=0)
    runtime_env: dict[str, Any] | None = None

    default_steps: int = Field(30, ge=1)
    max_steps: int = Field(100, ge=1)
    max_side: int = Field(2048, ge=8, description="largest width or height of a generated image")
    max_body_mb: float = Field(16.0, gt=0, description="largest request body")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest registered image (width x height)")
    default_timeout_s: float = Field(300.0, gt=0)
    max_timeout_s: float = Field(1800.0, gt=0)
    retries: int = Field(1, ge=0, description="retries of a generation whose replica died")

    @model_validator(mode="after")
    def _one_source_each(self) -> ServeSettings:
        if (self.pipeline is None) == (self.pipeline_factory is None):
            raise ValueError("give exactly one of `pipeline` (a from_pretrained path) and `pipeline_factory`")
        if (self.adapter is None) == (self.adapter_factory is None):
            raise ValueError("give exactly one of `adapter` (an InstantID adapter file) and `adapter_factory`")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps {self.default_steps} exceeds max_steps {self.max_steps}")
        return self
