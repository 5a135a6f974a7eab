"""Identity attention: diffusers' IPAdapterAttnProcessor2_0 as the oracle, then every option against
an explicit softmax reference."""

import copy
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from instantid.attention import (
    EMBEDS_SCALINGS,
    IdentityKV,
    LayerMasks,
    default_attention,
    face_tokens,
    identity_attention,
    precompute_kv,
    sigma_in_range,
    uncond_embeds,
)

HEADS = 5  # SD1.5 layer 0: 320 wide, 5 heads of 64


def _embeds(n=1, seed=0):
    return torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)) * 10


def _naive_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, in float64."""
    b, n, width = q.shape
    d = width // heads
    q, k, v = (t.double().reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, width)


@pytest.fixture(scope="module")
def layer0(small_weights_fp32):
    """Identity K/V of layer 0 (320 wide) for one face, and the tokens they came from."""
    cond, uncond = face_tokens(small_weights_fp32, _embeds())
    kvs = precompute_kv(small_weights_fp32, cond, uncond, dtype=torch.float32, device="cpu")
    return kvs[0], cond, uncond


def _query(batch, tokens=64, seed=1):
    return torch.randn(batch, tokens, 320, generator=torch.Generator().manual_seed(seed))


# --- the oracle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [False, True], ids=["cond only", "uncond+cond batch"])
@pytest.mark.parametrize("weight", [0.8, 1.7])
def test_matches_diffusers_ip_adapter_processor(small_weights_fp32, layer0, cfg, weight):
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=320, cross_attention_dim=768, heads=HEADS, dim_head=64, out_bias=True).eval()
    processor = IPAdapterAttnProcessor2_0(
        hidden_size=320, cross_attention_dim=768, num_tokens=(16,), scale=weight
    )
    with torch.no_grad():
        processor.to_k_ip[0].weight.copy_(small_weights_fp32.to_k_ip[0])
        processor.to_v_ip[0].weight.copy_(small_weights_fp32.to_v_ip[0])
    attn.set_processor(processor)

    kv, cond, uncond = layer0
    batch = 2 if cfg else 1
    hidden = torch.randn(batch, 64, 320)
    text = torch.randn(batch, 77, 768)
    ip_tokens = torch.cat([uncond, cond]) if cfg else cond  # diffusers' CFG batch: [negative, positive]
    with torch.no_grad():
        expected = attn(hidden, encoder_hidden_states=(text, [ip_tokens]))
        q, k, v = attn.to_q(hidden), attn.to_k(text), attn.to_v(text)
        out = default_attention(q, k, v, HEADS) + identity_attention(
            q, kv, heads=HEADS, weight=weight, cond_or_uncond=[1, 0] if cfg else None
        )
        got = attn.to_out[0](out)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- tokens and K/V ------------------------------------------------------------------------------


def test_face_tokens_and_kv_shapes(small_weights_fp32):
    cond, uncond = face_tokens(small_weights_fp32, _embeds(2))
    assert cond.shape == uncond.shape == (2, 16, 768)
    assert cond.dtype == torch.float32
    # zeros as the unconditional embedding, as InstantID does
    torch.testing.assert_close(uncond[0], small_weights_fp32.resampler()(torch.zeros(1, 512))[0])
    kvs = precompute_kv(small_weights_fp32, cond, uncond, dtype=torch.float16, device="cpu")
    assert len(kvs) == 16
    for kv, w_k, w_v in zip(kvs, small_weights_fp32.to_k_ip, small_weights_fp32.to_v_ip, strict=True):
        assert kv.k.shape == kv.v.shape == (2, 2, 16, w_k.shape[0])
        assert kv.k.dtype == torch.float16
        torch.testing.assert_close(kv.k[0].float(), cond @ w_k.T, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(kv.v[1].float(), uncond @ w_v.T, atol=2e-3, rtol=2e-3)


def test_precompute_kv_rejects_tokens_of_another_width(small_weights_fp32):
    with pytest.raises(
        ValueError, match=r"cond_tokens must be \[n, T, 768\] for this sd15 adapter, got \[1, 16, 2048\]"
    ):
        precompute_kv(
            small_weights_fp32,
            torch.zeros(1, 16, 2048),
            torch.zeros(1, 16, 2048),
            dtype=torch.float32,
            device="cpu",
        )


def test_identity_kv_is_shared_by_copies(layer0):
    kv = layer0[0]
    assert copy.deepcopy(kv) is kv
    assert copy.copy(kv) is kv
    assert kv.to(dtype=torch.float32) is kv
    assert kv.to(dtype=torch.float16).k.dtype == torch.float16


@pytest.mark.parametrize(
    ("embeds", "message"),
    [
        (torch.full((1, 512), float("nan")), r"face embedding \[0\] has NaN or infinite values"),
        (torch.cat([torch.ones(1, 512), torch.zeros(1, 512)]), r"face embedding \[1\] is all zeros"),
        (
            torch.ones(1, 128),
            r"expected face embeddings of shape \[B, 512\] or \[B, N, 512\], got \[1, 128\]",
        ),
        (torch.ones(0, 512), "got no face embedding"),
    ],
    ids=["nan", "zero", "width", "empty"],
)
def test_bad_embeddings_are_refused(small_weights_fp32, embeds, message):
    with pytest.raises(ValueError, match=message):
        face_tokens(small_weights_fp32, embeds)


def test_noise_matches_the_comfyui_instantid_recipe():
    embeds = _embeds()
    state = torch.random.get_rng_state()
    try:  # ComfyUI_InstantID seeds the global RNG with the embedding's sum and draws rand_like
        torch.manual_seed(int(torch.sum(embeds).item()) % 1000000007)
        expected = 0.35 * torch.rand_like(embeds)
    finally:
        torch.random.set_rng_state(state)
    got = uncond_embeds(embeds, 0.35)
    torch.testing.assert_close(got, expected)
    assert got.min() >= 0 and got.max() < 0.35
    assert torch.equal(uncond_embeds(embeds, 0.0), torch.zeros_like(embeds))


# --- weights and embeds scaling ------------------------------------------------------------------


def _reference(q, kv, weight, scaling, code=0):
    k, v = kv.k[code, 0].unsqueeze(0).double(), kv.v[code, 0].unsqueeze(0).double()
    width = q.shape[-1]
    if scaling == "V only":
        return weight * _naive_attention(q, k, v, HEADS)
    w = weight * (width / 1280 if "penalty" in scaling else 1.0)
    if scaling == "K+mean(V) w/ C penalty":
        mean = v.mean(dim=1, keepdim=True)
        return _naive_attention(q, k * w, v - mean + mean * w, HEADS)
    return _naive_attention(q, k * w, v * w, HEADS)


@pytest.mark.parametrize("scaling", EMBEDS_SCALINGS)
@pytest.mark.parametrize("weight", [0.5, 1.0, 2.5])
def test_embeds_scalings(layer0, scaling, weight):
    kv = layer0[0]
    q = _query(1)
    got = identity_attention(q, kv, heads=HEADS, weight=weight, embeds_scaling=scaling)
    torch.testing.assert_close(got.double(), _reference(q, kv, weight, scaling), atol=1e-5, rtol=1e-5)


def test_scalings_differ_where_they_should(layer0):
    kv, q = layer0[0], _query(1)
    out = {s: identity_attention(q, kv, heads=HEADS, weight=2.0, embeds_scaling=s) for s in EMBEDS_SCALINGS}
    # at 320 wide the C penalty scales the weight by 320/1280
    assert not torch.allclose(out["K+V"], out["K+V w/ C penalty"])
    assert not torch.allclose(out["V only"], out["K+V"])
    assert not torch.allclose(out["K+V w/ C penalty"], out["K+mean(V) w/ C penalty"])
    with pytest.raises(ValueError, match=re.escape("unknown embeds scaling 'V+K'")):
        identity_attention(q, kv, heads=HEADS, weight=1.0, embeds_scaling="V+K")


def test_zero_weight_returns_zeros_without_attending(layer0):
    calls = []

    def attention(q, k, v, heads, mask=None):
        calls.append(q.shape)
        return default_attention(q, k, v, heads, mask)

    q = _query(2)
    assert not identity_attention(q, layer0[0], heads=HEADS, weight=0.0, attention=attention).any()
    assert not identity_attention(q, layer0[0], heads=HEADS, weight=torch.zeros(2), attention=attention).any()
    assert calls == []
    identity_attention(q, layer0[0], heads=HEADS, weight=1.0, attention=attention)
    assert calls == [q.shape]  # the callable given is the one used


def test_per_image_weight_tensor(layer0):
    kv = layer0[0]
    q = _query(6)  # uncond + cond chunks of 3 images
    base = identity_attention(q, kv, heads=HEADS, weight=1.0, cond_or_uncond=[1, 0])
    got = identity_attention(q, kv, heads=HEADS, weight=torch.tensor([0.5, 2.0]), cond_or_uncond=[1, 0])
    factors = torch.tensor([0.5, 2.0, 2.0] * 2).view(6, 1, 1)  # the last weight repeats for image 3
    torch.testing.assert_close(got, base * factors)


# --- batching ------------------------------------------------------------------------------------


def test_cond_uncond_chunks_use_their_own_tokens(layer0):
    kv = layer0[0]
    q = _query(4)
    got = identity_attention(q, kv, heads=HEADS, weight=1.0, cond_or_uncond=[1, 0])
    for row, code in enumerate([1, 1, 0, 0]):
        expected = _reference(q[row : row + 1], kv, 1.0, "V only", code=code)
        torch.testing.assert_close(got[row : row + 1].double(), expected, atol=1e-5, rtol=1e-5)
    # extra conditionings (codes other than 1) are conditional, as in ComfyUI_IPAdapter_plus
    three = identity_attention(_query(3), kv, heads=HEADS, weight=1.0, cond_or_uncond=[0, 1, 2])
    torch.testing.assert_close(three[2], identity_attention(_query(3)[2:], kv, heads=HEADS, weight=1.0)[0])
    with pytest.raises(ValueError, match=r"a batch of 3 queries does not split into 2 chunks"):
        identity_attention(_query(3), kv, heads=HEADS, weight=1.0, cond_or_uncond=[1, 0])


def test_batch_unfolding_gives_each_image_its_identity(small_weights_fp32):
    cond, uncond = face_tokens(small_weights_fp32, torch.cat([_embeds(seed=3), _embeds(seed=4)]))
    kv = precompute_kv(small_weights_fp32, cond, uncond, dtype=torch.float32, device="cpu")[0]
    q = _query(6)  # uncond + cond, 3 images each; identity 2 repeats for image 3
    got = identity_attention(q, kv, heads=HEADS, weight=1.0, cond_or_uncond=[1, 0], unfold_batch=True)
    for row, (code, identity) in enumerate([(1, 0), (1, 1), (1, 1), (0, 0), (0, 1), (0, 1)]):
        single = IdentityKV(kv.k[:, identity : identity + 1], kv.v[:, identity : identity + 1])
        expected = identity_attention(
            q[row : row + 1], single, heads=HEADS, weight=1.0, cond_or_uncond=[code]
        )
        torch.testing.assert_close(got[row], expected[0])
    # without unfolding, every image attends to both identities' tokens together
    joined = identity_attention(q, kv, heads=HEADS, weight=1.0, cond_or_uncond=[1, 0])
    concatenated = IdentityKV(kv.k.flatten(1, 2).unsqueeze(1), kv.v.flatten(1, 2).unsqueeze(1))
    assert concatenated.k.shape == (2, 1, 32, 320)
    torch.testing.assert_close(
        joined, identity_attention(q, concatenated, heads=HEADS, weight=1.0, cond_or_uncond=[1, 0])
    )


# --- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("latent_hw", "layer_hw"),
    [
        ((64, 64), (32, 32)),
        ((64, 96), (32, 48)),
        ((96, 64), (24, 16)),
        ((75, 50), (19, 13)),
        ((16, 128), (8, 64)),
    ],
    ids=["square", "landscape", "portrait", "odd sizes", "8:1"],
)
def test_mask_follows_the_layer_grid(layer0, latent_hw, layer_hw):
    kv = layer0[0]
    h, w = layer_hw
    q = _query(2, tokens=h * w)
    mask = torch.zeros(latent_hw[0] * 8, latent_hw[1] * 8)  # pixel-space mask
    mask[:, : mask.shape[1] // 2] = 1.0  # the left half
    got = identity_attention(
        q, kv, heads=HEADS, weight=1.0, cond_or_uncond=[1, 0], mask=mask, original_shape=[1, 4, *latent_hw]
    )
    plain = identity_attention(q, kv, heads=HEADS, weight=1.0, cond_or_uncond=[1, 0])
    grid = (got.abs().sum(-1) / plain.abs().sum(-1)).view(2, h, w)
    left, right = grid[:, :, : w // 2 - 1], grid[:, :, w // 2 + 1 :]
    torch.testing.assert_close(left, torch.ones_like(left))
    torch.testing.assert_close(right, torch.zeros_like(right))


def test_one_mask_per_image(layer0):
    kv = layer0[0]
    q = _query(2, tokens=16)
    masks = torch.stack([torch.ones(32, 32), torch.zeros(32, 32)])
    got = identity_attention(q, kv, heads=HEADS, weight=1.0, mask=masks, original_shape=[2, 4, 8, 8])
    plain = identity_attention(q, kv, heads=HEADS, weight=1.0)
    torch.testing.assert_close(got[0], plain[0])
    assert not got[1].any()


def test_mask_errors(layer0):
    kv, q = layer0[0], _query(1, tokens=50)
    with pytest.raises(ValueError, match="needs original_shape"):
        identity_attention(q, kv, heads=HEADS, weight=1.0, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match="a layer with 50 query tokens does not match a latent of 64x64"):
        identity_attention(
            q, kv, heads=HEADS, weight=1.0, mask=torch.ones(8, 8), original_shape=[1, 4, 64, 64]
        )


# --- gating --------------------------------------------------------------------------------------


def test_sigma_gating():
    # ComfyUI's sigmas are float32 tensors and percent_to_sigma reads the same float32 schedule
    top = float(torch.tensor(14.6))
    assert sigma_in_range(5.0, sigma_start=top, sigma_end=0.03)
    assert sigma_in_range(torch.tensor([14.6, 14.6]), sigma_start=top, sigma_end=0.03)  # bounds included
    assert sigma_in_range(0.03, sigma_start=14.6, sigma_end=0.03)
    assert not sigma_in_range(20.0, sigma_start=14.6, sigma_end=0.03)
    assert not sigma_in_range(torch.tensor([0.01]), sigma_start=14.6, sigma_end=0.03)
    assert not sigma_in_range(5.0, sigma_start=3.0, sigma_end=1.0)  # start_at later in sampling


def test_layer_masks_resize_once_per_grid(layer0):
    kv, q = layer0[0], _query(2, tokens=32 * 48)
    mask = torch.rand(2, 512, 768)
    masks = LayerMasks(mask)
    shape = [2, 4, 64, 96]
    got = identity_attention(q, kv, heads=HEADS, weight=1.0, mask=masks, original_shape=shape)
    torch.testing.assert_close(
        got, identity_attention(q, kv, heads=HEADS, weight=1.0, mask=mask, original_shape=shape)
    )
    grid = masks.for_layer(32 * 48, shape, q)
    assert grid.shape == (2, 32 * 48)
    assert masks.for_layer(32 * 48, shape, q) is grid  # cached
    assert masks.for_layer(16 * 24, shape, q).shape == (2, 16 * 24)
    assert copy.deepcopy(masks) is masks
    with pytest.raises(
        ValueError, match=r"expected a mask of shape \[H, W\] or \[M, H, W\], got \[1, 1, 8, 8\]"
    ):
        LayerMasks(torch.ones(1, 1, 8, 8))


@given(
    codes=st.lists(st.integers(0, 2), min_size=1, max_size=3),
    per_chunk=st.integers(1, 3),
    num_sets=st.integers(1, 3),
    unfold=st.booleans(),
    weights=st.lists(st.floats(0.1, 2.0), min_size=1, max_size=4),
    scaling=st.sampled_from(EMBEDS_SCALINGS),
)
def test_every_row_gets_its_chunk_image_and_weight(codes, per_chunk, num_sets, unfold, weights, scaling):
    """Each query row against an explicit per-row reference, for any batch layout."""
    heads, width, tokens = 2, 128, 16
    gen = torch.Generator().manual_seed(len(codes) * 100 + per_chunk * 10 + num_sets)
    kv = IdentityKV(
        torch.randn(2, num_sets, tokens, width, generator=gen),
        torch.randn(2, num_sets, tokens, width, generator=gen),
    )
    q = torch.randn(len(codes) * per_chunk, 8, width, generator=gen)
    weight = torch.tensor(weights) if len(weights) > 1 else weights[0]
    got = identity_attention(
        q, kv, heads=heads, weight=weight, cond_or_uncond=codes, embeds_scaling=scaling, unfold_batch=unfold
    )
    for row in range(q.shape[0]):
        chunk, image = divmod(row, per_chunk)
        code = 1 if codes[chunk] == 1 else 0
        if unfold:
            k, v = kv.k[code, min(image, num_sets - 1)], kv.v[code, min(image, num_sets - 1)]
        else:
            k, v = kv.k[code].flatten(0, 1), kv.v[code].flatten(0, 1)
        w = weights[min(image, len(weights) - 1)]
        k, v = k.unsqueeze(0).double(), v.unsqueeze(0).double()
        if scaling == "V only":
            expected = w * _naive_attention(q[row : row + 1], k, v, heads)
        else:
            w = w * (width / 1280 if "penalty" in scaling else 1.0)
            mean = v.mean(dim=1, keepdim=True)
            v = v - mean + mean * w if scaling == "K+mean(V) w/ C penalty" else v * w
            expected = _naive_attention(q[row : row + 1], k * w, v, heads)
        torch.testing.assert_close(got[row : row + 1].double(), expected, atol=1e-5, rtol=1e-5)
