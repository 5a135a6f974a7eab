"""Load and validate an InstantID adapter (``ip-adapter.bin`` or ``.safetensors``).

Both published formats hold two groups of tensors:

* ``image_proj``: the Resampler (see :mod:`instantid.resampler`);
* ``ip_adapter``: ``N.to_k_ip.weight`` / ``N.to_v_ip.weight`` for N = 1, 3, 5, ... one pair per
  cross-attention layer of the base UNet, in the order of :func:`instantid.layout.cross_attention_layers`.

A torch pickle nests them (``{"image_proj": {...}, "ip_adapter": {...}}``) and is read with
``torch.load(weights_only=True)`` only, memory-mapped when it is a zip-format file; a
safetensors file prefixes the keys (``image_proj.latents``, ``ip_adapter.1.to_k_ip.weight``) and
is memory-mapped. The loader keeps the tensors it was handed: nothing is copied unless ``dtype``
asks for a conversion, so loading reads little more than the headers. Every problem with the
file raises :class:`AdapterFormatError` saying what was found and what was expected.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from instantid.layout import ARCHS, CrossAttentionLayer, cross_attention_layers
from instantid.resampler import Resampler

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FACE_EMBEDDING_DIM = 512
NUM_TOKENS = 16
_IP_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
_EXPECTED_KIND = (
    "an InstantID adapter (image_proj: a Resampler from the 512-d face embedding to 16 tokens; "
    "ip_adapter: N.to_k_ip.weight / N.to_v_ip.weight for N = 1, 3, 5, ...)"
)


class AdapterFormatError(ValueError):
    """The file is not a readable InstantID adapter; the message says what was found and what was expected."""


@dataclass(frozen=True, eq=False)
class InstantIDWeights:
    """The tensors of one InstantID adapter, as loaded (shared with the file's memory map, not copied).

    ``image_proj`` is the Resampler's state dict (keys without the ``image_proj.`` prefix);
    ``to_k_ip[i]`` / ``to_v_ip[i]`` (``[hidden_sizes[i], cross_attention_dim]``) belong to
    ``layers[i]`` (file keys ``2 * i + 1``).
    """

    image_proj: dict[str, Tensor] = field(repr=False)
    to_k_ip: tuple[Tensor, ...] = field(repr=False)
    to_v_ip: tuple[Tensor, ...] = field(repr=False)
    arch: str
    cross_attention_dim: int
    hidden_sizes: tuple[int, ...] = field(repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.to_k_ip)

    @property
    def layers(self) -> tuple[CrossAttentionLayer, ...]:
        """Where each layer sits in the UNet (ComfyUI and diffusers names)."""
        return cross_attention_layers(self.arch)

    @property
    def dtype(self) -> torch.dtype:
        return self.to_k_ip[0].dtype

    def resampler(self) -> Resampler:
        """A Resampler module whose parameters are the ``image_proj`` tensors (shared, not copied)."""
        return Resampler.from_state_dict(self.image_proj)


def load_instantid(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> InstantIDWeights:
    """Load the adapter at ``path`` (torch pickle or safetensors, told apart by content, not name).

    ``dtype`` (float32, float16 or bfloat16) converts every tensor, which copies them; ``None``
    keeps the file's tensors as they are. Raises ``FileNotFoundError`` for a missing file and
    :class:`AdapterFormatError` for anything wrong with its content.
    """
    path = Path(path)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES} or None, got {dtype}")
    image_proj, ip_adapter = _split_groups(path, _read_tensors(path))
    weights = _validate(path, image_proj, ip_adapter)
    if dtype is None:
        return weights
    return InstantIDWeights(
        image_proj={k: t.to(dtype) for k, t in weights.image_proj.items()},
        to_k_ip=tuple(t.to(dtype) for t in weights.to_k_ip),
        to_v_ip=tuple(t.to(dtype) for t in weights.to_v_ip),
        arch=weights.arch,
        cross_attention_dim=weights.cross_attention_dim,
        hidden_sizes=weights.hidden_sizes,
    )


# --- reading -------------------------------------------------------------------------------------


def _read_tensors(path: Path) -> Mapping[str, Any]:
    """The file's top-level mapping, by the format its first bytes show."""
    with path.open("rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        raise AdapterFormatError(f"{path} is empty; expected {_EXPECTED_KIND}")
    if head.startswith(b"PK"):
        return _read_pickle(path, mmap=True)
    if head[0] == 0x80:  # a pickle protocol marker: torch's legacy (non-zip) format
        return _read_pickle(path, mmap=False)
    if len(head) > 8 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len + 8 > size:
            raise AdapterFormatError(
                f"{path} is truncated: its safetensors header claims {header_len} bytes but the file has {size}"
            )
        return _read_safetensors(path)
    raise AdapterFormatError(
        f"{path} is neither a safetensors file nor a torch checkpoint (it starts with {head[:8]!r}); "
        f"expected {_EXPECTED_KIND}"
    )


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except SafetensorError as err:
        raise AdapterFormatError(
            f"{path} could not be read as safetensors ({err}); the file is truncated or corrupt"
        ) from err


def _read_pickle(path: Path, *, mmap: bool) -> Mapping[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"the Python object {found.group(1)}" if found else "objects other than tensors and containers"
        raise AdapterFormatError(
            f"{path} needs arbitrary code to load: its pickle refers to {what}. This loader only runs "
            "torch.load(weights_only=True) and refuses to execute code from a checkpoint; use the published "
            "InstantID adapter (ip-adapter.bin or a .safetensors conversion)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise AdapterFormatError(
            f"{path} could not be read as a torch checkpoint ({err}); the file is truncated or corrupt"
        ) from err
    if not isinstance(obj, Mapping):
        raise AdapterFormatError(f"{path} holds a {type(obj).__name__}; expected a dict: {_EXPECTED_KIND}")
    return obj


def _split_groups(path: Path, obj: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(image_proj, ip_adapter)`` from the nested (pickle) or prefixed (safetensors) layout."""
    if isinstance(obj.get("image_proj"), Mapping) and isinstance(obj.get("ip_adapter"), Mapping):
        groups = {"image_proj": dict(obj["image_proj"]), "ip_adapter": dict(obj["ip_adapter"])}
    else:
        groups = {"image_proj": {}, "ip_adapter": {}}
        for key, value in obj.items():
            prefix, _, rest = str(key).partition(".")
            if prefix in groups and rest:
                groups[prefix][rest] = value
        if not groups["image_proj"] or not groups["ip_adapter"]:
            raise AdapterFormatError(
                f"{path} looks like {_describe_foreign(list(obj))}; expected {_EXPECTED_KIND}"
            )
    for name, group in groups.items():
        for key, value in group.items():
            if not isinstance(value, Tensor):
                raise AdapterFormatError(
                    f"{path}: {name}.{key} is a {type(value).__name__}, expected a tensor"
                )
            if value.dtype not in FLOAT_DTYPES:
                raise AdapterFormatError(
                    f"{path}: {name}.{key} has dtype {value.dtype}; expected float32, float16 or bfloat16"
                )
    return groups["image_proj"], groups["ip_adapter"]


def _describe_foreign(keys: list[Any]) -> str:
    """A guess at what kind of checkpoint holds ``keys``, with a few of them as evidence."""
    names = [str(k) for k in keys]
    sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

    def has(*fragments: str) -> bool:
        return any(n.startswith(fragments) or any(f".{f}" in n for f in fragments) for n in names)

    if has(
        "controlnet_cond_embedding",
        "controlnet_down_blocks",
        "control_model",
        "input_hint_block",
        "zero_convs",
    ):
        kind = "a ControlNet checkpoint"
    elif has("model.diffusion_model", "down_blocks", "conv_in"):
        kind = "a UNet / Stable Diffusion checkpoint"
    elif any("lora" in n for n in names):
        kind = "a LoRA"
    elif not names:
        kind = "an empty checkpoint"
    else:
        kind = "another kind of checkpoint"
    return f"{kind} ({len(names)} keys: {sample})" if names else kind


# --- validation ----------------------------------------------------------------------------------


def _image_proj_kind(sd: Mapping[str, Tensor]) -> str | None:
    """What ``sd`` is when it is the image projection of an adapter other than InstantID, else None."""
    if "perceiver_resampler.proj_in.weight" in sd:
        return "an IP-Adapter FaceID Plus (image_proj holds proj.* and perceiver_resampler.*)"
    if "proj.0.weight" in sd and "norm.weight" in sd:
        return "an IP-Adapter FaceID (image_proj is an MLP: proj.0/proj.2 and norm)"
    if "proj.3.weight" in sd:
        return "an IP-Adapter Full (image_proj is an MLP: proj.0/proj.2/proj.3)"
    if "proj.weight" in sd:
        return "a plain IP-Adapter (image_proj is a linear projection: proj.weight and norm.*)"
    if "latents" in sd and "proj_in.weight" in sd:
        in_dim = sd["proj_in.weight"].shape[-1]
        tokens = sd["latents"].shape[1] if sd["latents"].ndim == 3 else None
        if in_dim != FACE_EMBEDDING_DIM:
            return f"an IP-Adapter Plus (its Resampler takes {in_dim}-d CLIP image features, not a 512-d face embedding)"
        if tokens != NUM_TOKENS:
            return f"another adapter (its Resampler makes {tokens} tokens, InstantID's makes {NUM_TOKENS})"
    return None


def _check_image_proj(path: Path, sd: Mapping[str, Tensor], cross_dim: int) -> None:
    try:
        config = Resampler.config_from_state_dict(sd)
        with torch.device("meta"):
            expected = Resampler(**config).state_dict()
    except (KeyError, ValueError, IndexError, RuntimeError) as err:
        raise AdapterFormatError(
            f"{path}: image_proj is not a Resampler (missing or malformed {err}); expected {_EXPECTED_KIND}"
        ) from None
    problems = [f"missing image_proj.{k}" for k in expected if k not in sd]
    problems += [f"unexpected image_proj.{k}" for k in sd if k not in expected]
    problems += [
        f"image_proj.{k} has shape {list(sd[k].shape)}, expected {list(t.shape)}"
        for k, t in expected.items()
        if k in sd and sd[k].shape != t.shape
    ]
    if config["output_dim"] != cross_dim:
        problems.append(
            f"the Resampler outputs {config['output_dim']}-d tokens but the ip_adapter layers take {cross_dim}-d ones"
        )
    if problems:
        raise AdapterFormatError(_problem_list(path, "image_proj", problems))


def _validate(path: Path, image_proj: dict[str, Tensor], ip_adapter: dict[str, Tensor]) -> InstantIDWeights:
    other = _image_proj_kind(image_proj)
    if other is not None:
        raise AdapterFormatError(f"{path} is {other}; expected {_EXPECTED_KIND}")
    unexpected = [k for k in ip_adapter if not _IP_KEY.match(k)]
    if unexpected:
        hint = " (LoRA layers of an IP-Adapter FaceID)" if any("lora" in k for k in unexpected) else ""
        raise AdapterFormatError(
            _problem_list(
                path, "ip_adapter", [f"unexpected key ip_adapter.{k}{hint}" for k in unexpected[:8]]
            )
        )
    cross_dims = {t.shape[-1] for t in ip_adapter.values()}
    arch = next((a for a, facts in ARCHS.items() if {facts["cross_attention_dim"]} == cross_dims), None)
    if arch is None:
        known = ", ".join(f"{f['cross_attention_dim']} ({a})" for a, f in ARCHS.items())
        raise AdapterFormatError(
            f"{path}: the ip_adapter layers take inputs of width {sorted(cross_dims)}; expected one width of {known}"
        )
    layers = cross_attention_layers(arch)
    cross_dim = ARCHS[arch]["cross_attention_dim"]
    expected = {
        f"{2 * layer.index + 1}.to_{kv}_ip.weight": (layer.hidden_size, cross_dim)
        for layer in layers
        for kv in "kv"
    }
    problems = [f"unexpected key ip_adapter.{k}" for k in ip_adapter if k not in expected]
    missing = [k for k in expected if k not in ip_adapter]
    if missing:
        found_layers = len({k.split(".")[0] for k in ip_adapter})
        problems.append(
            f"{len(missing)} of {len(expected)} keys missing (found {found_layers} layers, an {arch} adapter has "
            f"{len(layers)}), e.g. " + ", ".join(f"ip_adapter.{k}" for k in missing[:4])
        )
    problems += [
        f"ip_adapter.{k} has shape {list(ip_adapter[k].shape)}, expected {list(shape)}"
        for k, shape in expected.items()
        if k in ip_adapter and tuple(ip_adapter[k].shape) != shape
    ]
    if problems:
        raise AdapterFormatError(_problem_list(path, "ip_adapter", problems))
    _check_image_proj(path, image_proj, cross_dim)
    return InstantIDWeights(
        image_proj=image_proj,
        to_k_ip=tuple(ip_adapter[f"{2 * layer.index + 1}.to_k_ip.weight"] for layer in layers),
        to_v_ip=tuple(ip_adapter[f"{2 * layer.index + 1}.to_v_ip.weight"] for layer in layers),
        arch=arch,
        cross_attention_dim=cross_dim,
        hidden_sizes=tuple(layer.hidden_size for layer in layers),
    )


def _problem_list(path: Path, group: str, problems: list[str]) -> str:
    shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
    return f"{path}: {group} does not match {_EXPECTED_KIND}:\n  " + "\n  ".join(shown)
