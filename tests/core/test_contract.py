"""The isolation contract on plain torch: nothing done through a clone changes its base silently.

One test (or a few) per way a user reaches the base through a clone: clones of clones,
callables bound to the original module, training mode, writes from inside a patch function,
mutating methods, following a converted base, identity, ``check_writes`` and transparency.
Each asserts the base bit for bit (values, dtypes, ``requires_grad``, buffers, module objects,
flags, hooks) and the clone's own behaviour, or the documented ``SharedWeightsError``.
"""

from __future__ import annotations

import copy
import functools
import pickle
import threading
from typing import Any

import pytest
import torch
from torch import nn

from cow_model import LazyClonedModel, SharedWeightsError
from tests.core.helpers import X, assert_same, small_model, state

# -- clones of clones ---------------------------------------------------------------------------


def test_a_child_never_converts_what_its_parent_replaced_or_its_base() -> None:
    base = small_model()
    before = state(base)
    parent = LazyClonedModel(base)
    parent.patch_block("2", lambda m: nn.Linear(8, 2))
    parent.load_state_dict({"0.bias": torch.zeros(8)}, strict=False)
    child = LazyClonedModel(parent)
    assert (
        child.private_bytes == parent.private_bytes
    )  # the child trains its own copies of what its parent made
    with pytest.raises(SharedWeightsError, match="Convert the base instead"):
        child.double()
    child.requires_grad_(False)
    assert all(p.requires_grad for p in parent.parameters()) and all(
        p.requires_grad for p in base.parameters()
    )
    parent_out = parent(X)
    parent.float()
    parent.requires_grad_(False)
    assert all(not p.requires_grad for p in parent.parameters())
    parent.patch_block("2", lambda m: setattr(m, "bias", nn.Parameter(torch.ones(2))))
    assert torch.equal(child(X), parent_out)  # the parent's later changes do not reach its child
    assert_same(before, base)


# -- callables bound to the original --------------------------------------------------------------


def zero_output(module: nn.Module) -> None:
    module.register_forward_hook(lambda m, args, out: torch.zeros_like(out))


def test_an_instance_level_forward_runs_the_clones_patches() -> None:
    base = small_model()
    base[2].forward = base[2].forward  # a bound method in the instance dict
    base[1].forward = functools.partial(type(base[1]).forward, base[1])  # as accelerate's hooks install it
    before = state(base)
    clone = LazyClonedModel(base)
    clone.patch_block("1.0", zero_output)
    clone.patch_block("2", lambda m: setattr(m, "bias", nn.Parameter(torch.full((2,), 3.0))))
    out = clone(X)
    assert torch.equal(
        out,
        torch.full((5, 2), 3.0)
        + base[2].weight.sum() * 0
        + (base[1][1](torch.zeros(5, 8)) @ base[2].weight.T),
    )
    assert_same(before, base)


def test_accelerate_hooks_run_on_the_clone() -> None:
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    base = small_model()
    accelerate_hooks.add_hook_to_module(base[1], accelerate_hooks.ModelHook())
    before = state(base)
    clone = LazyClonedModel(base)
    clone.patch_block("1.0", zero_output)
    expected = base[2](base[1][1](torch.zeros(5, 8)))
    assert torch.allclose(clone(X), expected)
    assert not torch.allclose(base(X), expected)
    assert_same(before, base)


def test_compiled_models_run_the_clones_patches() -> None:
    base = small_model()
    base.compile(backend="eager")
    clone = LazyClonedModel(base)
    clone.patch_block("2", zero_output)
    assert torch.count_nonzero(clone(X)) == 0 and torch.count_nonzero(base(X)) > 0

    wrapped = LazyClonedModel(torch.compile(small_model(), backend="eager"))
    wrapped.patch_block("_orig_mod.2", zero_output)
    assert torch.count_nonzero(wrapped(X)) == 0

    own = LazyClonedModel(small_model())
    own.compile(backend="eager")
    own.patch_block("", zero_output)
    assert torch.count_nonzero(own(X)) == 0


def test_torch_compile_fullgraph_traces_a_clone() -> None:
    clone = LazyClonedModel(small_model())
    clone.patch_block("2", lambda m: setattr(m, "bias", nn.Parameter(torch.ones(2))))
    compiled = torch.compile(clone, fullgraph=True, backend="eager")
    assert torch.equal(compiled(X), clone(X))


# -- training mode --------------------------------------------------------------------------------


class CountsTrain(nn.Sequential):
    calls: list[bool]

    def train(self, mode: bool = True) -> CountsTrain:
        self.calls = [*getattr(self, "calls", []), mode]
        return super().train(mode)


def test_training_mode_forward_writes_only_the_clones_buffers() -> None:
    base = small_model()
    before = state(base)
    clone = LazyClonedModel(base)
    clone.train()
    clone(X)
    assert clone.training and not base.training
    assert not torch.equal(clone[1][1].running_mean, base[1][1].running_mean)
    assert int(clone[1][1].num_batches_tracked) == 1
    assert clone[1][0].weight is base[1][0].weight  # parameters stay shared
    assert_same(before, base)


def test_a_base_left_in_training_mode_is_not_written_by_a_clones_forward() -> None:
    base = small_model().train()
    before = state(base)
    LazyClonedModel(base)(X)
    assert_same(before, base)


def test_train_runs_the_models_own_override_and_reaches_every_path_of_a_shared_module() -> None:
    shared = nn.Linear(4, 4)
    base = CountsTrain(shared, nn.ReLU(), shared).eval()
    base.calls = []
    clone = LazyClonedModel(base)
    clone.train()
    assert clone.calls == [True] and base.calls == []
    assert clone[0] is clone[2] and clone[0].training and not shared.training


# -- writes from inside a patch function ----------------------------------------------------------


def test_parametrizations_inside_a_patch_act_on_the_clone() -> None:
    from torch.nn.utils import parametrizations, parametrize

    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    before = state(base)
    clone = LazyClonedModel(base)
    clone.patch_block("0", parametrizations.orthogonal)
    clone.patch_block("1", lambda m: parametrizations.weight_norm(m))
    assert parametrize.is_parametrized(clone[0]) and not parametrize.is_parametrized(base[0])
    optimizer = torch.optim.SGD([p for p in clone.parameters() if p.requires_grad], lr=0.1)
    base.requires_grad_(False)
    clone(X).sum().backward()
    optimizer.step()
    base.requires_grad_(True)
    assert_same(before, base)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_an_identity_right_inverse_is_no_false_positive_of_check_writes() -> None:
    from torch.nn.utils import parametrize

    base = small_model()
    before = state(base)
    clone = LazyClonedModel(base, check_writes=True)
    clone.patch_block("0", lambda m: parametrize.register_parametrization(m, "weight", Identity()))
    assert torch.equal(clone(X), base(X))
    assert_same(before, base)


def test_a_patch_reaching_a_shared_childs_hooks_or_config_stays_in_the_clone() -> None:
    base = small_model()
    base[1].config = {"scale": 1}
    before = state(base)
    clone = LazyClonedModel(base)

    def patch(block: nn.Module) -> None:
        block[0].register_forward_hook(lambda m, args, out: out * 0)
        block.config["scale"] = 2

    clone.patch_block("1", patch)
    assert base[1].config == {"scale": 1} and clone[1].config == {"scale": 2}
    assert clone[2].weight is base[2].weight
    assert_same(before, base)


# -- mutating methods -----------------------------------------------------------------------------


def test_apply_share_memory_and_zero_grad_are_scoped_or_refused() -> None:
    base = small_model()
    base(X).sum().backward()
    before = state(base)
    clone = LazyClonedModel(base)
    with pytest.raises(SharedWeightsError, match=r"Sequential\.apply\(\) would write"):
        clone.apply(lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None)
    clone.apply(lambda m: setattr(m, "marked", True))
    assert all(getattr(m, "marked", False) for m in clone.modules())
    assert not any(hasattr(m, "marked") for m in base.modules())
    with pytest.raises(SharedWeightsError, match="share_memory"):
        clone.share_memory()
    clone.zero_grad()
    assert_same(before, base)


# -- following the base, ties, identity -----------------------------------------------------------


def test_a_converted_base_is_followed_buffers_included() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    clone.patch_block("1.1", lambda m: setattr(m, "eps", 1e-3))
    base.double()
    reference = copy.deepcopy(base)
    reference[1][1].eps = 1e-3
    assert torch.equal(clone(X.double()), reference(X.double()))
    assert {t.dtype for t in [*clone.parameters(), *clone.buffers()] if t.is_floating_point()} == {
        torch.float64
    }


def test_load_state_dict_keeps_ties() -> None:
    shared = nn.Linear(4, 4)
    base = nn.Sequential(shared, nn.ReLU(), shared).eval()
    clone = LazyClonedModel(base)
    clone.load_state_dict({name: torch.zeros_like(t) for name, t in base.state_dict().items()})
    assert clone[0] is clone[2] and clone[0].weight is clone[2].weight
    assert torch.count_nonzero(clone[0].weight) == 0 and torch.count_nonzero(shared.weight) > 0
    embedding = nn.Embedding(10, 4)
    tied = nn.ModuleDict({"embed": embedding, "head": nn.Linear(4, 10, bias=False)})
    tied.head.weight = embedding.weight
    tied_clone = LazyClonedModel(tied)
    tied_clone.load_state_dict({"embed.weight": torch.ones(10, 4)}, strict=False)
    assert tied_clone.head.weight is tied_clone.embed.weight and torch.count_nonzero(tied.head.weight - 1)


def test_load_state_dict_with_assign_installs_the_given_tensors_on_meta_modules_too() -> None:
    with torch.device("meta"):
        base = nn.Sequential(nn.Linear(4, 4)).eval()
    clone = LazyClonedModel(base)
    weight, bias = torch.ones(4, 4), torch.zeros(4)
    clone.load_state_dict({"0.weight": weight, "0.bias": bias}, assign=True)
    assert clone[0].weight.device.type == "cpu" and clone[0].weight.data_ptr() == weight.data_ptr()
    assert base[0].weight.device.type == "meta" and clone.private_bytes == weight.nbytes + bias.nbytes


def test_hook_handles_and_hash_survive_train_eval_and_root_patches() -> None:
    clone = LazyClonedModel(small_model())
    key = hash(clone)
    members = {clone}
    handle = clone.register_forward_hook(lambda m, args, out: out * 0)
    clone.train()
    clone.eval()
    clone.patch_block("", lambda m: setattr(m, "tag", 1))
    assert hash(clone) == key and clone in members
    assert torch.count_nonzero(clone(X)) == 0
    handle.remove()
    assert torch.count_nonzero(clone(X)) > 0


# -- check_writes, copies, transparency ---------------------------------------------------------


def test_check_writes_adds_nothing_to_pickles_copies_or_child_clones() -> None:
    base = small_model()
    clone = LazyClonedModel(base, check_writes=True)
    restored = pickle.loads(pickle.dumps(clone))
    assert type(restored) is nn.Sequential and not restored._forward_pre_hooks
    deep = copy.deepcopy(clone)
    assert type(deep) is nn.Sequential
    child = LazyClonedModel(clone)
    assert not child._cow.check_writes


def test_the_clone_reads_as_the_model_class() -> None:
    clone = LazyClonedModel(small_model())
    assert type(clone).__name__ == "Sequential" and clone.__class__ is nn.Sequential
    with pytest.raises(AttributeError, match="'Sequential' object has no attribute 'nope'"):
        _ = clone.nope
    holder = nn.Module()
    holder.base = nn.Linear(2, 2)
    assert LazyClonedModel(holder).base is holder.base  # the model's own attribute wins


# -- threads --------------------------------------------------------------------------------------


def work(clone: LazyClonedModel, seed: int) -> torch.Tensor:
    clone.patch_block("2", lambda m: setattr(m, "bias", nn.Parameter(torch.full((2,), float(seed)))))
    clone.patch_block("0", lambda m: m.register_buffer("extra", torch.ones(1, dtype=torch.float64)))
    clone.float()
    clone.train()
    out = clone(X + seed)
    clone.eval()
    return torch.cat([out, clone(X)])


def test_eight_threads_on_eight_clones_of_one_base() -> None:
    base = small_model()
    before = state(base)
    alone = [work(LazyClonedModel(base), seed) for seed in range(8)]
    results: list[Any] = [None] * 8
    barrier = threading.Barrier(8)

    def run(seed: int) -> None:
        barrier.wait()
        results[seed] = work(LazyClonedModel(base), seed)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, expected in zip(results, alone, strict=True):
        assert torch.equal(got, expected)
    assert_same(before, base)
