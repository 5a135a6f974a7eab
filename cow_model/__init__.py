"""Copy-on-write clones of ``torch.nn.Module`` trees and of nested option structures.

- ``LazyClonedModel(base)``: a transparent proxy sharing every tensor of ``base``;
  ``patch_block(path, fn)`` copies only the module at ``path`` and its ancestors.
- ``cow_copy(options)``: ``copy.deepcopy`` semantics, sharing tensors, modules, functions and
  objects declared shareable (``__cow_shared__ = True`` or ``register_shared(cls)``).
- ``PatchCache()``: memoizes what a patch derives from tensors, invalidated exactly
  (same tensor objects, data pointers and version counters).

Nothing here knows about ComfyUI, diffusers or InstantID; their adapters live in
``cow_model.comfy`` and ``cow_model.diffusers``.
"""

from .cache import PatchCache
from .clone import LazyClonedModel, register_scoped_method
from .errors import SharedWeightsError, UnknownPathError
from .options import cow_copy, is_shared, register_shared
from .stateless import _reparametrize_module as _reparametrize_module  # functional_call on clones' shells

__all__ = [
    "LazyClonedModel",
    "PatchCache",
    "SharedWeightsError",
    "UnknownPathError",
    "cow_copy",
    "is_shared",
    "register_scoped_method",
    "register_shared",
]
