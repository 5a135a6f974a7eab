"""Request bodies: what the HTTP API accepts, validated before anything reaches a replica.

Every function raises a :class:`~instantid.serve.errors.ServeError` naming the field and what
was expected: ``BadRequest`` (400) for bodies that are not what the route reads (not JSON,
unknown fields, wrong JSON types, undecodable images), ``PayloadTooLarge`` (413) for bodies and
images over the limits, ``Unprocessable`` (422) for values out of range.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from instantid.serve.errors import BadRequest, PayloadTooLarge, Unprocessable

__all__ = [
    "GenerateRequest",
    "RegisterRequest",
    "decode_image",
    "parse_json",
    "validated",
]


class GenerateRequest(BaseModel):
    """``POST /generate``. ``identity`` may instead come in the ``serve_multiplexed_model_id`` header."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    identity: str | None = None
    negative_prompt: str = Field("", max_length=4000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float = Field(5.0, ge=0.0, le=50.0)
    weight: float = Field(0.8, ge=0.0, le=5.0, description="identity weight in the UNet's cross-attention")
    identitynet_strength: float = Field(0.8, ge=0.0, le=5.0, description="the IdentityNet ControlNet's scale")
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)
    format: Literal["png", "json"] = "png"
    timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _window(self) -> GenerateRequest:
        if self.start > self.end:
            raise ValueError(f"start ({self.start}) must not exceed end ({self.end})")
        return self


class RegisterRequest(BaseModel):
    """``POST /identities`` as JSON: a base64 ``image`` (PNG, JPEG, WebP ...) or an ``embedding``.

    ``embedding``: 512 numbers, or a list of such (several photos of one person; averaged). With
    an embedding, ``kps`` (five ``[x, y]``) and ``image_size`` place the face in generated
    images; without them it is centred. ``id`` picks the id (else a random one).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = None
    image: str | None = None
    embedding: list[float] | list[list[float]] | None = None
    kps: list[list[float]] | None = None
    image_size: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_face(self) -> RegisterRequest:
        if (self.image is None) == (self.embedding is None):
            raise ValueError("give exactly one of `image` (base64) and `embedding` (512 numbers)")
        if self.image is not None and (self.kps is not None or self.image_size is not None):
            raise ValueError("`kps` and `image_size` go with an `embedding`; an image's come from its face analysis")
        return self


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def validated(model: type[BaseModel], body: Any) -> Any:
    """``model`` validated from ``body`` (a dict); ``BadRequest`` for wrong types or unknown fields,
    ``Unprocessable`` for values out of range, each naming the fields."""
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        kinds = {item["type"] for item in error.errors()}
        range_errors = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error",
                        "string_too_short", "string_too_long", "literal_error"}  # fmt: skip
        cls = Unprocessable if kinds <= range_errors else BadRequest
        raise cls(f"invalid {model.__name__}: {_describe(error)}") from None


def parse_json(body: bytes, max_bytes: int) -> Any:
    """``body`` decoded as JSON; ``PayloadTooLarge`` over ``max_bytes``, ``BadRequest`` for invalid JSON."""
    check_size(body, max_bytes)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"the body is not valid JSON: {error}") from None


def check_size(body: bytes, max_bytes: int) -> None:
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"the body is {len(body):,} bytes; the limit is {max_bytes:,}")


def image_bytes(encoded: str) -> bytes:
    """The bytes of a base64 image (a ``data:image/...;base64,`` prefix allowed)."""
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("`image` is not valid base64") from None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """An image file's bytes as an ``HxWx3`` uint8 RGB array.

    ``PayloadTooLarge`` when width x height exceeds ``max_pixels`` (checked from the header,
    before decoding), ``BadRequest`` when the bytes are not an image PIL reads.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
                )
            return np.asarray(image.convert("RGB"))
    except PayloadTooLarge:
        raise
    except Image.DecompressionBombError:
        raise PayloadTooLarge("the image is too large to decode safely") from None
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise BadRequest(f"cannot read the image: {type(error).__name__}: {error}") from None
