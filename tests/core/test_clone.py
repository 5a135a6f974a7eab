"""``LazyClonedModel``: proxying, bad input, guarded writes, state loading, clones of clones."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from cow_model import LazyClonedModel, SharedWeightsError, UnknownPathError


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)),
        nn.Linear(8, 2),
    ).eval()


def snapshot(model: nn.Module) -> dict[str, tuple[int, int, torch.Tensor]]:
    return {
        name: (t.data_ptr(), t._version, t.detach().clone())
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }


def assert_unchanged(model: nn.Module, before: dict[str, tuple[int, int, torch.Tensor]]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (ptr, version, value) in before.items():
        assert after[name][:2] == (ptr, version), name
        assert torch.equal(after[name][2], value), name


def test_proxy_is_transparent_and_shares_every_tensor() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    assert isinstance(clone, nn.Sequential)
    assert len(clone) == 3 and clone[2].out_features == 2
    x = torch.randn(5, 4)
    assert torch.equal(clone(x), base(x))
    assert [p.data_ptr() for p in clone.parameters()] == [p.data_ptr() for p in base.parameters()]
    assert clone.private_bytes == 0
    assert clone.shared_bytes == sum(
        t.untyped_storage().nbytes() for t in [*base.parameters(), *base.buffers()]
    )


def test_setattr_on_the_clone_stays_in_the_clone() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    clone.tag = "clone only"
    clone.register_forward_hook(lambda module, args, out: out * 0)
    assert not hasattr(base, "tag")
    assert not base._forward_hooks
    assert torch.count_nonzero(clone(torch.randn(2, 4))) == 0


def test_patch_block_copies_only_the_path() -> None:
    base = small_model()
    before = snapshot(base)
    clone = LazyClonedModel(base)
    patched = clone.patch_block("1.0", lambda m: setattr(m, "bias", nn.Parameter(torch.zeros(8))))
    assert sorted(clone.private_paths) == ["", "1", "1.0"]
    assert clone[1][0] is patched and base[1][0] is not patched
    assert clone[0] is base[0] and clone[1][1] is base[1][1] and clone[2] is base[2]
    assert patched.weight is base[1][0].weight
    assert clone.private_bytes == 8 * 4
    assert_unchanged(base, before)


def test_patch_block_can_replace_a_module() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    replacement = nn.Identity()
    assert clone.patch_block("1.1", lambda m: replacement) is replacement
    assert clone[1][1] is replacement and isinstance(base[1][1], nn.BatchNorm1d)


def test_base_that_is_not_a_module_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module; got builtins\.dict"):
        LazyClonedModel({"weight": torch.zeros(1)})  # type: ignore[arg-type]


def test_unknown_path_lists_the_closest_valid_paths() -> None:
    clone = LazyClonedModel(small_model())
    with pytest.raises(UnknownPathError, match=r"'1\.3'.*1 has no child '3'.*Closest valid paths: .*1\.0"):
        clone.patch_block("1.3", lambda m: None)
    with pytest.raises(UnknownPathError, match=r"Closest valid paths: 1\.1"):
        clone.patch_block("1.11", lambda m: None)


def test_patch_returning_a_non_module_leaves_the_clone_unchanged() -> None:
    clone = LazyClonedModel(small_model())
    with pytest.raises(TypeError, match=r"must return None or a torch\.nn\.Module; got builtins\.str"):
        clone.patch_block("0", lambda m: "oops")  # type: ignore[arg-type,return-value]
    assert clone.private_paths == [""]


def test_conversions_refuse_to_change_shared_tensors() -> None:
    base = small_model()
    before = snapshot(base)
    clone = LazyClonedModel(base)
    for convert in (
        lambda: clone.half(),
        lambda: clone.to(torch.float64),
        lambda: clone.to_empty(device="cpu"),
    ):
        with pytest.raises(SharedWeightsError, match="Convert the base instead"):
            convert()
    assert_unchanged(base, before)
    assert clone.to("cpu") is clone and clone.float() is clone  # no-ops are fine


def test_private_tensors_follow_a_noop_conversion() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    clone.patch_block("2", lambda m: m.register_buffer("extra", torch.ones(2, dtype=torch.float64)))
    clone.to(device="cpu", dtype=None)
    assert clone[2].extra.dtype == torch.float64
    clone._apply(lambda t: t.float() if t.dtype == torch.float64 else t)
    assert clone[2].extra.dtype == torch.float32 and base[2].weight.dtype == torch.float32


def test_requires_grad_changes_the_clone_alone() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    assert clone.requires_grad_(False) is clone
    assert not any(p.requires_grad for p in clone.parameters())
    assert all(p.requires_grad for p in base.parameters())
    assert [p.data_ptr() for p in clone.parameters()] == [p.data_ptr() for p in base.parameters()]
    assert clone.private_bytes == 0


def test_train_and_eval_copy_the_flags_they_change() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    clone.train()
    assert clone.training and clone[1][1].training
    assert not base.training and not base[1][1].training
    assert clone[0].weight is base[0].weight


def test_load_state_dict_loads_into_private_copies() -> None:
    base = small_model()
    before = snapshot(base)
    clone = LazyClonedModel(base)
    new_weight = torch.full((8, 8), 0.5)
    result = clone.load_state_dict({"1.0.weight": new_weight}, strict=False)
    assert "0.weight" in result.missing_keys and not result.unexpected_keys
    assert torch.equal(clone[1][0].weight, new_weight)
    assert clone[1][0].weight.data_ptr() != new_weight.data_ptr()
    assert clone[1][0].bias is base[1][0].bias
    norm = clone[1][1]  # BatchNorm loads through its own loader: it gets private copies of its tensors
    norm_bytes = sum(t.nbytes for t in [*norm.parameters(), *norm.buffers()])
    assert clone.private_bytes == new_weight.nbytes + norm_bytes
    assert_unchanged(base, before)


def test_load_state_dict_checks_everything_before_changing_anything() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    with pytest.raises(RuntimeError, match=r"(?s)(?=.*size mismatch for 2\.weight)(?=.*Unexpected key.*nope)"):
        clone.load_state_dict(
            {"0.weight": torch.zeros(8, 4), "2.weight": torch.zeros(3, 3), "nope": torch.zeros(1)}
        )
    assert clone.private_paths == [""]
    with pytest.raises(RuntimeError, match="Missing key"):
        clone.load_state_dict({"0.weight": torch.zeros(8, 4)})


def test_a_patch_function_cannot_write_shared_tensors_in_place() -> None:
    base = small_model()
    before = snapshot(base)
    clone = LazyClonedModel(base)

    def scale_weight(module: nn.Module) -> None:
        module.tag = "set before the write"
        with torch.no_grad():
            module.weight.mul_(2)

    with pytest.raises(SharedWeightsError, match=r"patch function for '1\.0' would write to '1\.0\.weight'"):
        clone.patch_block("1.0", scale_weight)
    assert_unchanged(base, before)
    assert clone.private_paths == [""] and not hasattr(clone[1][0], "tag")


class WritesItsWeight(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.weight.add_(1)
        return super().forward(x)


def test_check_writes_refuses_a_forward_that_writes_a_shared_tensor_before_the_write() -> None:
    base = nn.Sequential(WritesItsWeight(4, 4)).eval()
    before = snapshot(base)
    clone = LazyClonedModel(base, check_writes=True)
    with pytest.raises(SharedWeightsError, match=r"forward through this clone would write to '0\.weight'"):
        clone(torch.randn(2, 4))
    assert_unchanged(base, before)
    unchecked = LazyClonedModel(base)
    unchecked(torch.randn(2, 4))  # the default forward runs the model's own code, unguarded
    assert not torch.equal(base[0].weight, before["0.weight"][2])


def test_clone_of_a_clone_shares_with_both_and_isolates_later_patches() -> None:
    base = small_model()
    parent = LazyClonedModel(base)
    parent.patch_block("1.0", lambda m: setattr(m, "bias", nn.Parameter(torch.ones(8))))
    child = LazyClonedModel(parent)
    assert child[1][0] is not parent[1][0]  # the child copies what its parent owns (O(parent's patches))
    assert child[1][0].weight is base[1][0].weight  # the base's tensors stay shared
    assert torch.equal(
        child[1][0].bias, parent[1][0].bias
    )  # the parent's trainable bias: the child's own copy
    assert child[0].weight is base[0].weight
    assert child.private_bytes == parent.private_bytes and child.shared_bytes == parent.shared_bytes
    x = torch.randn(3, 4)
    child_out = child(x)
    parent.patch_block("1.0", lambda m: setattr(m, "bias", nn.Parameter(torch.zeros(8))))
    assert torch.equal(child(x), child_out)
    assert child[1][0].bias is not parent[1][0].bias
    assert child.private_bytes == 8 * 4  # its own copy of the bias its parent had when the child was made


def test_copy_makes_a_clone_and_deepcopy_and_pickle_make_plain_modules() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    shallow = copy.copy(clone)
    assert isinstance(shallow, LazyClonedModel) and shallow[0].weight is base[0].weight
    deep = copy.deepcopy(clone)
    assert type(deep) is nn.Sequential and deep[0].weight.data_ptr() != base[0].weight.data_ptr()
    restored = pickle.loads(pickle.dumps(clone))
    assert type(restored) is nn.Sequential and torch.equal(restored[0].weight, base[0].weight)


def test_registered_scoped_methods_act_on_the_clone_alone() -> None:
    from cow_model import register_scoped_method

    def zero_bias_everywhere(module: nn.Module) -> None:  # an in-place mutator, like set_attn_processor
        for child in module.modules():
            if isinstance(child, nn.Linear):
                child.bias = nn.Parameter(torch.zeros_like(child.bias))

    def write_bias_everywhere(module: nn.Module) -> None:
        for child in module.modules():
            if isinstance(child, nn.Linear):
                nn.init.zeros_(child.bias)

    base = small_model()
    before = snapshot(base)
    nn.Sequential.zero_bias_everywhere = zero_bias_everywhere  # type: ignore[attr-defined]
    nn.Sequential.write_bias_everywhere = write_bias_everywhere  # type: ignore[attr-defined]
    try:
        register_scoped_method("zero_bias_everywhere")
        register_scoped_method("write_bias_everywhere")
        clone = LazyClonedModel(base)
        clone.zero_bias_everywhere()
        assert torch.count_nonzero(clone[2].bias) == 0 and clone[2].weight is base[2].weight
        with pytest.raises(SharedWeightsError, match=r"Sequential\.write_bias_everywhere\(\) would write"):
            LazyClonedModel(base).write_bias_everywhere()
        assert_unchanged(base, before)
        with pytest.raises(ValueError, match="'patch_block' is already an attribute"):
            register_scoped_method("patch_block")
    finally:
        del nn.Sequential.zero_bias_everywhere  # type: ignore[attr-defined]
        del nn.Sequential.write_bias_everywhere  # type: ignore[attr-defined]
