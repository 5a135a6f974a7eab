"""Per-layer identity weights: a number, a per-transformer dict or a per-layer tensor, shaped by a weight type.

The weight types are those of ComfyUI_IPAdapter_plus, with the same meaning. Curves run over
ComfyUI's ``transformer_index`` ``t`` (the spatial transformers in the order they run: input
blocks, middle, output blocks; ``T`` = 11 for SDXL, 16 for SD1.5):

* ``linear``: 1
* ``ease in``: 0.05 + 0.95 * (1 - t / T)                 (strong early, weak late)
* ``ease out``: 0.05 + 0.95 * t / T                      (weak early, strong late)
* ``ease in-out``: 0.05 + 0.95 * (1 - |t - T/2| / (T/2))  (strongest in the middle)
* ``reverse in-out``: 0.05 + 0.95 * |t - T/2| / (T/2)     (weakest in the middle)
* ``weak input`` / ``weak middle`` / ``weak output``: 0.2 on that block type, 1 elsewhere
* ``strong middle``: 0.2 on the input and output blocks, 1 on the middle block
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from instantid.layout import ARCHS, CrossAttentionLayer, arch_for_num_layers, cross_attention_layers

WEIGHT_TYPES = (
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak middle",
    "weak output",
    "strong middle",
)
_WEAK = 0.2
_FLOOR = 0.05


def _curve(weight_type: str, layer: CrossAttentionLayer, num_transformers: int) -> float:
    t, span, half = layer.transformer_index, num_transformers, num_transformers / 2
    ramps = {
        "ease in": 1 - t / span,
        "ease out": t / span,
        "ease in-out": 1 - abs(t - half) / half,
        "reverse in-out": abs(t - half) / half,
    }
    if weight_type in ramps:
        return _FLOOR + (1 - _FLOOR) * ramps[weight_type]
    weakened = {
        "linear": (),
        "weak input": ("input",),
        "weak middle": ("middle",),
        "weak output": ("output",),
        "strong middle": ("input", "output"),
    }[weight_type]
    return _WEAK if layer.block in weakened else 1.0


def layer_weights(weight: float | Mapping[int, float] | Tensor, weight_type: str, num_layers: int) -> Tensor:
    """The multiplier of each of the adapter's ``num_layers`` layers (float32 ``[num_layers]``, adapter order).

    ``weight`` is a number (every layer), a mapping from ComfyUI transformer index (0..T-1, see
    the module docstring; as in IPAdapter_plus's layer weights) to weight, where transformers not
    listed get 0, or a tensor of ``num_layers`` values in adapter order. The weight type's
    curve multiplies it. Raises ``ValueError`` for an unknown weight type, a layer count no
    architecture has, a dict key out of range or a tensor of the wrong size.
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {weight_type!r}; expected one of {', '.join(WEIGHT_TYPES)}")
    arch = arch_for_num_layers(num_layers)
    layers = cross_attention_layers(arch)
    num_transformers = ARCHS[arch]["num_transformers"]
    if isinstance(weight, Mapping):
        bad = sorted(k for k in weight if not (isinstance(k, int) and 0 <= k < num_transformers))
        if bad:
            raise ValueError(
                f"per-transformer weights need keys 0..{num_transformers - 1} for {arch} "
                f"(ComfyUI transformer indexes), got {bad}"
            )
        base = torch.tensor([float(weight.get(layer.transformer_index, 0.0)) for layer in layers])
    elif isinstance(weight, Tensor) and weight.ndim > 0:
        if weight.shape != (num_layers,):
            raise ValueError(
                f"a per-layer weight tensor must have shape [{num_layers}], got {list(weight.shape)}"
            )
        base = weight.detach().to(device="cpu", dtype=torch.float32)
    else:
        base = torch.full((num_layers,), float(weight))
    curve = torch.tensor([_curve(weight_type, layer, num_transformers) for layer in layers])
    return base * curve
