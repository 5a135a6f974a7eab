"""The attn2 replace patch objects: what deep copies share and copy, what a call computes, stacking faces."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from instantid.attention import IdentityKV, face_tokens, identity_attention
from instantid.comfy.apply import apply_identity
from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.comfy.errors import InstantIDNodeError
from instantid.comfy.patch import IdentityTerm, InstantIDAttn2Patch, add_identity_patch, attn2_patches
from instantid.testing import comfyui
from instantid.testing.comfy_clone_semantics import shares_patch_objects
from tests.comfy.instantid_helpers import face_embedding, shared_adapter, shared_patcher

HEADS = 2
WIDTH = 32


def _kv(seed: int) -> IdentityKV:
    generator = torch.Generator().manual_seed(seed)
    return IdentityKV(torch.randn(2, 1, 16, WIDTH, generator=generator), torch.randn(2, 1, 16, WIDTH, generator=generator))


def _qkv(seed: int = 5, batch: int = 2, tokens: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, WIDTH, generator=generator)
    k = torch.randn(batch, 7, WIDTH, generator=generator)
    v = torch.randn(batch, 7, WIDTH, generator=generator)
    return q, k, v


def _options(sigma: float, cond_or_uncond: list[int] | None = None) -> dict[str, Any]:
    return {
        "n_heads": HEADS,
        "cond_or_uncond": cond_or_uncond or [0, 1],
        "sigmas": torch.tensor([sigma, sigma]),
        "original_shape": [2, 4, 4, 4],
    }


def _patch_with(*terms: tuple[IdentityTerm, float, float]) -> InstantIDAttn2Patch:
    patch = InstantIDAttn2Patch()
    for term, start, end in terms:
        patch = patch.with_identity(term, start, end)
    return patch


@pytest.fixture
def stock_deepcopy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Patch objects deep-copied the stock way: every tensor copied, as with ComfyUI_InstantID's patches."""
    for cls in (IdentityKV, IdentityTerm, InstantIDAttn2Patch):
        monkeypatch.setattr(cls, "__deepcopy__", None)
    yield


def test_deep_copy_is_a_new_patch_sharing_the_immutable_terms(comfy: comfyui.ComfyUI) -> None:
    term = IdentityTerm(_kv(0), 0.8, None)
    patch = _patch_with((term, 10.0, 0.0))
    clone = copy.deepcopy(patch)
    assert clone is not patch
    assert clone.callback is patch.callback and clone.kwargs is patch.kwargs  # tuples of immutable terms
    assert clone.identities[0] is term
    assert clone.identities[0].kv.k is term.kv.k  # the K/V tensors are shared, never copied

    clone.add(IdentityTerm(_kv(1), 0.5, None), sigma_start=10.0, sigma_end=0.0)  # another pack's in-place add
    assert len(clone.identities) == 2
    assert len(patch.identities) == 1, "adding to a copy changed the original"


def test_with_identity_is_a_new_patch_and_leaves_this_one(comfy: comfyui.ComfyUI) -> None:
    first = IdentityTerm(_kv(0), 0.8, None)
    patch = _patch_with((first, 10.0, 0.0))
    callback, kwargs = patch.callback, patch.kwargs
    second = IdentityTerm(_kv(1), 0.5, None)
    grown = patch.with_identity(second, 10.0, 0.0)
    assert grown is not patch and grown.identities == (first, second)
    assert patch.callback is callback and patch.kwargs is kwargs and patch.identities == (first,)
    assert grown.identities[0] is first and grown.kwargs[0] is kwargs[0]


def test_identity_term_is_immutable() -> None:
    term = IdentityTerm(_kv(0), 0.8, None)
    with pytest.raises(AttributeError):
        term.weight = 2.0  # type: ignore[misc]


def test_stock_deep_copy_copies_the_tensors(comfy: comfyui.ComfyUI, stock_deepcopy: None) -> None:
    term = IdentityTerm(_kv(0), 0.8, None)
    clone = copy.deepcopy(_patch_with((term, 10.0, 0.0)))
    copied = clone.identities[0]
    assert copied is not term
    assert copied.kv.k.data_ptr() != term.kv.k.data_ptr()
    assert torch.equal(copied.kv.k, term.kv.k)


def test_call_adds_each_term_within_its_sigma_range(comfy: comfyui.ComfyUI) -> None:
    q, k, v = _qkv()
    attention = comfy.attention.optimized_attention
    early = IdentityTerm(_kv(0), 0.8, None)  # active for sigma in [5, 14]
    late = IdentityTerm(_kv(1), 0.3, None)  # active for sigma in [0, 5]
    patch = _patch_with((early, 14.0, 5.0), (late, 5.0, 0.0))

    def term(t: IdentityTerm) -> torch.Tensor:
        return identity_attention(q, t.kv, heads=HEADS, weight=t.weight, cond_or_uncond=[0, 1], attention=attention)

    base = attention(q, k, v, HEADS)
    torch.testing.assert_close(patch(q, k, v, _options(10.0)), base + term(early))
    torch.testing.assert_close(patch(q, k, v, _options(1.0)), base + term(late))
    torch.testing.assert_close(patch(q, k, v, _options(5.0)), base + term(early) + term(late))
    torch.testing.assert_close(patch(q, k, v, _options(20.0)), base)


def test_foreign_terms_follow_the_attn2replace_protocol(comfy: comfyui.ComfyUI) -> None:
    """An IP-Adapter applied after InstantID calls ``add`` on this patch; its arguments are deep-copied as before."""
    seen: list[dict[str, Any]] = []
    payload = torch.ones(3)

    def foreign(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any], **kw: Any) -> torch.Tensor:
        seen.append(kw)
        return torch.full_like(out, kw["value"])

    q, k, v = _qkv()
    patch = _patch_with((IdentityTerm(_kv(0), 0.0, None), 14.0, 0.0))
    patch.add(foreign, value=2.0, payload=payload, sigma_start=14.0, sigma_end=0.0)
    base = comfy.attention.optimized_attention(q, k, v, HEADS)
    torch.testing.assert_close(patch(q, k, v, _options(3.0)), base + 2.0)
    assert seen[0]["payload"] is payload

    clone = copy.deepcopy(patch)
    assert clone.kwargs[1]["payload"] is not payload and torch.equal(clone.kwargs[1]["payload"], payload)
    assert clone.identities[0] is patch.identities[0]


def test_add_needs_the_sigma_range() -> None:
    with pytest.raises(TypeError, match="sigma_start"):
        InstantIDAttn2Patch().add(lambda *a, **k: 0, sigma_end=0.0)


def test_a_replace_without_add_becomes_the_base(comfy: comfyui.ComfyUI) -> None:
    """Another pack's plain replace function stays in charge of the layer's own attention."""
    patcher = comfyui.tiny_sd15_patcher(comfy)
    calls: list[tuple[Any, ...]] = []

    def other(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        calls.append(extra["block"])
        return torch.zeros_like(q)

    key = ("input", 1, 0)
    patcher.set_model_attn2_replace(other, *key)
    clone = patcher.clone()
    term = IdentityTerm(_kv(0), 1.0, None)
    add_identity_patch(clone, key, term, 14.0, 0.0)
    installed = attn2_patches(clone.model_options)[key]
    assert isinstance(installed, InstantIDAttn2Patch) and installed.base is other
    assert attn2_patches(patcher.model_options)[key] is other

    q, k, v = _qkv()
    expected = identity_attention(q, term.kv, heads=HEADS, weight=1.0, cond_or_uncond=[0, 1])
    torch.testing.assert_close(installed(q, k, v, _options(3.0) | {"block": ("input", 1)}), expected)
    assert calls == [("input", 1)]


def test_a_block_wide_replace_becomes_the_base(comfy: comfyui.ComfyUI) -> None:
    """A patch keyed (block, number) would be shadowed by the per-layer key; it is kept as the base instead."""
    patcher = comfyui.tiny_sd15_patcher(comfy)

    def block_wide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        return torch.zeros_like(q)

    patcher.set_model_attn2_replace(block_wide, "input", 1)
    clone = patcher.clone()
    add_identity_patch(clone, ("input", 1, 0), IdentityTerm(_kv(0), 1.0, None), 14.0, 0.0)
    installed = attn2_patches(clone.model_options)[("input", 1, 0)]
    assert isinstance(installed, InstantIDAttn2Patch) and installed.base is block_wide
    assert ("input", 1, 0) not in attn2_patches(patcher.model_options)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_two_faces_stack_on_clones_without_touching_upstream(comfy: comfyui.ComfyUI, arch: comfyui.Arch) -> None:
    base = shared_patcher(comfy, arch)
    weights = shared_adapter(comfy, arch)
    keys = [site.key for site in cross_attention_sites(diffusion_model_of(base))]
    with torch.inference_mode():  # as inside a ComfyUI node
        tokens_a = face_tokens(weights, face_embedding(1))
        tokens_b = face_tokens(weights, face_embedding(2))
        one = apply_identity(base, weights, *tokens_a, weight=0.8, start_at=0.0, end_at=1.0)
        before = {key: (patch, tuple(patch.callback)) for key, patch in attn2_patches(one.model_options).items()}
        two = apply_identity(one, weights, *tokens_b, weight=0.6, start_at=0.2, end_at=0.9)

    assert attn2_patches(base.model_options) == {}
    first, second = attn2_patches(one.model_options), attn2_patches(two.model_options)
    assert sorted(first) == sorted(second) == sorted(keys)
    for key in keys:
        assert first[key] is before[key][0] and first[key].callback == before[key][1]
        assert len(first[key].identities) == 1
        assert second[key] is not first[key]
        assert second[key].identities[0] is first[key].identities[0]
        assert [kw["sigma_start"] > kw["sigma_end"] for kw in second[key].kwargs] == [True, True]
    assert second[keys[0]].identities[1].weight == 0.6


def test_stock_clone_of_a_patched_model_copies_no_tensor(comfy: comfyui.ComfyUI) -> None:
    shared = shares_patch_objects(comfy.ModelPatcher)
    base = shared_patcher(comfy, "sdxl")
    weights = shared_adapter(comfy, "sdxl")
    with torch.inference_mode():
        patched = apply_identity(base, weights, *face_tokens(weights, face_embedding(1)), weight=1, start_at=0, end_at=1)
        clone = patched.clone()  # ComfyUI's own clone: copy.deepcopy, or deepcopy_list_dict since 2026-02
    for key, patch in attn2_patches(clone.model_options).items():
        original = attn2_patches(patched.model_options)[key]
        assert (patch is original) is shared
        assert patch.identities[0] is original.identities[0]


def test_an_adapter_for_another_model_is_refused(comfy: comfyui.ComfyUI) -> None:
    sd15 = shared_patcher(comfy, "sd15")
    sdxl_weights = shared_adapter(comfy, "sdxl")
    tokens = face_tokens(sdxl_weights, face_embedding(1))
    with pytest.raises(InstantIDNodeError, match=r"adapter is for sdxl \(70 cross-attention layers.*model has 16"):
        apply_identity(sd15, sdxl_weights, *tokens, weight=1, start_at=0, end_at=1)


def test_start_after_end_never_applies(comfy: comfyui.ComfyUI, caplog: pytest.LogCaptureFixture) -> None:
    """As in ComfyUI_InstantID (saved workflows keep running): an empty sigma range, with a warning."""
    base = shared_patcher(comfy, "sd15")
    weights = shared_adapter(comfy, "sd15")
    tokens = face_tokens(weights, face_embedding(1))
    model = apply_identity(base, weights, *tokens, weight=1, start_at=0.8, end_at=0.2)
    assert "start_at (0.8) is after end_at (0.2)" in caplog.text
    patch = next(iter(attn2_patches(model.model_options).values()))
    kwargs = patch.kwargs[0]
    assert kwargs["sigma_start"] < kwargs["sigma_end"]
    generator = torch.Generator().manual_seed(0)
    width = patch.identities[0].kv.k.shape[-1]
    q, k, v = (torch.randn(2, 16, width, generator=generator) for _ in range(3))
    for sigma in (0.0, kwargs["sigma_start"], kwargs["sigma_end"], 14.0):
        options = _options(sigma) | {"n_heads": 1}
        torch.testing.assert_close(patch(q, k, v, options), comfy.attention.optimized_attention(q, k, v, 1))
