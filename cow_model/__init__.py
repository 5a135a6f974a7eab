"""Copy-on-write clones of ``torch.nn.Module`` trees and of nested option structures.

Nothing here knows about ComfyUI, diffusers or InstantID; their adapters live in
``cow_model.comfy`` and ``cow_model.diffusers``.
"""
