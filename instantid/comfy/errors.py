"""The error the node pack raises for bad input (ComfyUI shows its message in the UI)."""

from __future__ import annotations


class InstantIDNodeError(ValueError):
    """Bad input to an InstantID node; the message says what was wrong and what was expected."""
