"""``InstantIDIngress``: the HTTP API, in front of the ``InstantIDModel`` replicas.

Routes (JSON answers; every error is ``{"error": message}`` with a 4xx/5xx status):

- ``POST /identities``: a face image (raw ``image/*`` body, or JSON ``{"image": base64}``) or
  an embedding (JSON ``{"embedding": [512 numbers], "kps": ..., "image_size": ...}``); optional
  ``id`` (JSON field or ``?id=`` query). The face analysis runs once on a replica, the result
  goes to the store. Answers 201 with the identity's metadata, ``id`` included.
- ``GET /identities``: the stored ids. ``GET /identities/{id}``: one identity's metadata.
- ``DELETE /identities/{id}``: removes it from the store; every replica refuses it from then on
  and drops its view (at once on a request for it, else within ``sweep_interval_s``).
- ``POST /generate``: JSON :class:`~instantid.serve.inputs.GenerateRequest`; the identity id in
  the ``serve_multiplexed_model_id`` header or the body's ``identity``. Answers PNG bytes, or
  ``{"image": base64 PNG, ...}`` with ``"format": "json"``. Response headers
  ``x-instantid-replica`` (which replica generated it) and ``x-instantid-cold`` (``1`` when
  that replica had to load the identity for it).
- ``GET /health``: the store and one replica's status.

A generation whose replica dies is retried (``retries``, default once: a seed gives the same
image on any replica); past its ``timeout_s`` a request answers 504 and is cancelled.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime.
import asyncio
import base64
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from instantid.serve.config import ServeSettings
from instantid.serve.errors import BadRequest, DeadlineExceeded, ServeError
from instantid.serve.inputs import (
    GenerateRequest,
    RegisterRequest,
    check_size,
    decode_image,
    image_bytes,
    parse_json,
    validated,
)
from instantid.serve.store import IdentityRecord, IdentityStore, check_identity_id, new_identity_id

__all__ = ["MULTIPLEXED_HEADER", "InstantIDIngress", "api"]

logger = logging.getLogger(__name__)

MULTIPLEXED_HEADER = "serve_multiplexed_model_id"
TIMEOUT_GRACE_S = 5.0
"""How much longer than a request's ``timeout_s`` the ingress waits for the replica's own 504."""

api = FastAPI(title="InstantID (copy-on-write identities on Ray Serve)")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@api.exception_handler(ServeError)
async def _serve_error(request: Request, error: ServeError) -> JSONResponse:
    return _error(error.status, error.message)


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    return _error(500, f"internal error: {type(error).__name__}: {error}")


def _replica_error(error: RayTaskError) -> Exception:
    """The error a replica raised: a ``ServeError`` as it is, anything else as a 500 naming it."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, ServeError):
        return cause
    described = f"{type(cause).__name__}: {cause}" if cause is not None else str(error).splitlines()[0]
    return ServeError(f"the replica failed: {described}")


def _header_identity(request: Request) -> str | None:
    for name in (MULTIPLEXED_HEADER, MULTIPLEXED_HEADER.replace("_", "-")):
        if name in request.headers:
            return request.headers[name]
    return serve.get_multiplexed_model_id() or None


@serve.deployment(name="InstantIDIngress")
@serve.ingress(api)
class InstantIDIngress:
    """The HTTP routes; ``model`` is the handle of the ``InstantIDModel`` deployment."""

    def __init__(self, model: Any, settings: dict[str, Any]) -> None:
        self.model = model
        self.settings = ServeSettings.model_validate(settings)
        self.store = IdentityStore(self.settings.store)
        self.max_body = int(self.settings.max_body_mb * 2**20)

    async def _call(self, method: str, *args: Any, identity: str | None = None, timeout_s: float) -> Any:
        handle = self.model if identity is None else self.model.options(multiplexed_model_id=identity)
        for attempt in range(self.settings.retries + 1):
            response = getattr(handle, method).remote(*args)
            try:
                return await asyncio.wait_for(response, timeout_s + TIMEOUT_GRACE_S)
            except asyncio.TimeoutError:
                response.cancel()
                raise DeadlineExceeded(f"no answer within the request's time limit of {timeout_s:g} s") from None
            except RayTaskError as error:
                raise _replica_error(error) from None
            except RayActorError as error:  # the replica died (killed, out of memory): Ray starts another
                if attempt == self.settings.retries:
                    raise ServeError(f"the replica died while serving the request: {error}") from None
                logger.warning("replica died during %s (attempt %d); retrying", method, attempt + 1)
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        ids = await asyncio.to_thread(self.store.ids)
        replica = await self._call("status", timeout_s=self.settings.default_timeout_s)
        return {"status": "ok", "store": self.store.url, "identities": len(ids), "replica": replica}

    @api.post("/identities", status_code=201)
    async def register(self, request: Request) -> JSONResponse:
        body = await request.body()
        check_size(body, self.max_body)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        image: bytes | None
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            identity_id, image, embedding = request.query_params.get("id"), body, None
            kps = size = None
        else:
            parsed = validated(RegisterRequest, parse_json(body, self.max_body))
            identity_id = parsed.id or request.query_params.get("id")
            embedding, kps, size = parsed.embedding, parsed.kps, parsed.image_size
            image = None if parsed.image is None else image_bytes(parsed.image)
        identity_id = check_identity_id(identity_id) if identity_id is not None else new_identity_id()
        if image is not None:
            pixels = decode_image(image, self.settings.max_image_pixels)
            face = await self._call("analyze", pixels, timeout_s=self.settings.default_timeout_s)
            record = IdentityRecord(
                identity_id,
                face["embedding"],
                kps=face["kps"],
                image_size=(pixels.shape[1], pixels.shape[0]),
                source="image",
                extra={"bbox": face["bbox"], "det_score": face["det_score"]},
            )
        else:
            record = IdentityRecord(identity_id, np.asarray(embedding, dtype=np.float32), kps=kps, image_size=size)
        await asyncio.to_thread(self.store.put, record)
        return JSONResponse(record.describe(), status_code=201)

    @api.get("/identities")
    async def list_identities(self) -> dict[str, Any]:
        return {"ids": await asyncio.to_thread(self.store.ids)}

    @api.get("/identities/{identity_id}")
    async def get_identity(self, identity_id: str) -> dict[str, Any]:
        record = await asyncio.to_thread(self.store.get, check_identity_id(identity_id))
        return record.describe()

    @api.delete("/identities/{identity_id}")
    async def delete_identity(self, identity_id: str) -> dict[str, Any]:
        await asyncio.to_thread(self.store.delete, check_identity_id(identity_id))
        return {"deleted": identity_id}

    @api.post("/generate")
    async def generate(self, request: Request) -> Response:
        body = parse_json(await request.body(), self.max_body)
        parsed: GenerateRequest = validated(GenerateRequest, body)
        header = _header_identity(request)
        if header and parsed.identity and header != parsed.identity:
            raise BadRequest(
                f"the {MULTIPLEXED_HEADER} header ({header!r}) and the body's identity ({parsed.identity!r}) differ"
            )
        identity = parsed.identity or header
        if not identity:
            raise BadRequest(f"no identity: give it in the {MULTIPLEXED_HEADER} header or as the body's `identity`")
        identity = check_identity_id(identity)
        await asyncio.to_thread(self.store.revision, identity)  # unknown: 404 here, without a replica round trip
        timeout_s = min(parsed.timeout_s or self.settings.default_timeout_s, self.settings.max_timeout_s)
        result = await self._call("generate", body, timeout_s, identity=identity, timeout_s=timeout_s)
        headers = {
            "x-instantid-identity": identity,
            "x-instantid-replica": result["replica"],
            "x-instantid-cold": "1" if result["cold"] else "0",
        }
        if parsed.format == "png":
            return Response(result["png"], media_type="image/png", headers=headers)
        info = {key: value for key, value in result.items() if key != "png"}
        return JSONResponse({"image": base64.b64encode(result["png"]).decode("ascii"), **info}, headers=headers)
