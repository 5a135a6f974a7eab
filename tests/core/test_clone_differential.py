"""``LazyClonedModel`` against deepcopy-then-patch, on random module trees and patch sequences.

After every patch, every clone in the chain (clones of clones included) must compute exactly
what its deep-copied counterpart computes, and the base must be bitwise unchanged: values,
data pointers, version counters, and the module objects at every path.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cow_model import LazyClonedModel


class Scaled(nn.Module):
    """A leaf whose forward depends on a plain attribute, as attention processors' scales do."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.linear = seeded_linear(seed)
        self.scale = 1.0
        self.register_buffer("offset", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale + self.offset


def seeded_linear(seed: int) -> nn.Linear:
    layer = nn.Linear(4, 4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 4, generator=generator) * 0.5)
        layer.bias.copy_(torch.randn(4, generator=generator) * 0.1)
    return layer


def random_tree(rng: random.Random, depth: int) -> nn.Module:
    if depth == 0 or rng.random() < 0.3:
        return Scaled(rng.randrange(1000)) if rng.random() < 0.5 else seeded_linear(rng.randrange(1000))
    return nn.Sequential(*(random_tree(rng, depth - 1) for _ in range(rng.randint(1, 3))))


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything about a base that must not change: module identities, tensors and their counters."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        "modules": [
            (name, id(module), getattr(module, "scale", None)) for name, module in model.named_modules()
        ],
        "tensors": {
            name: (id(t), t.data_ptr(), t._version, t.detach().clone()) for name, t in tensors.items()
        },
    }


def same_fingerprint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["modules"] != b["modules"] or a["tensors"].keys() != b["tensors"].keys():
        return False
    return all(
        a["tensors"][k][:3] == b["tensors"][k][:3] and torch.equal(a["tensors"][k][3], b["tensors"][k][3])
        for k in a["tensors"]
    )


def tensor_ids(model: nn.Module) -> dict[int, torch.Tensor]:
    return {id(t): t for t in [*model.parameters(), *model.buffers()]}


def make_patch(kind: str, seed: int) -> Any:
    """A patch function; the same function is applied to the clone and to the deep copy."""

    def patch(module: nn.Module) -> nn.Module | None:
        if kind == "replace":
            return seeded_linear(seed)
        if kind == "scale" and isinstance(module, Scaled):
            module.scale = 1.0 + seed % 7
        elif kind == "bias" and isinstance(module, nn.Linear):
            module.bias = nn.Parameter(torch.full((4,), float(seed % 5)))
        elif kind == "offset" and isinstance(module, Scaled):
            module.offset = torch.full((4,), float(seed % 3))
        elif kind == "append" and isinstance(module, nn.Sequential):
            module.append(seeded_linear(seed))
        elif kind == "fail":
            module.extra = "half-done"  # type: ignore[assignment]
            raise RuntimeError("patch failed midway")
        return None

    return patch


def patch_reference(model: nn.Module, path: str, patch: Any) -> nn.Module:
    """Apply ``patch`` in place to the module at ``path`` of a deep copy; returns the (new) root."""
    if not path:
        return patch(model) or model
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    replacement = patch(parent._modules[name])
    if replacement is not None:
        parent._modules[name] = replacement
    return model


patch_ops = st.lists(
    st.tuples(
        st.sampled_from(["replace", "scale", "bias", "offset", "append", "fail", "clone"]),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=2000)
@given(seed=st.integers(0, 10**6), ops=patch_ops)
def test_clone_matches_deepcopy_then_patch(seed: int, ops: list[tuple[str, int, int]]) -> None:
    base = random_tree(random.Random(seed), depth=3).eval()  # a training-mode base: test_contract.py
    before = fingerprint(base)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    chain: list[tuple[LazyClonedModel, nn.Module]] = [(LazyClonedModel(base), copy.deepcopy(base))]
    inherited = [tensor_ids(base)]  # ownership is decided once: what a clone starts with is shared

    for kind, where, patch_seed in ops:
        clone, reference = chain[-1]
        if kind == "clone":
            chain.append((LazyClonedModel(clone), copy.deepcopy(reference)))
            inherited.append(tensor_ids(clone))
            continue
        paths = [name for name, _ in clone.named_modules() if name or kind != "replace"]  # the root stays
        if not paths:
            continue
        path = paths[where % len(paths)]
        patch = make_patch(kind, patch_seed)
        if kind == "fail":
            outputs = clone(x)
            try:
                clone.patch_block(path, patch)
            except RuntimeError:
                pass
            assert torch.equal(clone(x), outputs)
            assert not any(hasattr(m, "extra") for m in clone.modules())
        else:
            installed = clone.patch_block(path, patch)
            assert installed is (clone.get_submodule(path) if path else clone)
            chain[-1] = (clone, patch_reference(reference, path, patch))
        for earlier, expected in chain:
            assert torch.equal(earlier(x), expected(x))
        assert same_fingerprint(fingerprint(base), before)

    for (clone, _), at_start in zip(chain, inherited, strict=True):
        mine = [*clone.parameters(), *clone.buffers()]
        shared_storages = {t.untyped_storage().data_ptr() for t in at_start.values()}
        shared = sum(
            t.untyped_storage().nbytes() for t in mine if t.untyped_storage().data_ptr() in shared_storages
        )
        assert (clone.shared_bytes, clone.private_bytes) == (
            shared,
            sum(t.untyped_storage().nbytes() for t in mine) - shared,
        )
