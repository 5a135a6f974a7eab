"""The errors of the service, each with the HTTP status it is answered with.

Raised by the store, the request parsing and the replicas; the ingress turns any
:class:`ServeError` into ``{"error": message}`` with its ``status``. They cross Ray's process
boundary intact: Ray re-raises a replica's exception as a subclass of its class that forwards
attribute access to it, so ``status`` and ``message`` read the same on the ingress side.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "DeadlineExceeded",
    "IdentityExists",
    "NoFace",
    "PayloadTooLarge",
    "ServeError",
    "UnknownIdentity",
    "Unprocessable",
]


class ServeError(Exception):
    """A request the service answers with ``status`` and ``message`` (never a replica crash)."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServeError):
    """Malformed input: not JSON, wrong types, unknown fields, an undecodable image (400)."""

    status = 400


class UnknownIdentity(ServeError):
    """No identity of that id in the store: never registered, or deleted (404)."""

    status = 404


class IdentityExists(ServeError):
    """A registration asked for an id the store already holds (409)."""

    status = 409


class PayloadTooLarge(ServeError):
    """A body or an image over the configured limits (413)."""

    status = 413


class Unprocessable(ServeError):
    """Well-formed input the service cannot use: values out of range, a bad embedding (422)."""

    status = 422


class NoFace(Unprocessable):
    """The face analysis found no face in the registered image (422)."""


class DeadlineExceeded(ServeError):
    """The request's time limit passed before its image was done (504)."""

    status = 504
