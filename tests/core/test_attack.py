"""Ways a user reached the base through a clone (plain torch), found by attacking it.

Every test asserts the contract (the base is never changed through a clone; where an operation
would change a shared tensor it acts on private copies or raises SharedWeightsError) or that the
clone behaves as a ``copy.deepcopy`` given the same call.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from cow_model import LazyClonedModel, SharedWeightsError
from tests.core.helpers import X, assert_same, small_model, state


class Tied(nn.Module):
    """An embedding and a head that a user ties (``head.weight = emb.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.emb(ids)))


def tied_model() -> Tied:
    torch.manual_seed(0)
    return Tied().eval()


IDS = torch.tensor([[1, 2, 3]])


def freeze_weight(module: nn.Module) -> None:
    """A patch that gives the clone an alias of ``module.weight`` (a private object viewing shared bytes)."""
    module.weight.requires_grad_(False)


# -- training: aliases made by requires_grad_ view the base's bytes ------------------------------


def test_requires_grad_true_then_an_optimizer_step_never_writes_a_frozen_base() -> None:
    base = small_model()
    base.requires_grad_(False)
    before = state(base)
    clone = LazyClonedModel(base)
    try:
        clone.requires_grad_(True)
        optimizer = torch.optim.SGD([p for p in clone.parameters() if p.requires_grad], lr=0.1)
        clone(X).sum().backward()
        optimizer.step()
    except SharedWeightsError:
        pass  # refusing is allowed; writing the base is not
    assert_same(before, base)


def test_training_a_child_clone_never_writes_what_its_parent_owns() -> None:
    base = small_model()
    base.requires_grad_(False)
    parent = LazyClonedModel(base)
    parent.patch_block("2", lambda m: setattr(m, "weight", nn.Parameter(torch.randn(2, 8))))
    parent_before = state(parent)
    child = LazyClonedModel(parent)
    try:
        optimizer = torch.optim.SGD([p for p in child.parameters() if p.requires_grad], lr=1.0)
        child(X).sum().backward()
        optimizer.step()
    except SharedWeightsError:
        pass
    assert_same(parent_before, parent)


def tie_in_clone(clone: LazyClonedModel) -> None:
    clone.patch_block("head", lambda head: setattr(head, "weight", clone.emb.weight))


def test_a_tensor_tied_in_by_a_patch_is_not_converted_in_the_base() -> None:
    base = tied_model()
    before = state(base)
    clone = LazyClonedModel(base)
    tie_in_clone(clone)
    with pytest.raises(SharedWeightsError):
        clone.half()  # mid.weight is shared: refusing is documented
    assert_same(before, base)


def test_a_tensor_tied_in_by_a_patch_is_still_guarded() -> None:
    base = tied_model()
    before = state(base)
    clone = LazyClonedModel(base)
    tie_in_clone(clone)
    try:
        clone.apply(lambda m: isinstance(m, nn.Embedding) and nn.init.zeros_(m.weight))
    except SharedWeightsError:
        pass
    assert_same(before, base)


def test_a_patch_function_cannot_write_shared_tensors_outside_its_path() -> None:
    base = small_model()
    before = state(base)
    clone = LazyClonedModel(base)

    def patch(module: nn.Module) -> None:
        with torch.no_grad():
            clone[2].weight.zero_()

    with pytest.raises(SharedWeightsError):
        clone.patch_block("1", patch)
    assert_same(before, base)


def test_a_scoped_method_called_inside_a_patch_function_is_refused_and_nothing_changes() -> None:
    base = small_model()
    before = state(base)
    clone = LazyClonedModel(base)
    clone_before = [(name, id(m), m.training) for name, m in clone.named_modules()]

    def patch(module: nn.Module) -> None:
        module.tag = "half-done"
        clone.train()

    with pytest.raises(
        SharedWeightsError,
        match=r"train\(True\)\. was called inside the patch function|inside the patch function",
    ):
        clone.patch_block("1", patch)
    assert_same(before, base)
    assert [(name, id(m), m.training) for name, m in clone.named_modules()] == clone_before


def test_a_module_returned_by_a_patch_function_is_the_clones_own() -> None:
    clone = LazyClonedModel(small_model())
    clone.patch_block("2", lambda m: nn.Linear(8, 2))
    assert "2" in clone.private_paths
    assert clone.private_bytes == sum(t.untyped_storage().nbytes() for t in clone[2].parameters())


# -- methods of the root that are not scoped ----------------------------------------------------


def test_set_submodule_acts_on_the_clone_alone() -> None:
    base = small_model()
    before = state(base)
    clone = LazyClonedModel(base)
    clone.set_submodule("1.0", nn.Identity())
    assert_same(before, base)
    assert isinstance(clone.get_submodule("1.0"), nn.Identity)


def test_in_place_dynamic_quantization_inside_patch_block_root_leaves_the_base() -> None:
    """A library function that edits a model in place runs on a clone inside ``patch_block("", fn)``."""
    base = small_model()
    before = state(base)
    clone = LazyClonedModel(base)
    reference = copy.deepcopy(base)
    clone.patch_block(
        "", lambda m: torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8, inplace=True)
    )
    torch.ao.quantization.quantize_dynamic(reference, {nn.Linear}, dtype=torch.qint8, inplace=True)
    with torch.no_grad():
        assert torch.equal(clone(X), reference(X))
    assert_same(before, base)


# -- following the base -------------------------------------------------------------------------


def test_a_clone_with_aliases_follows_a_base_converted_into_new_parameter_objects() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    clone.patch_block("0", freeze_weight)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        base.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    with torch.no_grad():
        assert torch.equal(clone(X.double()), base(X.double()))


def test_a_clone_never_runs_a_mixed_tree_after_the_base_assigns_new_tensors() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    clone.patch_block("0", freeze_weight)
    old = {k: v.clone() for k, v in clone.state_dict().items()}
    torch.manual_seed(7)
    base.load_state_dict(
        {k: torch.randn_like(v.float()).to(v.dtype) for k, v in base.state_dict().items()}, assign=True
    )
    with torch.no_grad():
        clone(X)  # a call: the clone follows the base here, if it does
    now = clone.state_dict()
    followed = all(torch.equal(now[k], v) for k, v in base.state_dict().items())
    kept = all(torch.equal(now[k], v) for k, v in old.items())
    assert followed or kept, "the clone holds some of the base's new tensors and some old ones"


# -- threads ------------------------------------------------------------------------------------


def test_a_scoped_method_in_one_thread_while_another_patches_the_same_clone_leaves_the_base() -> None:
    base = small_model()
    before = state(base)
    clone = LazyClonedModel(base)
    inside = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def slow_patch(module: nn.Module) -> None:
        inside.set()
        release.wait(5)

    def patcher() -> None:
        clone.patch_block("1", slow_patch)

    def initializer() -> None:
        inside.wait(5)
        release.set()  # the patcher goes on while this thread's apply() waits for the clone
        try:
            clone.apply(lambda m: isinstance(m, nn.Linear) and nn.init.zeros_(m.weight))
        except SharedWeightsError:
            pass
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=patcher), threading.Thread(target=initializer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert_same(before, base)
