"""cow_model.comfy on a real ComfyUI: cow_clone against the stock clone(), the global switch."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import cow_model.comfy as cow_comfy
from cow_model import cow_copy
from instantid.testing import comfyui
from instantid.testing.comfy_clone_semantics import shares_patch_objects

REPO = Path(__file__).resolve().parents[2]


class AttnPayload:
    """A patch callable the way node packs write them: a plain object holding tensors and a module."""

    def __init__(self, weight: torch.Tensor, module: torch.nn.Module) -> None:
        self.weight = weight
        self.module = module
        self.calls: list[int] = []

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any]
    ) -> torch.Tensor:
        return q


class SharedTable:
    """An object that declares itself shareable: cow_copy returns it as is."""

    __cow_shared__ = True

    def __init__(self) -> None:
        self.rows = [1, 2, 3]


def post_cfg(args: dict[str, Any]) -> torch.Tensor:
    return args["denoised"]  # type: ignore[no-any-return]


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start with no warning given and no clone marked unsupported, as in a new process."""
    monkeypatch.setattr(cow_comfy, "_warned", set())
    monkeypatch.setattr(cow_comfy, "_unsupported", set())


@pytest.fixture
def patched(comfy: comfyui.ComfyUI) -> Any:
    """A tiny SD1.5 patcher carrying options of every kind ComfyUI nodes put there, and a LoRA-style weight patch."""
    patcher = comfyui.tiny_sd15_patcher(comfy)
    generator = torch.Generator().manual_seed(5)
    payload = AttnPayload(torch.randn(64, 32, generator=generator), torch.nn.Linear(4, 4))
    patcher.set_model_attn2_replace(payload, "input", 1, 0)
    patcher.set_model_attn2_replace(AttnPayload(payload.weight, payload.module), "middle", 0, 0)
    patcher.set_model_attn2_patch(payload)
    patcher.set_model_sampler_post_cfg_function(post_cfg)
    patcher.model_options["transformer_options"]["shared_table"] = SharedTable()
    patcher.model_options["transformer_options"]["ids"] = torch.arange(3)
    key = next(k for k in patcher.model.state_dict() if k.endswith("attn2.to_k.weight"))
    patcher.add_patches({key: (torch.zeros_like(patcher.model.state_dict()[key]),)}, 0.5)
    patcher.add_object_patch("tiny_object", torch.nn.Identity())
    return patcher


def attn2_replace(patcher: Any) -> dict[Any, Any]:
    return patcher.model_options["transformer_options"]["patches_replace"]["attn2"]  # type: ignore[no-any-return]


PAYLOAD = (torch.Tensor, torch.nn.Module, SharedTable, types.FunctionType)
"""What the options' copy must share with the original."""


def assert_cow_copy_of(copied: Any, original: Any, path: str = "model_options") -> None:
    """``copied`` equals ``original`` structurally; containers and plain objects are new, payload is the same."""
    assert type(copied) is type(original), path
    if isinstance(original, dict):
        assert copied is not original, f"{path}: container shared"
        assert list(copied) == list(original), path
        for key in original:
            assert_cow_copy_of(copied[key], original[key], f"{path}[{key!r}]")
    elif isinstance(original, list):
        assert copied is not original, f"{path}: container shared"
        assert len(copied) == len(original), path
        for i, (a, b) in enumerate(zip(copied, original, strict=True)):
            assert_cow_copy_of(a, b, f"{path}[{i}]")
    elif isinstance(original, tuple):
        assert len(copied) == len(original), path
        for i, (a, b) in enumerate(zip(copied, original, strict=True)):
            assert_cow_copy_of(a, b, f"{path}[{i}]")
    elif isinstance(original, PAYLOAD):
        assert copied is original, f"{path}: payload copied"
    elif hasattr(original, "__dict__"):
        assert copied is not original, f"{path}: plain object shared"
        assert_cow_copy_of(vars(copied), vars(original), f"{path}.__dict__")
    else:
        assert copied == original, path


def test_cow_clone_sets_every_field_as_the_stock_clone(patched: Any) -> None:
    stock = patched.clone()
    cow = cow_comfy.cow_clone(patched)
    assert type(cow) is type(stock)
    assert vars(cow).keys() == vars(stock).keys()
    for name, stock_value in vars(stock).items():
        value, original = getattr(cow, name), getattr(patched, name, None)
        if name == "model_options":
            continue
        if stock_value is original:
            assert value is original, f"{name}: the stock clone shares it, cow_clone must too"
        else:
            assert value is not original, f"{name}: the stock clone copies it, cow_clone must too"
            assert value == stock_value, name
    # model_options: the stock deep copy and the cow copy have the same structure ...
    assert_cow_copy_of(cow.model_options, patched.model_options)
    assert list(stock.model_options) == list(cow.model_options)
    # ... but the stock one copied the payload (or, since 2026-02, shares the patch object), the cow one
    # copies the patch object and shares its payload.
    stock_payload, cow_payload = attn2_replace(stock)[("input", 1, 0)], attn2_replace(cow)[("input", 1, 0)]
    original_payload = attn2_replace(patched)[("input", 1, 0)]
    if shares_patch_objects(type(patched)):
        assert stock_payload is original_payload
    else:
        assert stock_payload.weight is not original_payload.weight and torch.equal(
            stock_payload.weight, original_payload.weight
        )
    assert cow_payload is not original_payload and cow_payload.weight is original_payload.weight
    assert cow_payload.module is original_payload.module
    assert cow_payload.calls is not original_payload.calls


def test_cow_clone_keeps_aliasing_inside_the_options(patched: Any) -> None:
    cow = cow_comfy.cow_clone(patched)
    attn2_patch = cow.model_options["transformer_options"]["patches"]["attn2_patch"][0]
    assert attn2_patch is attn2_replace(cow)[("input", 1, 0)], (
        "one payload object in two places stays one object"
    )


def test_clones_are_independent_both_ways(patched: Any) -> None:
    original_keys = set(attn2_replace(patched))
    cow = cow_comfy.cow_clone(patched)

    cow.set_model_attn2_replace(AttnPayload(torch.ones(1), torch.nn.Identity()), "output", 3, 0)
    cow.model_options["transformer_options"]["patches"]["attn2_patch"].append(post_cfg)
    cow.model_options["transformer_options"]["extra"] = 1
    attn2_replace(cow)[("input", 1, 0)].calls.append(7)
    cow.model_options["sampler_post_cfg_function"].clear()
    assert set(attn2_replace(patched)) == original_keys
    assert len(patched.model_options["transformer_options"]["patches"]["attn2_patch"]) == 1
    assert "extra" not in patched.model_options["transformer_options"]
    assert attn2_replace(patched)[("input", 1, 0)].calls == []
    assert patched.model_options["sampler_post_cfg_function"] == [post_cfg]

    patched.model_options["transformer_options"]["patches_replace"]["attn2"].pop(("middle", 0, 0))
    patched.model_options["transformer_options"]["ids"] = None
    assert ("middle", 0, 0) in attn2_replace(cow)
    assert torch.equal(cow.model_options["transformer_options"]["ids"], torch.arange(3))


def test_clone_of_a_clone(patched: Any) -> None:
    first = cow_comfy.cow_clone(patched)
    first.set_model_attn2_replace(AttnPayload(torch.ones(2), torch.nn.Identity()), "output", 3, 0)
    second = cow_comfy.cow_clone(first)
    assert_cow_copy_of(second.model_options, first.model_options)
    assert ("output", 3, 0) in attn2_replace(second) and ("output", 3, 0) not in attn2_replace(patched)
    assert attn2_replace(second)[("input", 1, 0)].weight is attn2_replace(patched)[("input", 1, 0)].weight
    assert second.model is patched.model
    assert second.patches == patched.patches and second.patches is not first.patches


def test_the_original_keeps_its_own_options_object(patched: Any) -> None:
    options = patched.model_options
    cow_comfy.cow_clone(patched)
    assert patched.model_options is options and type(options) is dict


def test_sampling_a_cow_clone_equals_sampling_a_stock_clone(comfy: comfyui.ComfyUI) -> None:
    base = comfyui.tiny_sd15_patcher(comfy)
    (rescaled,) = comfyui.run_node(comfy.nodes_model_advanced.RescaleCFG, model=base, multiplier=0.7)
    positive, negative = comfyui.conditioning("sd15", seed=1), comfyui.conditioning("sd15", seed=2)
    latent = comfyui.empty_latent(comfy)
    stock = comfyui.ksample(comfy, rescaled.clone(), positive, negative, latent)
    cow = comfyui.ksample(comfy, cow_comfy.cow_clone(rescaled), positive, negative, latent)
    plain = comfyui.ksample(comfy, base, positive, negative, latent)
    assert torch.equal(stock, cow)
    assert not torch.allclose(stock, plain), "RescaleCFG's function must have been in the cloned options"


class ShallowOptionsPatcherMixin:
    """A clone() that shallow-copies model_options instead of deep-copying it (what cow_clone cannot handle)."""

    def clone(self: Any, *args: Any, **kwargs: Any) -> Any:
        options, self.model_options = self.model_options, {}
        try:
            new = super().clone(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.model_options = options
        new.model_options = dict(options)
        return new


def test_unhandled_clone_falls_back_to_stock_with_one_warning(
    comfy: comfyui.ComfyUI, patched: Any, fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    shallow_class = type("ShallowOptionsPatcher", (ShallowOptionsPatcherMixin, comfy.ModelPatcher), {})
    patched.__class__ = shallow_class
    stock = patched.clone()
    with caplog.at_level(logging.WARNING, logger="cow_model.comfy"):
        first = cow_comfy.cow_clone(patched)
        second = cow_comfy.cow_clone(patched)
    warnings = [r for r in caplog.records if r.name == "cow_model.comfy"]
    assert len(warnings) == 1
    assert "does not deep-copy model_options" in warnings[0].getMessage()
    for clone in (first, second):
        assert type(clone) is type(stock)
        assert type(clone.model_options) is dict and clone.model_options is not patched.model_options
        assert clone.model_options["transformer_options"] is patched.model_options["transformer_options"]


def test_options_that_are_not_a_dict_fall_back_with_one_warning(
    patched: Any, fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    from collections import OrderedDict

    patched.model_options = OrderedDict(patched.model_options)
    with caplog.at_level(logging.WARNING, logger="cow_model.comfy"):
        clones = [cow_comfy.cow_clone(patched) for _ in range(2)]
    original = attn2_replace(patched)[("input", 1, 0)]
    if shares_patch_objects(type(patched)):  # deepcopy_list_dict makes it a dict; its objects are cow-copied
        assert not [r for r in caplog.records if r.name == "cow_model.comfy"]
        for clone in clones:
            payload = attn2_replace(clone)[("input", 1, 0)]
            assert type(clone.model_options) is dict and payload is not original and payload.weight is original.weight
        return
    assert [r.getMessage() for r in caplog.records if r.name == "cow_model.comfy"] == [
        f"cow_model.comfy: {type(patched).__qualname__}.model_options is OrderedDict, not a dict; "
        "using the stock clone(), which deep-copies it"
    ]
    for clone in clones:
        assert type(clone.model_options) is OrderedDict
        payload = clone.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
        assert payload.weight is not attn2_replace(patched)[("input", 1, 0)].weight  # stock deep copy


def test_an_object_without_clone_is_refused() -> None:
    with pytest.raises(TypeError, match=r"cow_clone needs a ComfyUI ModelPatcher .* got dict"):
        cow_comfy.cow_clone({"model_options": {}})


@pytest.fixture
def installed(comfy: comfyui.ComfyUI) -> Iterator[Any]:
    """The global switch on for the test, off again afterwards whatever happens."""
    stock = comfy.ModelPatcher.__dict__["clone"]
    assert cow_comfy.install() is True
    try:
        yield stock
    finally:
        cow_comfy.uninstall()
        assert comfy.ModelPatcher.__dict__["clone"] is stock


def test_install_uninstall_round_trip(comfy: comfyui.ComfyUI, patched: Any) -> None:
    stock = comfy.ModelPatcher.__dict__["clone"]
    assert not cow_comfy.is_installed()
    try:
        assert cow_comfy.install() is True
        installed_clone = comfy.ModelPatcher.__dict__["clone"]
        assert installed_clone is not stock and installed_clone.__name__ == "clone"
        assert cow_comfy.is_installed()
        assert cow_comfy.install() is True, "idempotent"
        assert comfy.ModelPatcher.__dict__["clone"] is installed_clone, "installing twice must not wrap twice"
        clone = patched.clone()
        assert attn2_replace(clone)[("input", 1, 0)].weight is attn2_replace(patched)[("input", 1, 0)].weight
        assert_cow_copy_of(clone.model_options, patched.model_options)
        assert_cow_copy_of(cow_comfy.cow_clone(patched).model_options, patched.model_options)
    finally:
        assert cow_comfy.uninstall() is True
    assert comfy.ModelPatcher.__dict__["clone"] is stock
    assert cow_comfy.uninstall() is False
    assert not cow_comfy.is_installed()
    stock_clone = patched.clone()
    stock_payload, original = attn2_replace(stock_clone)[("input", 1, 0)], attn2_replace(patched)[("input", 1, 0)]
    if shares_patch_objects(comfy.ModelPatcher):
        assert stock_payload is original, "uninstalled: the stock list-dict copy shares the patch object"
    else:
        assert stock_payload.weight is not original.weight, "uninstalled: the stock deep copy"


def test_install_refuses_an_unrecognised_clone(
    comfy: comfyui.ComfyUI, fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    shallow_class = type(
        "ShallowOptionsPatcher", (comfy.ModelPatcher,), {"clone": ShallowOptionsPatcherMixin.clone}
    )
    with caplog.at_level(logging.WARNING, logger="cow_model.comfy"):
        assert cow_comfy.install(shallow_class) is False
        assert cow_comfy.install(shallow_class) is False
    assert shallow_class.__dict__["clone"] is ShallowOptionsPatcherMixin.clone
    messages = [r.getMessage() for r in caplog.records if r.name == "cow_model.comfy"]
    assert len(messages) == 1 and "is not the ComfyUI clone() this recognises" in messages[0]


def test_the_switch_reaches_stock_nodes(comfy: comfyui.ComfyUI, patched: Any, installed: Any) -> None:
    (rescaled,) = comfyui.run_node(comfy.nodes_model_advanced.RescaleCFG, model=patched, multiplier=0.7)
    assert (
        "sampler_cfg_function" in rescaled.model_options
        and "sampler_cfg_function" not in patched.model_options
    )
    payload, original = attn2_replace(rescaled)[("input", 1, 0)], attn2_replace(patched)[("input", 1, 0)]
    assert payload is not original
    assert payload.weight is original.weight and payload.module is original.module
    assert (
        rescaled.model_options["transformer_options"]["shared_table"]
        is patched.model_options["transformer_options"]["shared_table"]
    )


def test_the_switch_reaches_the_stock_lora_loader(
    comfy: comfyui.ComfyUI, patched: Any, installed: Any, lora_file: Any
) -> None:
    name = lora_file(patched)
    (with_lora,) = comfyui.run_node(
        comfy.nodes.LoraLoaderModelOnly, model=patched, lora_name=name, strength_model=1.0
    )
    assert len(with_lora.patches) > len(patched.patches)
    assert attn2_replace(with_lora)[("input", 1, 0)].weight is attn2_replace(patched)[("input", 1, 0)].weight


def test_install_from_env(
    comfy: comfyui.ComfyUI, fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    stock = comfy.ModelPatcher.__dict__["clone"]
    try:
        for off in ({}, {cow_comfy.ENV_VAR: ""}, {cow_comfy.ENV_VAR: "0"}, {cow_comfy.ENV_VAR: "off"}):
            assert cow_comfy.install_from_env(off) is False
            assert comfy.ModelPatcher.__dict__["clone"] is stock
        with caplog.at_level(logging.WARNING, logger="cow_model.comfy"):
            assert cow_comfy.install_from_env({cow_comfy.ENV_VAR: "maybe"}) is False
        assert "expected 1/true/yes/on" in caplog.text and comfy.ModelPatcher.__dict__["clone"] is stock
        assert cow_comfy.install_from_env({cow_comfy.ENV_VAR: " True "}) is True
        assert cow_comfy.is_installed()
    finally:
        cow_comfy.uninstall()


def test_cow_copy_is_what_copies_the_options(patched: Any) -> None:
    """The clone's options are exactly what cow_copy gives for the original's (same structure, same sharing)."""
    by_cow_copy = cow_copy(patched.model_options)
    by_clone = cow_comfy.cow_clone(patched).model_options
    assert_cow_copy_of(by_clone, patched.model_options)
    assert_cow_copy_of(by_cow_copy, patched.model_options)


def test_importing_cow_model_comfy_imports_no_comfyui() -> None:
    code = "import sys, cow_model.comfy; print(sorted(m for m in sys.modules if m.split('.')[0] == 'comfy'))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"


def test_clone_callbacks_see_the_options_the_clone_keeps(comfy: comfyui.ComfyUI, patched: Any) -> None:
    """ComfyUI since late 2024 runs ON_CLONE callbacks at the end of clone(); they must see the cow copy."""
    if not hasattr(patched, "add_callback"):
        pytest.skip(f"this ComfyUI ({comfy.root}) has no ModelPatcher callbacks")
    from comfy.patcher_extension import CallbacksMP  # type: ignore[import-not-found]

    seen: list[Any] = []
    options = patched.model_options
    patched.add_callback(
        CallbacksMP.ON_CLONE, lambda old, new: seen.append((old, old.model_options, new.model_options))
    )
    cow = cow_comfy.cow_clone(patched)
    assert len(seen) == 1 and seen[0][0] is patched and seen[0][2] is cow.model_options
    assert seen[0][1] is options and type(seen[0][1]) is dict, "the callback saw the stand-in"
    assert cow.callbacks == patched.callbacks and cow.callbacks is not patched.callbacks
    assert attn2_replace(cow)[("input", 1, 0)].weight is attn2_replace(patched)[("input", 1, 0)].weight


class OnCloneCallbacksMixin:
    """ON_CLONE callbacks run at the end of clone() as ``callback(self, n)``, as in ComfyUI since late 2024."""

    on_clone: list[Any]

    def clone(self: Any, *args: Any, **kwargs: Any) -> Any:
        n = super().clone(*args, **kwargs)  # type: ignore[misc]
        for callback in self.on_clone:
            callback(self, n)
        return n


def test_clone_callbacks_see_the_original_options_on_this_comfyui(
    comfy: comfyui.ComfyUI, patched: Any
) -> None:
    """The same contract on the ComfyUI under test, its clone() extended the way current ComfyUI runs callbacks."""
    patched.__class__ = type("CallbackPatcher", (OnCloneCallbacksMixin, comfy.ModelPatcher), {})
    options = patched.model_options
    seen: list[Any] = []

    def on_clone(old: Any, new: Any) -> None:
        seen.append((old.model_options, new.model_options))
        old.model_options["written_by_callback"] = 1

    patched.on_clone = [on_clone]
    cow = cow_comfy.cow_clone(patched)
    assert len(seen) == 1 and seen[0][0] is options and seen[0][1] is cow.model_options
    assert patched.model_options is options and options["written_by_callback"] == 1
    assert "written_by_callback" not in cow.model_options
    assert attn2_replace(cow)[("input", 1, 0)].weight is attn2_replace(patched)[("input", 1, 0)].weight


def test_another_pack_wrapping_the_installed_clone(
    comfy: comfyui.ComfyUI, patched: Any, installed: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A pack that wraps ModelPatcher.clone with functools.wraps after install(): its wrapper runs and stays."""
    import functools

    ours = comfy.ModelPatcher.__dict__["clone"]
    calls: list[Any] = []

    @functools.wraps(ours)
    def pack_clone(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(self)
        return ours(self, *args, **kwargs)

    comfy.ModelPatcher.clone = pack_clone
    try:
        cow = cow_comfy.cow_clone(patched)
        assert calls == [patched], "cow_clone went around the other pack's wrapper"
        assert attn2_replace(cow)[("input", 1, 0)].weight is attn2_replace(patched)[("input", 1, 0)].weight
        with caplog.at_level(logging.WARNING, logger="cow_model.comfy"):
            assert cow_comfy.uninstall() is True
        assert comfy.ModelPatcher.__dict__["clone"] is pack_clone, "uninstall removed another pack's wrapper"
        assert "leaving that wrapper in place" in caplog.text
        stock_copy = patched.clone()
        assert len(calls) == 2
        stock_payload, original = attn2_replace(stock_copy)[("input", 1, 0)], attn2_replace(patched)[("input", 1, 0)]
        if shares_patch_objects(type(patched)):
            assert stock_payload is original, "switched off: the stock list-dict copy"
        else:
            assert stock_payload.weight is not original.weight, "switched off: the stock deep copy"
        assert cow_comfy.install() is True and comfy.ModelPatcher.__dict__["clone"] is pack_clone
    finally:
        comfy.ModelPatcher.clone = ours
