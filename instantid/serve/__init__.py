"""InstantID as a Ray Serve application: one base pipeline per replica, identities multiplexed as views.

Needs the ``serve`` extra (``ray[serve]``) beside ``diffusers`` and ``face``. Modules, one job each:

- ``store``: the identity store (a directory or fsspec URL; one safetensors file per identity).
- ``config``: :class:`ServeSettings`, the application's settings (``serve run`` args or Python).
- ``pipelines``: what a replica loads once (base pipeline, adapter, face analysis).
- ``identities``: an identity's view and its memory cost (sizes the multiplexed LRU).
- ``render``: one generation, within a deadline.
- ``replica``: the ``InstantIDModel`` deployment (``@serve.multiplexed`` identities).
- ``ingress``: the ``InstantIDIngress`` deployment (the HTTP API).
- ``app``: :func:`build_app`, the two bound together.

See docs/serving.md.
"""

from instantid.serve.app import build_app
from instantid.serve.config import ServeSettings
from instantid.serve.store import IdentityRecord, IdentityStore

__all__ = ["IdentityRecord", "IdentityStore", "ServeSettings", "build_app"]
