"""load_instantid: both formats, architecture inference, dtypes, memory mapping, and every kind of bad file."""

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from instantid import AdapterFormatError, load_instantid
from instantid.layout import cross_attention_layers
from instantid.testing.adapter_files import random_adapter_state, write_adapter, write_random_adapter


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (Linux /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loads_both_formats_with_the_written_values(small_adapter_files, small_adapter_state, fmt):
    image_proj, ip_adapter = small_adapter_state
    weights = load_instantid(small_adapter_files[fmt])

    assert weights.arch == "sd15"
    assert weights.num_layers == 16
    assert weights.cross_attention_dim == 768
    assert weights.hidden_sizes == tuple(layer.hidden_size for layer in cross_attention_layers("sd15"))
    assert weights.dtype == torch.float16
    assert weights.image_proj.keys() == image_proj.keys()
    for key, tensor in image_proj.items():
        assert torch.equal(weights.image_proj[key], tensor), key
    for i in range(16):
        assert torch.equal(weights.to_k_ip[i], ip_adapter[f"{2 * i + 1}.to_k_ip.weight"])
        assert torch.equal(weights.to_v_ip[i], ip_adapter[f"{2 * i + 1}.to_v_ip.weight"])


def test_sdxl_layout_is_inferred(tmp_path):
    path = write_random_adapter(tmp_path / "a.safetensors", arch="sdxl", scale=0.0, resampler="small")
    weights = load_instantid(path)
    assert weights.arch == "sdxl"
    assert weights.num_layers == 70
    assert weights.cross_attention_dim == 2048
    # down block 1 (4 layers at 640), down block 2 (20 at 1280), up block 0 (30 at 1280),
    # up block 1 (6 at 640), mid block (10 at 1280)
    assert weights.hidden_sizes == (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10
    assert [tuple(t.shape) for t in weights.to_v_ip] == [(h, 2048) for h in weights.hidden_sizes]


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_accepts_float_dtypes_and_converts_on_request(tmp_path, file_dtype, fmt):
    path = write_random_adapter(
        tmp_path / f"a.{fmt}", arch="sd15", fmt=fmt, dtype=file_dtype, resampler="small", scale=0.0
    )
    assert load_instantid(path).dtype == file_dtype
    converted = load_instantid(path, dtype=torch.float32)
    tensors = [*converted.image_proj.values(), *converted.to_k_ip, *converted.to_v_ip]
    assert {t.dtype for t in tensors} == {torch.float32}


def test_rejects_a_non_float_target_dtype(small_adapter_files):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_instantid(small_adapter_files["bin"], dtype=torch.int8)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tensors_are_memory_mapped_not_copied(small_adapter_files, fmt):
    path = small_adapter_files[fmt].resolve()
    weights = load_instantid(path)
    ranges = _mapped_ranges(path)
    assert ranges, f"{path} is not mapped"
    tensors = [*weights.image_proj.values(), *weights.to_k_ip, *weights.to_v_ip]
    outside = [t for t in tensors if not any(lo <= t.data_ptr() < hi for lo, hi in ranges)]
    assert not outside, f"{len(outside)} of {len(tensors)} tensors were copied out of the file's mapping"


def test_legacy_torch_format_loads(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", resampler="small", scale=0.0)
    path = tmp_path / "legacy.bin"
    torch.save(
        {"image_proj": image_proj, "ip_adapter": ip_adapter}, path, _use_new_zipfile_serialization=False
    )
    assert load_instantid(path).num_layers == 16


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_instantid(tmp_path / "nope.safetensors")


# --- bad files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file(small_adapter_files, tmp_path, fmt):
    data = small_adapter_files[fmt].read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="truncated"):
        load_instantid(cut)


def test_empty_and_unknown_files(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(AdapterFormatError, match="is empty"):
        load_instantid(empty)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(
        AdapterFormatError, match=r"neither a safetensors file nor a torch checkpoint.*b'GGUF"
    ):
        load_instantid(junk)


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    path = tmp_path / "foreign.bin"
    torch.save({"image_proj": {}, "ip_adapter": {}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(
        AdapterFormatError, match=r"needs arbitrary code to load.*argparse\.Namespace.*refuses"
    ):
        load_instantid(path)


class _RunsCode:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    with path.open("wb") as f:
        pickle.dump({"image_proj": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(AdapterFormatError, match="arbitrary code"):
        load_instantid(path)
    assert not marker.exists()


def _plain_ip_adapter(cross_dim=768):
    image_proj = {
        "proj.weight": torch.zeros(4 * cross_dim, 1024),
        "proj.bias": torch.zeros(4 * cross_dim),
        "norm.weight": torch.ones(cross_dim),
        "norm.bias": torch.zeros(cross_dim),
    }
    _, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    return image_proj, ip_adapter


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_plain_ip_adapter_is_named(tmp_path, fmt):
    path = write_adapter(tmp_path / f"ip-adapter_sd15.{fmt}", *_plain_ip_adapter(), fmt)
    with pytest.raises(
        AdapterFormatError,
        match=r"is a plain IP-Adapter \(image_proj is a linear projection.*expected an InstantID",
    ):
        load_instantid(path)


def test_ip_adapter_plus_is_named(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    image_proj["proj_in.weight"] = torch.zeros(128, 1280)  # a Resampler over ViT-H features
    path = write_adapter(tmp_path / "ip-adapter-plus.safetensors", image_proj, ip_adapter, "safetensors")
    with pytest.raises(
        AdapterFormatError, match=r"IP-Adapter Plus \(its Resampler takes 1280-d CLIP image features"
    ):
        load_instantid(path)


def test_resampler_with_another_token_count_is_named(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    image_proj["latents"] = torch.zeros(1, 8, 128)
    path = write_adapter(tmp_path / "other.safetensors", image_proj, ip_adapter, "safetensors")
    with pytest.raises(AdapterFormatError, match="makes 8 tokens, InstantID's makes 16"):
        load_instantid(path)


def test_ip_adapter_faceid_is_named(tmp_path):
    image_proj = {
        "proj.0.weight": torch.zeros(1024, 512),
        "proj.0.bias": torch.zeros(1024),
        "proj.2.weight": torch.zeros(3072, 1024),
        "proj.2.bias": torch.zeros(3072),
        "norm.weight": torch.ones(768),
        "norm.bias": torch.zeros(768),
    }
    _, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    ip_adapter["1.to_k_lora.down.weight"] = torch.zeros(128, 320)
    path = write_adapter(tmp_path / "faceid.bin", image_proj, ip_adapter, "bin")
    with pytest.raises(AdapterFormatError, match="IP-Adapter FaceID"):
        load_instantid(path)


def test_controlnet_checkpoint_is_named(tmp_path):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
        conditioning_embedding_out_channels=(16, 32),
    )
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(controlnet.state_dict(), path)
    with pytest.raises(
        AdapterFormatError, match=r"looks like a ControlNet checkpoint \(\d+ keys: .*expected an InstantID"
    ):
        load_instantid(path)


def test_unet_checkpoint_is_named(tmp_path):
    path = tmp_path / "model.bin"
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, path)
    with pytest.raises(AdapterFormatError, match="looks like a UNet / Stable Diffusion checkpoint"):
        load_instantid(path)


def test_wrong_layer_shape_is_reported(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    ip_adapter["5.to_k_ip.weight"] = torch.zeros(100, 768)
    path = write_adapter(tmp_path / "a.safetensors", image_proj, ip_adapter, "safetensors")
    with pytest.raises(
        AdapterFormatError,
        match=r"ip_adapter\.5\.to_k_ip\.weight has shape \[100, 768\], expected \[640, 768\]",
    ):
        load_instantid(path)


def test_wrong_resampler_shape_is_reported(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    image_proj["layers.2.1.3.weight"] = torch.zeros(128, 256)
    path = write_adapter(tmp_path / "a.bin", image_proj, ip_adapter, "bin")
    with pytest.raises(
        AdapterFormatError,
        match=r"image_proj\.layers\.2\.1\.3\.weight has shape \[128, 256\], expected \[128, 512\]",
    ):
        load_instantid(path)


def test_resampler_output_width_must_match_the_layers(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    image_proj.update(
        {
            "proj_out.weight": torch.zeros(2048, 128),
            "proj_out.bias": torch.zeros(2048),
            "norm_out.weight": torch.ones(2048),
            "norm_out.bias": torch.zeros(2048),
        }
    )
    path = write_adapter(tmp_path / "mixed.safetensors", image_proj, ip_adapter, "safetensors")
    with pytest.raises(
        AdapterFormatError, match="outputs 2048-d tokens but the ip_adapter layers take 768-d"
    ):
        load_instantid(path)


def test_missing_layers_are_named(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    del ip_adapter["7.to_k_ip.weight"], ip_adapter["7.to_v_ip.weight"], ip_adapter["31.to_v_ip.weight"]
    path = write_adapter(tmp_path / "a.safetensors", image_proj, ip_adapter, "safetensors")
    with pytest.raises(
        AdapterFormatError, match=r"3 of 32 keys missing .*ip_adapter\.7\.to_k_ip\.weight"
    ) as err:
        load_instantid(path)
    assert "found 15 layers" in str(err.value)


def test_missing_resampler_key_is_named(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    del image_proj["layers.1.0.norm2.bias"]
    path = write_adapter(tmp_path / "a.safetensors", image_proj, ip_adapter, "safetensors")
    with pytest.raises(AdapterFormatError, match=r"missing image_proj\.layers\.1\.0\.norm2\.bias"):
        load_instantid(path)


def test_unknown_cross_attention_width(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    ip_adapter = {k: torch.zeros(v.shape[0], 1024) for k, v in ip_adapter.items()}  # an SD2-sized adapter
    path = write_adapter(tmp_path / "a.safetensors", image_proj, ip_adapter, "safetensors")
    with pytest.raises(
        AdapterFormatError,
        match=r"inputs of width \[1024\]; expected one width of 2048 \(sdxl\), 768 \(sd15\)",
    ):
        load_instantid(path)


def test_integer_tensors_are_rejected(tmp_path):
    image_proj, ip_adapter = random_adapter_state("sd15", scale=0.0, resampler="small")
    ip_adapter["1.to_k_ip.weight"] = ip_adapter["1.to_k_ip.weight"].to(torch.int8)
    path = write_adapter(tmp_path / "a.safetensors", image_proj, ip_adapter, "safetensors")
    with pytest.raises(AdapterFormatError, match=r"ip_adapter\.1\.to_k_ip\.weight has dtype torch\.int8"):
        load_instantid(path)


def test_pickle_of_something_else(tmp_path):
    path = tmp_path / "list.bin"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(AdapterFormatError, match="holds a list; expected a dict"):
        load_instantid(path)


def test_header_cut_short(small_adapter_files, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(small_adapter_files["safetensors"].read_bytes()[:40])
    with pytest.raises(
        AdapterFormatError, match=r"is truncated: its safetensors header claims \d+ bytes but the file has 40"
    ):
        load_instantid(cut)


def test_pickle_with_prefixed_keys_loads(tmp_path, small_adapter_state):
    image_proj, ip_adapter = small_adapter_state
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()} | {
        f"ip_adapter.{k}": v for k, v in ip_adapter.items()
    }
    path = tmp_path / "flat.bin"
    torch.save(flat, path)
    weights = load_instantid(path)
    assert torch.equal(weights.to_v_ip[15], ip_adapter["31.to_v_ip.weight"])
