"""The ComfyUI test harness itself: real ComfyUI on CPU, tiny models with the real block layouts."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

from instantid.testing import absent_modules, comfyui


def cross_attention_blocks(patcher: Any) -> Counter[tuple[str, int]]:
    """How many transformer blocks with cross-attention sit in each (input|middle|output, index) block."""
    unet = patcher.model.diffusion_model
    counts: Counter[tuple[str, int]] = Counter()
    for kind, blocks in (
        ("input", unet.input_blocks),
        ("middle", [unet.middle_block]),
        ("output", unet.output_blocks),
    ):
        for index, block in enumerate(blocks):
            for name, module in block.named_modules():
                if name.endswith("attn2"):
                    counts[(kind, index)] += 1
                    assert module.to_k.in_features == patcher.model.model_config.unet_config["context_dim"]
    return counts


def test_comfyui_runs_on_cpu_from_the_expected_folder(comfy: comfyui.ComfyUI) -> None:
    assert comfy.root == comfyui.comfyui_root()
    assert comfy.model_management.get_torch_device() == torch.device("cpu")
    assert "torchvision" not in sys.modules, "the torchvision placeholder must not stay registered"


def test_a_wrong_comfyui_path_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv(comfyui.COMFYUI_PATH_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"not a ComfyUI checkout: expected comfy/model_patcher.py"):
        comfyui.comfyui_root()


def test_torchvision_placeholder_imports_and_fails_when_used() -> None:
    with absent_modules.placeholders_for_missing(("torchvision", "torch")) as absent:
        assert absent == {"torchvision"}  # torch is installed: no placeholder for it
        import torchvision.transforms.functional as tf  # type: ignore[import-not-found]
        from torchvision import transforms  # type: ignore[import-not-found]

        with pytest.raises(
            ModuleNotFoundError,
            match=r"torchvision is not installed.*`torchvision.transforms.Normalize` was called",
        ):
            transforms.Normalize(0.5, 0.5)
        assert tf.__name__ == "torchvision.transforms.functional"
    assert "torchvision" not in sys.modules and "torchvision.transforms" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        import torchvision  # noqa: F401


def test_sd15_layout_is_the_real_one(comfy: comfyui.ComfyUI, tiny_sd15_patcher: Callable[..., Any]) -> None:
    patcher = tiny_sd15_patcher()
    assert isinstance(patcher, comfy.ModelPatcher)
    assert type(patcher.model) is comfy.model_base.BaseModel
    expected = {("input", i): 1 for i in (1, 2, 4, 5, 7, 8)} | {("middle", 0): 1}
    expected |= {("output", i): 1 for i in range(3, 12)}
    assert dict(cross_attention_blocks(patcher)) == expected


def test_sdxl_layout_is_the_real_one(comfy: comfyui.ComfyUI, tiny_sdxl_patcher: Callable[..., Any]) -> None:
    patcher = tiny_sdxl_patcher()
    assert type(patcher.model) is comfy.model_base.SDXL
    expected = {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10}
    expected |= {("output", i): 10 for i in (0, 1, 2)} | {("output", i): 2 for i in (3, 4, 5)}
    counts = cross_attention_blocks(patcher)
    assert dict(counts) == expected
    assert sum(counts.values()) == 70


def test_weights_depend_only_on_the_seed(tiny_sd15_patcher: Callable[..., Any]) -> None:
    a, b, c = tiny_sd15_patcher(seed=0), tiny_sd15_patcher(seed=0), tiny_sd15_patcher(seed=1)
    sa, sb, sc = (p.model.diffusion_model.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["out.2.weight"], sc["out.2.weight"])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_ksampler_is_deterministic_and_reads_the_prompt(comfy: comfyui.ComfyUI, arch: comfyui.Arch) -> None:
    patcher = comfyui.tiny_model_patcher(comfy, arch)
    latent = comfyui.empty_latent(comfy)
    negative = comfyui.conditioning(arch, seed=2)
    first = comfyui.ksample(comfy, patcher, comfyui.conditioning(arch, seed=1), negative, latent)
    again = comfyui.ksample(comfy, patcher, comfyui.conditioning(arch, seed=1), negative, latent)
    other = comfyui.ksample(comfy, patcher, comfyui.conditioning(arch, seed=3), negative, latent)
    assert first.shape == (1, 4, comfyui.TEST_LATENT_SIZE, comfyui.TEST_LATENT_SIZE)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_controlnet_changes_the_sample(comfy: comfyui.ComfyUI, tiny_controlnet: Callable[..., Any]) -> None:
    patcher = comfyui.tiny_sd15_patcher(comfy)
    latent = comfyui.empty_latent(comfy)
    positive, negative = comfyui.conditioning("sd15", seed=1), comfyui.conditioning("sd15", seed=2)
    image = torch.rand(
        1,
        8 * comfyui.TEST_LATENT_SIZE,
        8 * comfyui.TEST_LATENT_SIZE,
        3,
        generator=torch.Generator().manual_seed(0),
    )
    (controlled,) = comfyui.run_node(
        comfy.nodes.ControlNetApply,
        conditioning=positive,
        control_net=tiny_controlnet(),
        image=image,
        strength=1.0,
    )
    plain = comfyui.ksample(comfy, patcher, positive, negative, latent)
    with_control = comfyui.ksample(comfy, patcher, controlled, negative, latent)
    assert not torch.allclose(plain, with_control)


def test_stock_lora_loader_reads_the_written_file(
    comfy: comfyui.ComfyUI, lora_file: Callable[..., str]
) -> None:
    patcher = comfyui.tiny_sd15_patcher(comfy)
    name = lora_file(patcher)
    (with_lora,) = comfyui.run_node(
        comfy.nodes.LoraLoaderModelOnly, model=patcher, lora_name=name, strength_model=1.0
    )
    assert with_lora is not patcher and with_lora.model is patcher.model
    assert len(with_lora.patches) == 2 * 16  # to_k and to_v of the 16 cross-attention layers
    assert patcher.patches == {}
    latent = comfyui.empty_latent(comfy)
    positive, negative = comfyui.conditioning("sd15", seed=1), comfyui.conditioning("sd15", seed=2)
    plain = comfyui.ksample(comfy, patcher, positive, negative, latent)
    patched = comfyui.ksample(comfy, with_lora, positive, negative, latent)
    assert not torch.allclose(plain, patched)
    assert torch.equal(comfyui.ksample(comfy, patcher, positive, negative, latent), plain), (
        "LoRA leaked into the base"
    )


def test_release_models_unloads_what_sampling_loaded(comfy: comfyui.ComfyUI) -> None:
    patcher = comfyui.tiny_sd15_patcher(comfy)
    positive, negative = comfyui.conditioning("sd15", seed=1), comfyui.conditioning("sd15", seed=2)
    comfyui.ksample(comfy, patcher, positive, negative, comfyui.empty_latent(comfy))
    assert any(loaded.model is patcher for loaded in comfy.model_management.current_loaded_models)
    comfyui.release_models(comfy)
    assert not any(loaded.model is patcher for loaded in comfy.model_management.current_loaded_models)
