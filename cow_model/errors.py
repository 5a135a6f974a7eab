"""Exceptions raised by ``cow_model``."""

from __future__ import annotations


class SharedWeightsError(RuntimeError):
    """An operation would change, or has changed, a tensor that a clone shares with its base."""


class UnknownPathError(LookupError):
    """A dotted module path that names no module of the clone; the message lists the closest valid paths."""
