"""Test-only ComfyUI custom node folder: the server's ``clone()`` copies ``model_options`` as since ComfyUI PR #12382.

Never part of a user's install. ``instantid.testing.comfy_install.install_clone_semantics`` copies this
file as ``custom_nodes/clone_semantics_list_dict/__init__.py`` of a private ComfyUI, beside a copy of
``comfy_clone_semantics.py``. ComfyUI imports it at start-up, before any prompt runs; it replaces
``comfy.model_patcher.ModelPatcher.clone`` with ``list_dict_clone`` of the installed one: the installed
``clone()``'s own source with its ``copy.deepcopy(self.model_options)`` swapped for ``deepcopy_list_dict``
(Comfy-Org/ComfyUI PR #12382, merged 2026-02-10), nothing else changed. A ComfyUI whose ``clone()``
already copies that way is left as it is. It registers no node and logs what it did.
"""

import logging

import comfy.model_patcher

from .comfy_clone_semantics import copies_with_list_dict, list_dict_clone

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

_patcher = comfy.model_patcher.ModelPatcher
if copies_with_list_dict(_patcher.__dict__["clone"]):
    logging.info(
        "clone_semantics_list_dict: ModelPatcher.clone already copies model_options with deepcopy_list_dict"
    )
else:
    _patcher.clone = list_dict_clone(_patcher.__dict__["clone"])
    logging.info("clone_semantics_list_dict: ModelPatcher.clone copies model_options with deepcopy_list_dict")
