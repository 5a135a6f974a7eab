"""InstantID as a Ray Serve application: one base pipeline per replica, identities multiplexed as views.

Needs the ``serve`` extra (``ray[serve]``) beside ``diffusers`` and ``face``. Modules, one job each:

- ``store``: the identity store (a directory or fsspec URL; one safetensors file per identity).
- ``config``: :class:`ServeSettings`, the application's settings (``serve run`` args or Python).
- ``inputs`` / ``errors``: request bodies, and the errors with their HTTP status.
- ``pipelines``: what a replica loads once (base pipeline, adapter, face analysis).
- ``identities``: an identity's view and its memory cost (sizes the multiplexed LRU).
- ``render``: one generation, within a deadline.
- ``replica``: the ``InstantIDModel`` deployment (``@serve.multiplexed`` identities).
- ``ingress``: the ``InstantIDIngress`` deployment (the HTTP API).
- ``app``: :func:`build_app`, the two bound together (``import_path: instantid.serve:build_app``).

Importing this package does not import Ray; ``build_app`` does. See docs/serving.md.
"""

from typing import Any

from instantid.serve.config import ServeSettings
from instantid.serve.store import IdentityRecord, IdentityStore

__all__ = ["IdentityRecord", "IdentityStore", "ServeSettings", "build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from instantid.serve.app import build_app

        return build_app
    raise AttributeError(f"module 'instantid.serve' has no attribute {name!r}")
