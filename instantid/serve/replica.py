"""``InstantIDModel``: the replica deployment. One base pipeline per replica, identities as views.

Each replica loads the base pipeline, the adapter and the face analysis once
(:mod:`instantid.serve.pipelines`), then serves identities through Ray Serve's model
multiplexing: requests carry the identity id as their multiplexed model id, Ray routes them to
a replica that holds it, and the replica's loader (``serve.multiplexed``) builds the identity's
view from the store on a miss, evicting the least recently used when it holds
``capacity`` of them. The capacity comes from memory: ``identity_memory_mb`` over what one
identity costs (measured on a probe identity at start-up), capped by
``max_identities_per_replica``.

Serialised: generations (and view builds) run one at a time per replica, in a worker thread,
behind a lock; the face analysis has a lock of its own. Until the diffusers path is safe for
concurrent views on one base (shared tokenizers, per-pipeline state), this is what makes
concurrent requests give what sequential ones would. ``max_ongoing_requests`` only sets how
many may wait.

The store is the source of truth: every generation first reads the identity's revision from
the store's file header, so a deleted identity fails with 404 on every replica at once (and its
view is dropped there), and a re-registered id never serves the old face. Each replica also
sweeps its LRU every ``sweep_interval_s`` and drops identities no longer in the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from ray import serve

from instantid.serve.config import ServeSettings, resolve
from instantid.serve.errors import NoFace, UnknownIdentity, Unprocessable
from instantid.serve.identities import CowViews, LoadedIdentity, ViewOptions, capacity
from instantid.serve.inputs import GenerateRequest
from instantid.serve.pipelines import load_adapter, load_face_analysis, load_pipeline
from instantid.serve.render import image_size, render_png
from instantid.serve.store import IdentityStore

__all__ = ["DEFAULT_OPTIONS", "InstantIDModel"]

logger = logging.getLogger(__name__)

DEFAULT_OPTIONS: ViewOptions = (0.8, 0.0, 1.0)
_MULTIPLEX_ATTRIBUTE = "__serve_multiplex_wrapper"


@serve.deployment(name="InstantIDModel")
class InstantIDModel:
    """A replica: ``generate`` (multiplexed by identity), ``analyze`` (face analysis), ``status``, ``evict``."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        self.settings = ServeSettings.model_validate(settings)
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        torch.set_grad_enabled(False)
        self.store = IdentityStore(self.settings.store)
        self.pipe = load_pipeline(self.settings)
        self.adapter = load_adapter(self.settings, self.pipe)
        self.face_analysis = load_face_analysis(self.settings)
        factory_class = resolve(self.settings.identity_factory) if self.settings.identity_factory else CowViews
        self.factory = factory_class(self.pipe, self.adapter)
        self.bytes_per_identity = int(self.factory.bytes_per_identity())
        self.capacity = capacity(
            self.bytes_per_identity, self.settings.identity_memory_mb, self.settings.max_identities_per_replica
        )
        context = serve.get_replica_context()
        self.replica = f"{context.replica_id.unique_id}-{os.getpid()}"
        self._generation_lock = threading.Lock()
        self._face_lock = threading.Lock()
        self._sweeper: asyncio.Task[None] | None = None

        async def load(identity_id: str) -> LoadedIdentity:
            return await self._load(identity_id)

        self._load_function = load
        self._identity = serve.multiplexed(max_num_models_per_replica=self.capacity)(load)
        logger.info(
            "replica %s: %s per identity, holds %d identities in %g MiB",
            self.replica, f"{self.bytes_per_identity / 2**20:.2f} MiB", self.capacity, self.settings.identity_memory_mb,
        )  # fmt: skip

    # --- the LRU (Ray's multiplexed cache) ---------------------------------------------------------

    def _models(self) -> OrderedDict[str, LoadedIdentity]:
        """The identities this replica holds, least recently used first (Ray's multiplexed LRU)."""
        wrapper = getattr(self._load_function, _MULTIPLEX_ATTRIBUTE, None)
        models = getattr(wrapper, "models", None)  # None until the first identity is asked for
        return OrderedDict() if models is None else models

    def _evict(self, identity_id: str) -> bool:
        """Drop ``identity_id`` from the LRU (and free its view); tells Ray's router at its next push."""
        wrapper = getattr(self._load_function, _MULTIPLEX_ATTRIBUTE, None)
        loaded = self._models().pop(identity_id, None)
        if loaded is None:
            return False
        loaded.release()
        if wrapper is not None:
            wrapper._push_multiplexed_replica_info = True
        logger.info("replica %s: evicted identity %s", self.replica, identity_id)
        return True

    async def _load(self, identity_id: str) -> LoadedIdentity:
        record = await asyncio.to_thread(self.store.get, identity_id)
        loaded = LoadedIdentity(record, self.factory)
        await asyncio.to_thread(self._locked, loaded.pipeline, DEFAULT_OPTIONS)
        return loaded

    def _locked(self, function: Any, *args: Any) -> Any:
        with self._generation_lock:
            return function(*args)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                stored = set(await asyncio.to_thread(self.store.ids))
            except Exception:  # a store that is briefly unreachable must not stop the sweeps
                logger.exception("replica %s: cannot list the identity store", self.replica)
                continue
            for identity_id in [i for i in self._models() if i not in stored]:
                self._evict(identity_id)

    # --- requests ----------------------------------------------------------------------------------

    async def generate(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One image for the request's multiplexed identity. Raises ``UnknownIdentity`` when it is not
        (or no longer) in the store, ``Unprocessable`` for a bad size, ``DeadlineExceeded`` past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        started = time.perf_counter()
        self._start_sweeper()
        request = GenerateRequest.model_validate(body)
        identity_id = serve.get_multiplexed_model_id()
        try:
            revision = await asyncio.to_thread(self.store.revision, identity_id)
        except UnknownIdentity:
            self._evict(identity_id)
            raise
        cold = identity_id not in self._models()
        loaded = await self._identity(identity_id)
        if loaded.released or loaded.record.revision != revision:  # deleted and registered again
            self._evict(identity_id)
            cold, loaded = True, await self._identity(identity_id)
        steps = request.steps or self.settings.default_steps
        if steps > self.settings.max_steps:
            raise Unprocessable(f"steps {steps}: at most {self.settings.max_steps}")
        size = image_size(self.pipe, request, self.settings.max_side)
        options = (request.weight, request.start, request.end)

        def run() -> bytes:
            with self._generation_lock:
                pipe = loaded.pipeline(options)
                return render_png(pipe, loaded.record, request, steps=steps, size=size, deadline=deadline)

        png = await asyncio.to_thread(run)
        return {
            "png": png,
            "identity": identity_id,
            "replica": self.replica,
            "cold": cold,
            "loaded": list(self._models()),
            "capacity": self.capacity,
            "seconds": time.perf_counter() - started,
        }

    async def analyze(self, image: np.ndarray) -> dict[str, Any]:
        """The largest face of ``image`` (HxWx3 uint8 RGB): embedding, keypoints, box, score.
        Raises ``NoFace`` when there is none, ``Unprocessable`` when this deployment has no face models."""
        if self.face_analysis is None:
            raise Unprocessable(
                "this deployment has no face analysis (no `face_models` configured): register an `embedding`"
            )
        from instantid.face import NoFaceDetectedError, analyze_face

        def run() -> Any:
            with self._face_lock:
                return analyze_face(self.face_analysis, image)

        try:
            face = await asyncio.to_thread(run)
        except NoFaceDetectedError as error:
            raise NoFace(str(error)) from None
        except ValueError as error:
            raise Unprocessable(str(error)) from None
        return {
            "embedding": face.embedding,
            "kps": face.kps,
            "bbox": [float(v) for v in face.bbox],
            "det_score": face.det_score,
        }

    async def status(self) -> dict[str, Any]:
        """This replica: its id and process id, the identities it holds (LRU order), capacity, cost per
        identity, and the GPU memory allocated when it runs on CUDA."""
        import torch

        self._start_sweeper()
        cuda = torch.device(self.settings.device).type == "cuda"
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "vram_allocated": torch.cuda.memory_allocated() if cuda else None,
            "loaded": list(self._models()),
            "capacity": self.capacity,
            "bytes_per_identity": self.bytes_per_identity,
            "pipeline": type(self.pipe).__name__,
            "face_analysis": self.face_analysis is not None,
        }

    async def evict(self, identity_id: str) -> bool:
        return self._evict(identity_id)

    def check_health(self) -> None:
        """Ray Serve's health check: the base pipeline is loaded."""
        if self.pipe is None:
            raise RuntimeError("the base pipeline is not loaded")
