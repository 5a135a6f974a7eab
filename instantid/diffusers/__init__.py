"""InstantID for diffusers pipelines on copy-on-write UNets (imports ``diffusers``).

- :func:`apply_instantid` (pipeline or UNet, adapter, face) -> a pipeline view on a
  copy-on-write UNet clone, or the clone: many identities share one base model.
- :func:`instantid_hooks` installs the same processors in place for a ``with`` block and
  restores the model exactly on exit; the model refuses other threads while it is active.
- :class:`IdentityAttnProcessor`: the attention processor (precomputed identity keys/values).
"""

from instantid.diffusers.hooks import instantid_hooks
from instantid.diffusers.identity import DiffusersIdentity, face_embedding, prepare_identity
from instantid.diffusers.pipeline import FaceTokensControlNet, apply_instantid, identity_unet
from instantid.diffusers.processor import IdentityAttnProcessor, OwnerThreadError, TimestepGate

__all__ = [
    "DiffusersIdentity",
    "FaceTokensControlNet",
    "IdentityAttnProcessor",
    "OwnerThreadError",
    "TimestepGate",
    "apply_instantid",
    "face_embedding",
    "identity_unet",
    "instantid_hooks",
    "prepare_identity",
]
