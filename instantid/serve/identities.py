"""A replica's identities: how a stored identity becomes a pipeline, and what one costs in memory.

:class:`CowViews` (the default) makes each identity a copy-on-write view of the one base
pipeline (:func:`instantid.diffusers.apply_instantid`): every weight shared, the identity owns
its keys/values and a few module shells. :class:`LoadedIdentity` is what Ray's multiplexed LRU
holds per identity: the stored record, its embedding as a tensor, and the view for the options
last asked for (another ``weight``/``start``/``end`` rebuilds the view from cached K/V in
milliseconds). A factory has the interface ``(pipe, adapter)`` with ``build(embedding, options)``
and ``bytes_per_identity()``; ``bench/serve.py`` passes one that deep-copies the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from instantid.serve.store import IdentityRecord

__all__ = ["CowViews", "LoadedIdentity", "ViewOptions", "capacity", "place_kps"]

MiB = 1024 * 1024
ViewOptions = tuple[float, float, float]
"""``(weight, start, end)``: the options baked into a view."""

# Keypoints (left eye, right eye, nose, mouth corners) in units of the face box side, about its
# centre: ArcFace's template proportions. Used for identities registered without keypoints.
FACE_TEMPLATE = np.array([[-0.2, -0.16], [0.2, -0.16], [0.0, 0.065], [-0.165, 0.3], [0.165, 0.3]], np.float32)
FACE_SHARE = 0.5
"""A face placed by the template spans this share of the image's shorter side."""


def place_kps(record: IdentityRecord, width: int, height: int) -> np.ndarray:
    """The identity's keypoints in a ``width`` x ``height`` image: its registered image fitted in
    (uniform scale, centred), or the face template in the middle when it has no keypoints."""
    if record.kps is None or record.image_size is None:
        side = FACE_SHARE * min(width, height)
        return FACE_TEMPLATE * side + np.array([width / 2, height / 2], np.float32)
    source_w, source_h = record.image_size
    scale = min(width / source_w, height / source_h)
    offset = np.array([(width - source_w * scale) / 2, (height - source_h * scale) / 2], np.float32)
    return record.kps * scale + offset


class CowViews:
    """Identities as copy-on-write views of ``pipe`` (nothing of ``pipe`` is changed)."""

    def __init__(self, pipe: Any, adapter: Any) -> None:
        self.pipe, self.adapter = pipe, adapter

    def build(self, embedding: torch.Tensor, options: ViewOptions) -> Any:
        from instantid.diffusers import apply_instantid

        weight, start, end = options
        return apply_instantid(self.pipe, self.adapter, embedding, weight=weight, start=start, end=end)

    def bytes_per_identity(self) -> int:
        """A probe identity's keys/values plus 1 MiB for its module shells (the bound bench
        ``diffusers_identities`` checks)."""
        from instantid.diffusers.identity import payload_bytes

        probe = self.build(torch.randn(1, 512, generator=torch.Generator().manual_seed(0)) * 20, (0.8, 0.0, 1.0))
        return payload_bytes(probe.unet.attn_processors.values()) + MiB


def capacity(bytes_per_identity: int, budget_mb: float, cap: int | None) -> int:
    """Identities one replica holds: ``budget_mb`` over the per-identity bytes, at least 1, at most ``cap``."""
    count = max(1, int(budget_mb * MiB // max(bytes_per_identity, 1)))
    return count if cap is None else min(count, cap)


@dataclass(eq=False)
class LoadedIdentity:
    """One identity in a replica's LRU; ``release`` drops its view (an identity deleted from the store)."""

    record: IdentityRecord
    factory: Any
    view: Any = None
    options: ViewOptions | None = None
    released: bool = field(default=False)

    @property
    def embedding(self) -> torch.Tensor:
        return torch.from_numpy(self.record.embedding).mean(dim=0, keepdim=True)

    def pipeline(self, options: ViewOptions) -> Any:
        """The view for ``options`` (built now unless the last request asked for the same)."""
        if self.released:
            raise RuntimeError(f"identity {self.record.id} was released")
        if self.view is None or self.options != options:
            self.view, self.options = self.factory.build(self.embedding, options), options
        return self.view

    def release(self) -> None:
        self.view, self.options, self.released = None, None, True
