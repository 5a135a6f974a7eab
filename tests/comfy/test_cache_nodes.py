"""``instantid.cache`` in the ComfyUI nodes: each input misses exactly the layers it feeds, hits hand out fresh
clones, upstream weight / object-patch / option changes miss, freed models drop their entries, and cached
outputs are always bit-equal to uncached ones (hypothesis over random sequences of node calls)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instantid import cache as instantid_cache
from instantid.comfy.patch import InstantIDAttn2Patch, attn2_patches
from instantid.testing import comfyui
from tests.comfy.instantid_helpers import (
    face_image,
    identity_terms,
    pack_nodes,
    same_terms,
    shared_adapter,
    shared_patcher,
    tiny_adapter,
)

LAYERS = instantid_cache.LAYERS


class Counter:
    """Per-layer (hits, misses) since the last call."""

    def __init__(self) -> None:
        self.last = self.read()

    @staticmethod
    def read() -> dict[str, tuple[int, int]]:
        layers = instantid_cache.caches().stats()["layers"]
        return {name: (s["hits"], s["misses"]) for name, s in layers.items()}

    def delta(self) -> dict[str, str]:
        """``{layer: "hit" | "miss" | "-" | "hit+miss" ...}`` (hits first) for the lookups since the last call."""
        now = self.read()
        out = {}
        for name in LAYERS:
            hits, misses = now[name][0] - self.last[name][0], now[name][1] - self.last[name][1]
            out[name] = "+".join(["hit"] * hits + ["miss"] * misses) or "-"
        self.last = now
        return out


def _patch_inputs(comfy: comfyui.ComfyUI, face_app: Any, **overrides: Any) -> dict[str, Any]:
    return {
        "instantid": shared_adapter(comfy, "sd15"),
        "insightface": face_app,
        "image": IMAGE,
        "model": shared_patcher(comfy, "sd15"),
        "weight": 0.8,
        "start_at": 0.0,
        "end_at": 1.0,
        "noise": 0.0,
    } | overrides


IMAGE = face_image(40, 60)
OTHER_IMAGE = face_image(700, 300)
MASK = torch.ones(16, 16)


def _layer_outputs(model: Any, limit: int | None = None) -> dict[Any, torch.Tensor]:
    """Each attn2 patch (the first ``limit``) called on fixed inputs at a sigma inside and one outside typical
    windows."""
    generator = torch.Generator().manual_seed(7)
    out = {}
    for key, patch in sorted(attn2_patches(model.model_options).items())[:limit]:
        width = patch.identities[0].kv.k.shape[-1] if isinstance(patch, InstantIDAttn2Patch) else 32
        q = torch.randn(2, 16, width, generator=generator)
        k = torch.randn(2, 7, width, generator=generator)
        for sigma in (14.0, 0.03):
            options = {
                "n_heads": 1,
                "cond_or_uncond": [0, 1],
                "sigmas": torch.tensor([sigma, sigma]),
                "original_shape": [2, 4, 4, 4],
            }
            out[(key, sigma)] = patch(q, k, k, options)
    return out


def test_each_input_misses_exactly_the_layers_it_feeds(
    comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches
) -> None:
    node = pack_nodes(comfy).InstantIDAttentionPatch
    counter = Counter()

    def run(**overrides: Any) -> dict[str, str]:
        comfyui.run_node(node, **_patch_inputs(comfy, face_app, **overrides))
        return counter.delta()

    assert run() == {"faces": "miss", "tokens": "miss", "kv": "miss", "models": "miss"}
    assert run() == {"faces": "hit", "tokens": "hit", "kv": "-", "models": "hit"}
    rebuild = {"faces": "hit", "tokens": "hit", "kv": "hit", "models": "miss"}
    assert run(weight=0.5) == rebuild, "a new weight reuses the K/V"
    assert run(start_at=0.2) == rebuild
    assert run(end_at=0.7) == rebuild
    assert run(mask=MASK) == rebuild
    assert run(mask=MASK) == {"faces": "hit", "tokens": "hit", "kv": "-", "models": "hit"}
    assert run(image=IMAGE.clone()) == {"faces": "hit", "tokens": "hit", "kv": "-", "models": "hit"}, (
        "the same pixels in a new tensor hit the face analysis and everything after it"
    )
    new_tokens = {"faces": "hit", "tokens": "miss", "kv": "miss", "models": "miss"}
    assert run(noise=0.3) == new_tokens
    assert run(instantid=tiny_adapter(shared_patcher(comfy, "sd15"), "sd15", seed=5)) == new_tokens
    assert run(image=OTHER_IMAGE) == {"faces": "miss", "tokens": "miss", "kv": "miss", "models": "miss"}
    assert run(model=shared_patcher(comfy, "sd15").clone()) == rebuild, (
        "another model object: a new patched model"
    )


def test_apply_instantid_nodes_and_cn_strength(
    comfy: comfyui.ComfyUI,
    face_app: Any,
    caches: instantid_cache.InstantIDCaches,
    tiny_controlnet: Callable[..., Any],
) -> None:
    nodes = pack_nodes(comfy)
    control_net = tiny_controlnet("sd15")
    inputs = _patch_inputs(comfy, face_app) | {
        "control_net": control_net,
        "positive": comfyui.conditioning("sd15", 1),
        "negative": comfyui.conditioning("sd15", 2),
    }
    inputs.pop("weight")
    advanced = inputs | {"ip_weight": 0.8, "cn_strength": 0.5, "combine_embeds": "average"}
    counter = Counter()
    comfyui.run_node(nodes.ApplyInstantIDAdvanced, **advanced)
    assert counter.delta() == {"faces": "miss", "tokens": "miss", "kv": "miss", "models": "miss"}, (
        "one analysis serves the embedding and the keypoints"
    )
    _, positive, _ = comfyui.run_node(nodes.ApplyInstantIDAdvanced, **advanced | {"cn_strength": 0.9})
    assert counter.delta() == {"faces": "hit", "tokens": "hit", "kv": "-", "models": "hit"}
    assert positive[0][1]["control"].strength == 0.9
    comfyui.run_node(nodes.ApplyInstantID, **inputs | {"weight": 0.8})
    assert counter.delta() == {"faces": "hit", "tokens": "hit", "kv": "-", "models": "hit"}, (
        "ApplyInstantID with weight 0.8 is the advanced node with ip_weight 0.8"
    )
    comfyui.run_node(nodes.ApplyInstantID, **inputs | {"weight": 0.6})
    assert counter.delta() == {"faces": "hit", "tokens": "hit", "kv": "hit", "models": "miss"}
    comfyui.run_node(nodes.FaceKeypointsPreprocessor, faceanalysis=face_app, image=IMAGE)
    assert counter.delta()["faces"] == "hit"


def test_a_hit_is_a_fresh_clone_the_caller_cannot_reach_into(
    comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches
) -> None:
    node = pack_nodes(comfy).InstantIDAttentionPatch
    first, _ = comfyui.run_node(node, **_patch_inputs(comfy, face_app))
    expected = _layer_outputs(first)
    key = next(iter(attn2_patches(first.model_options)))
    first.set_model_attn2_replace(lambda q, k, v, extra: q * 0, *key)  # the caller changes its output
    first.model_options["transformer_options"]["poison"] = True
    second, _ = comfyui.run_node(node, **_patch_inputs(comfy, face_app))
    assert second is not first
    assert "poison" not in second.model_options["transformer_options"]
    assert all(
        torch.equal(a, b) for a, b in zip(_layer_outputs(second).values(), expected.values(), strict=True)
    )
    assert Counter.read()["models"] == (1, 1)


def test_upstream_changes_to_the_model_miss(
    comfy: comfyui.ComfyUI,
    face_app: Any,
    caches: instantid_cache.InstantIDCaches,
    lora_file: Callable[..., str],
) -> None:
    node = pack_nodes(comfy).InstantIDAttentionPatch
    model = shared_patcher(comfy, "sd15").clone()
    counter = Counter()

    def run() -> Any:
        out, _ = comfyui.run_node(node, **_patch_inputs(comfy, face_app, model=model))
        return out

    run()
    run()
    assert counter.delta()["models"] == "hit+miss"
    # a LoRA applied by a later clone: another model object
    (with_lora,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_file(model), 1.0)
    out = comfyui.run_node(node, **_patch_inputs(comfy, face_app, model=with_lora))[0]
    assert counter.delta()["models"] == "miss" and out.patches.keys() == with_lora.patches.keys() != set()
    # weight patches added in place to the same model object: its patches_uuid changes
    weight_key = next(iter(model.model.state_dict()))
    model.add_patches({weight_key: (torch.zeros_like(model.model.state_dict()[weight_key]),)}, 1.0)
    out = run()
    assert counter.delta()["models"] == "miss" and out.patches.keys() == {weight_key}
    run()
    assert counter.delta()["models"] == "hit"
    # an object patch, in place
    model.add_object_patch("model_sampling", model.model.model_sampling)
    out = run()
    assert counter.delta()["models"] == "miss" and "model_sampling" in out.object_patches
    # an option, in place
    model.model_options["transformer_options"]["custom"] = 1
    out = run()
    assert counter.delta()["models"] == "miss"
    assert out.model_options["transformer_options"]["custom"] == 1


def test_a_freed_model_drops_its_entries_and_is_collected(
    comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches
) -> None:
    node = pack_nodes(comfy).InstantIDAttentionPatch
    model = shared_patcher(comfy, "sd15").clone()
    out, _ = comfyui.run_node(node, **_patch_inputs(comfy, face_app, model=model))
    models = caches.layers["models"]
    assert len(models) == 1 and models.bytes_held > 0
    alive = weakref.ref(model)
    del model, out
    gc.collect()
    assert alive() is None, "the cache kept the input model alive"
    assert len(models) == 0 and models.bytes_held == 0
    assert models.stats().dropped == 1


def test_zero_disables(comfy: comfyui.ComfyUI, face_app: Any) -> None:
    try:
        disabled = instantid_cache.configure(max_mb=0)
        node = pack_nodes(comfy).InstantIDAttentionPatch
        a, _ = comfyui.run_node(node, **_patch_inputs(comfy, face_app))
        b, _ = comfyui.run_node(node, **_patch_inputs(comfy, face_app))
        assert disabled.stats()["enabled"] is False and disabled.layers == {}
        assert attn2_patches(a.model_options) and a is not b
    finally:
        instantid_cache.configure()


def test_one_detection_serves_embedding_and_keypoints_with_the_cache_off(
    comfy: comfyui.ComfyUI,
    face_app: Any,
    tiny_controlnet: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    detections = []
    real_get = face_app.get
    monkeypatch.setattr(
        face_app, "get", lambda image, *a, **k: detections.append(1) or real_get(image, *a, **k)
    )
    inputs = _patch_inputs(comfy, face_app) | {
        "control_net": tiny_controlnet("sd15"),
        "positive": comfyui.conditioning("sd15", 1),
        "negative": comfyui.conditioning("sd15", 2),
    }
    try:
        instantid_cache.configure(max_mb=0)
        comfyui.run_node(pack_nodes(comfy).ApplyInstantID, **inputs)
    finally:
        instantid_cache.configure()
    assert len(detections) == 1


def test_sizes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTANTID_CACHE_MB", "10")
    monkeypatch.setenv("INSTANTID_CACHE_ENTRIES", "3")
    caches = instantid_cache.InstantIDCaches()
    assert caches.enabled and {c.maxsize for c in caches.layers.values()} == {3}
    assert sum(c.max_bytes or 0 for c in caches.layers.values()) <= 10 * 2**20
    monkeypatch.setenv("INSTANTID_CACHE_ENTRIES", "0")
    assert not instantid_cache.InstantIDCaches().enabled
    monkeypatch.delenv("INSTANTID_CACHE_MB")
    monkeypatch.delenv("INSTANTID_CACHE_ENTRIES")
    default = instantid_cache.InstantIDCaches()
    assert sum(c.max_bytes or 0 for c in default.layers.values()) <= 512 * 2**20, "a few hundred MiB at most"


# --- cached == uncached, bit for bit --------------------------------------------------------------

CALL = st.fixed_dictionaries(
    {
        "image": st.sampled_from(["a", "a_copy", "b"]),
        "weight": st.sampled_from([0.0, 0.5, 0.8]),
        "start_at": st.sampled_from([0.0, 0.3]),
        "end_at": st.sampled_from([1.0, 0.8]),
        "noise": st.sampled_from([0.0, 0.35]),
        "mask": st.sampled_from([None, "m"]),
        "model": st.sampled_from(["base", "lora"]),
    }
)


def _run_sequence(
    comfy: comfyui.ComfyUI, face_app: Any, calls: list[dict[str, Any]], models: dict[str, Any]
) -> list[Any]:
    node = pack_nodes(comfy).InstantIDAttentionPatch
    images = {"a": IMAGE, "b": OTHER_IMAGE}
    outputs = []
    for call in calls:
        inputs = dict(call)
        inputs["image"] = IMAGE.clone() if call["image"] == "a_copy" else images[call["image"]]
        inputs["mask"] = None if call["mask"] is None else MASK
        inputs["model"] = models[call["model"]]
        model, embeds = comfyui.run_node(node, **_patch_inputs(comfy, face_app, **inputs))
        outputs.append(
            (
                _layer_outputs(model, limit=2),
                embeds["cond"],
                embeds["uncond"],
                model.patches.keys(),
                identity_terms(model),
            )
        )
    return outputs


@pytest.fixture(scope="module")
def models(comfy: comfyui.ComfyUI, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shared tiny model, and a clone of it with a LoRA (ComfyUI's LoraLoaderModelOnly)."""
    base = shared_patcher(comfy, "sd15")
    directory = tmp_path_factory.mktemp("cache_loras")
    comfyui.register_lora_dir(comfy, directory)
    comfyui.write_unet_lora(comfy, base, directory / "cache_lora.safetensors")
    (lora,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(base, "cache_lora.safetensors", 0.7)
    return {"base": base, "lora": lora}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(CALL, min_size=2, max_size=4))
def test_cached_and_uncached_outputs_are_bit_equal(
    comfy: comfyui.ComfyUI, face_app: Any, models: dict[str, Any], calls: list[dict[str, Any]]
) -> None:
    try:
        instantid_cache.configure(max_mb=64, max_entries=2)  # small: entries are evicted along the way
        cached = _run_sequence(comfy, face_app, calls, models)
        instantid_cache.configure(max_mb=0)
        uncached = _run_sequence(comfy, face_app, calls, models)
    finally:
        instantid_cache.configure()
    for step, (a, b) in enumerate(zip(cached, uncached, strict=True)):
        layers_a, layers_b = a[0], b[0]
        assert layers_a.keys() == layers_b.keys(), step
        for key in layers_a:
            assert torch.equal(layers_a[key], layers_b[key]), (step, key)
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3], step
        assert same_terms(a[4], b[4]), step
