"""The node pack on real ComfyUI, end to end: two faces, a stock cloning node, KSampler.

Graph: model -> ApplyInstantID (face A, mask on the left half) -> ApplyInstantID (face B, mask
on the right half) -> RescaleCFG (a stock node that clones the model) -> KSampler, 2 steps, on
tiny SD1.5- and SDXL-architecture models with a tiny ControlNet, face analysis through the real
insightface on small ONNX models. Checked: the result is deterministic, equal to the same graph
with the patches deep-copied the stock way (every tensor copied), and the upstream model's
patches are unchanged after the downstream ones were added. A forward pass calls one patch per
cross-attention layer: 70 on SDXL, 16 on SD1.5, the middle block's included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from instantid.attention import IdentityKV
from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.comfy.patch import IdentityTerm, InstantIDAttn2Patch, attn2_patches
from instantid.testing import comfyui
from tests.comfy.instantid_helpers import (
    face_image,
    pack_nodes,
    shared_adapter,
    shared_patcher,
)

LATENT = 8
MASK_SIZE = (40, 56)
"""Masks of another size than the image: the pack resizes them to each layer's token grid."""


def _half_mask(side: str) -> torch.Tensor:
    mask = torch.zeros(1, *MASK_SIZE)
    half = MASK_SIZE[1] // 2
    if side == "left":
        mask[..., :half] = 1.0
    else:
        mask[..., half:] = 1.0
    return mask


def _two_face_graph(
    comfy: comfyui.ComfyUI, arch: comfyui.Arch, face_app: Any, control_net: Any
) -> tuple[torch.Tensor, Any, dict[Any, Any], dict[Any, list[Any]]]:
    """Run the graph; returns the latent, the first ApplyInstantID's model, and its patches with
    their term lists as they were right after that node ran."""
    base = shared_patcher(comfy, arch)
    weights = shared_adapter(comfy, arch)
    positive = comfyui.conditioning(arch, seed=1)
    negative = comfyui.conditioning(arch, seed=2)
    common = {"instantid": weights, "insightface": face_app, "control_net": control_net, "start_at": 0.0, "end_at": 1.0}
    one, positive, negative = comfyui.run_node(
        pack_nodes(comfy).ApplyInstantID, image=face_image(40, 60), model=base, positive=positive, negative=negative,
        weight=0.8, mask=_half_mask("left"), **common,
    )
    snapshot = attn2_patches(one.model_options)
    terms = {key: tuple(patch.callback) for key, patch in snapshot.items()}
    two, positive, negative = comfyui.run_node(
        pack_nodes(comfy).ApplyInstantID, image=face_image(700, 300), model=one, positive=positive, negative=negative,
        weight=0.6, mask=_half_mask("right"), **common,
    )
    (rescaled,) = comfyui.run_node(comfy.nodes_model_advanced.RescaleCFG, model=two, multiplier=0.7)
    latent = comfyui.ksample(comfy, rescaled, positive, negative, comfyui.empty_latent(comfy, LATENT), steps=2, seed=7)
    return latent, one, snapshot, terms


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_two_faces_deterministic_equal_to_stock_deepcopy_and_upstream_unchanged(
    comfy: comfyui.ComfyUI,
    arch: comfyui.Arch,
    face_app: Any,
    tiny_controlnet: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    control_net = tiny_controlnet(arch)
    first, upstream, snapshot, terms = _two_face_graph(comfy, arch, face_app, control_net)
    assert torch.isfinite(first).all()
    if arch == "sd15":  # the SDXL run below repeats the graph too, with every tensor copied
        again, *_ = _two_face_graph(comfy, arch, face_app, control_net)
        assert torch.equal(first, again), "the graph is not deterministic"

    # upstream: the first ApplyInstantID's patches are the same objects with the same single term
    after = attn2_patches(upstream.model_options)
    assert after.keys() == snapshot.keys() and len(after) == len(cross_attention_sites(diffusion_model_of(upstream)))
    for key, patch in after.items():
        assert patch is snapshot[key] and patch.callback == terms[key] and len(patch.identities) == 1

    for cls in (IdentityKV, IdentityTerm, InstantIDAttn2Patch):
        monkeypatch.setattr(cls, "__deepcopy__", None)  # the stock way: deepcopy copies every tensor
    stock, *_ = _two_face_graph(comfy, arch, face_app, control_net)
    assert torch.equal(first, stock), "sharing the payload changed the result"


def test_identity_changes_the_result(
    comfy: comfyui.ComfyUI, face_app: Any, tiny_controlnet: Callable[..., Any]
) -> None:
    """The identity attention is not a no-op: weight 0.8 vs the same graph without the model patches."""
    control_net = tiny_controlnet("sd15")
    base = shared_patcher(comfy, "sd15")
    inputs = {
        "instantid": shared_adapter(comfy, "sd15"), "insightface": face_app, "control_net": control_net,
        "image": face_image(40, 60), "positive": comfyui.conditioning("sd15", 1),
        "negative": comfyui.conditioning("sd15", 2), "start_at": 0.0, "end_at": 1.0, "weight": 0.8,
    }
    model, positive, negative = comfyui.run_node(pack_nodes(comfy).ApplyInstantID, model=base, **inputs)
    latent = comfyui.empty_latent(comfy, LATENT)
    with_identity = comfyui.ksample(comfy, model, positive, negative, latent, steps=1)
    without = comfyui.ksample(comfy, base, positive, negative, latent, steps=1)
    assert not torch.allclose(with_identity, without, atol=1e-4)


@pytest.mark.parametrize(("arch", "layers"), [("sd15", 16), ("sdxl", 70)])
def test_a_forward_pass_calls_every_layer_patch(
    comfy: comfyui.ComfyUI,
    arch: comfyui.Arch,
    layers: int,
    face_app: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All cross-attention layers get identity attention, the middle block's included; a patch under
    ComfyUI_InstantID's ApplyInstantID middle key ("middle", 1, i) is never called."""
    called: list[tuple[str, int, int]] = []
    original = InstantIDAttn2Patch.__call__

    def counting(self: InstantIDAttn2Patch, q: Any, k: Any, v: Any, extra_options: dict[str, Any]) -> Any:
        called.append((*extra_options["block"], extra_options["block_index"]))
        return original(self, q, k, v, extra_options)

    monkeypatch.setattr(InstantIDAttn2Patch, "__call__", counting)
    model, face_embeds = comfyui.run_node(
        pack_nodes(comfy).InstantIDAttentionPatch, instantid=shared_adapter(comfy, arch), insightface=face_app,
        image=face_image(40, 60), model=shared_patcher(comfy, arch), weight=0.8, start_at=0.0, end_at=1.0, noise=0.0,
    )
    positive, negative = comfyui.conditioning(arch, 1), comfyui.conditioning(arch, 2)
    assert face_embeds["cond"].shape == (1, 16, comfyui.CONTEXT_DIM[arch])
    stock_middle_calls: list[Any] = []

    def stock_middle_key(q: Any, k: Any, v: Any, extra_options: dict[str, Any]) -> Any:
        stock_middle_calls.append(extra_options["block"])
        return comfy.attention.optimized_attention(q, k, v, extra_options["n_heads"])

    model.set_model_attn2_replace(stock_middle_key, "middle", 1, 0)
    comfyui.ksample(comfy, model, positive, negative, comfyui.empty_latent(comfy, LATENT), steps=1)

    expected = {site.key for site in cross_attention_sites(diffusion_model_of(model))}
    assert len(expected) == layers
    assert set(called) == expected
    assert sum(1 for key in expected if key[0] == "middle") == (10 if arch == "sdxl" else 1)
    assert stock_middle_calls == []
