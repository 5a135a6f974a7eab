"""The identity store: one safetensors file per identity in a directory or under any fsspec URL.

An identity is what registration computed once: the face embedding(s) (``[N, 512]`` float32),
the face keypoints (``[5, 2]`` x, y pixels of the registered image, optional) and their image
size, plus metadata (source, creation time, detection box and score). Replicas build views
from it; it is the source of truth: a replica that restarts, or one that never saw the
identity, reads it back from here. The face tokens and K/V are not stored: they depend on the
adapter and per-request options, and a replica recomputes them in milliseconds (and keeps them
in ``instantid.cache``).

Files are ``<root>/<id>.safetensors`` with the tensors ``embedding`` (and ``kps``) and string
metadata ``format``, ``revision`` (new on every write), ``created``, ``source``, ``image_size``.
Writes are atomic: on a local or mounted filesystem the file is written under a temporary
name and hard-linked into place (which also refuses an id that exists); on object stores (s3,
gcs, ...) one PUT is atomic already. Readers never see a half-written identity.

The store holds no state of its own beyond the URL: any number of processes (the ingress, every
replica) may open the same one. An in-memory URL (``memory://``) is per process: fine for a
single process, not for a Ray cluster.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from instantid.serve.errors import IdentityExists, UnknownIdentity, Unprocessable

__all__ = ["FORMAT", "IdentityRecord", "IdentityStore", "check_identity_id", "new_identity_id"]

FORMAT = "instantid-identity/1"
SUFFIX = ".safetensors"
EMBEDDING_DIM = 512
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def new_identity_id() -> str:
    """A fresh random id (32 hex digits)."""
    return uuid.uuid4().hex


def check_identity_id(identity_id: Any) -> str:
    """``identity_id`` if it is a valid id (1-64 of ``A-Z a-z 0-9 _ . -``, not starting with ``.``, ``_``
    or ``-``); raises ``Unprocessable`` naming the rule otherwise (ids become file names)."""
    if not isinstance(identity_id, str) or not _ID.match(identity_id):
        raise Unprocessable(
            f"invalid identity id {identity_id!r}: expected 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return identity_id


@dataclass(frozen=True, eq=False)
class IdentityRecord:
    """One stored identity. ``embedding`` is ``[N, 512]`` float32 (N faces, combined by the replica);
    ``kps`` ``[5, 2]`` float32 pixels in an image of ``image_size`` (width, height), or ``None``."""

    id: str
    embedding: np.ndarray
    kps: np.ndarray | None = None
    image_size: tuple[int, int] | None = None
    source: str = "embedding"
    revision: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        embedding = np.asarray(self.embedding, dtype=np.float32)
        if embedding.ndim == 1:
            embedding = embedding[None]
        if embedding.ndim != 2 or embedding.shape[1] != EMBEDDING_DIM or embedding.shape[0] == 0:
            raise Unprocessable(
                f"a face embedding must be [{EMBEDDING_DIM}] or [N, {EMBEDDING_DIM}] numbers, got shape "
                f"{list(np.shape(self.embedding))}"
            )
        if not np.all(np.isfinite(embedding)) or not np.any(embedding):
            raise Unprocessable("the face embedding must be finite and not all zero")
        object.__setattr__(self, "embedding", np.ascontiguousarray(embedding))
        if self.kps is not None:
            kps = np.asarray(self.kps, dtype=np.float32)
            if kps.shape != (5, 2) or not np.all(np.isfinite(kps)):
                raise Unprocessable(
                    f"keypoints must be 5 finite (x, y) pairs (eyes, nose, mouth corners), got shape {list(kps.shape)}"
                )
            object.__setattr__(self, "kps", np.ascontiguousarray(kps))
        if self.image_size is not None:
            size = tuple(int(v) for v in self.image_size)
            if len(size) != 2 or min(size) <= 0:
                raise Unprocessable(f"image_size must be (width, height) > 0, got {self.image_size!r}")
            object.__setattr__(self, "image_size", size)

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata (no embedding values): what ``GET /identities/{id}`` answers."""
        return {
            "id": self.id,
            "source": self.source,
            "created": self.created,
            "revision": self.revision,
            "faces": int(self.embedding.shape[0]),
            "kps": None if self.kps is None else self.kps.tolist(),
            "image_size": None if self.image_size is None else list(self.image_size),
            **self.extra,
        }

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {"embedding": self.embedding}
        if self.kps is not None:
            tensors["kps"] = self.kps
        metadata = {
            "format": FORMAT,
            "id": self.id,
            "revision": self.revision,
            "created": self.created,
            "source": self.source,
            "extra": json.dumps(self.extra),
        }
        if self.image_size is not None:
            metadata["image_size"] = f"{self.image_size[0]},{self.image_size[1]}"
        return bytes(save(tensors, metadata=metadata))

    @classmethod
    def from_bytes(cls, identity_id: str, data: bytes) -> IdentityRecord:
        """Parse a stored file; ``ValueError`` naming the id when it is not an identity file of this format."""
        from safetensors.numpy import load

        metadata = header_metadata(data)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"identity {identity_id}: not an {FORMAT} file (format {metadata.get('format')!r})")
        tensors = load(data)
        size = metadata.get("image_size")
        return cls(
            id=identity_id,
            embedding=tensors["embedding"],
            kps=tensors.get("kps"),
            image_size=None if not size else tuple(int(v) for v in size.split(",")),  # type: ignore[arg-type]
            source=metadata.get("source", "embedding"),
            revision=metadata["revision"],
            created=metadata.get("created", ""),
            extra=json.loads(metadata.get("extra", "{}")),
        )


def header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("truncated safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return dict(header.get("__metadata__", {}))


class IdentityStore:
    """Identities under ``url`` (a directory path or an fsspec URL: ``file://``, ``s3://bucket/ids``, ...).

    ``put`` writes atomically (``IdentityExists`` for an id already stored), ``get`` reads
    (``UnknownIdentity`` when absent), ``revision`` reads only the file's header, ``delete``
    removes (``UnknownIdentity`` when absent), ``ids`` lists. The directory is created when missing.
    """

    def __init__(self, url: str | os.PathLike[str], **storage_options: Any) -> None:
        import fsspec

        self.url = os.fspath(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self._local = "file" in _protocols(self.fs)
        self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"IdentityStore({self.url!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (IdentityStore, (self.url,))

    def _path(self, identity_id: str) -> str:
        return f"{self.root.rstrip('/')}/{check_identity_id(identity_id)}{SUFFIX}"

    def put(self, record: IdentityRecord) -> IdentityRecord:
        """Store ``record`` under ``record.id``; returns it. Raises ``IdentityExists`` when the id is taken."""
        path, data = self._path(record.id), record.to_bytes()
        if self._local:
            temporary = f"{self.root.rstrip('/')}/.{record.id}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)  # atomic, and fails when the id exists
            except FileExistsError:
                raise IdentityExists(f"identity {record.id!r} already exists; delete it first or pick another id") from None
            finally:
                os.unlink(temporary)
        else:
            if self.fs.exists(path):
                raise IdentityExists(f"identity {record.id!r} already exists; delete it first or pick another id")
            self.fs.pipe_file(path, data)
        return record

    def _read(self, identity_id: str, length: int | None = None) -> bytes:
        path = self._path(identity_id)
        try:
            with self.fs.open(path, "rb") as handle:
                if length is None:
                    return bytes(handle.read())
                (size,) = struct.unpack("<Q", handle.read(8))
                return struct.pack("<Q", size) + bytes(handle.read(size))
        except FileNotFoundError:
            raise UnknownIdentity(f"unknown identity {identity_id!r}: register it with POST /identities") from None

    def get(self, identity_id: str) -> IdentityRecord:
        return IdentityRecord.from_bytes(identity_id, self._read(identity_id))

    def revision(self, identity_id: str) -> str:
        """The stored identity's revision, from its header only (``UnknownIdentity`` when absent)."""
        return header_metadata(self._read(identity_id, length=0))["revision"]

    def exists(self, identity_id: str) -> bool:
        return bool(self.fs.exists(self._path(identity_id)))

    def delete(self, identity_id: str) -> None:
        path = self._path(identity_id)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            raise UnknownIdentity(f"unknown identity {identity_id!r}") from None

    def ids(self) -> list[str]:
        """Every stored id, sorted (temporary files left out)."""
        names = self.fs.ls(self.root, detail=False)
        found = (str(name).rstrip("/").rsplit("/", 1)[-1] for name in names)
        return sorted(n[: -len(SUFFIX)] for n in found if n.endswith(SUFFIX) and not n.startswith("."))


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol
    return set(protocol) if isinstance(protocol, (tuple, list)) else {protocol}
