"""Issue 14's second attack, items 1, 2, 4, 5, 6 and the smaller ones of the core: one test per finding.

Each builds a small model, does what a torch or PEFT user did, and asserts the base bit for bit
unchanged (``tests.core.helpers.assert_same``) and the clone as documented, or the documented
refusal with the clone unchanged.
"""

from __future__ import annotations

import copy
import gc
import sys
import threading
import weakref

import pytest
import torch
from torch import nn

from cow_model import LazyClonedModel, SharedWeightsError
from tests.core.helpers import X, assert_same, small_model, state


def sgd_step(model: nn.Module, lr: float = 1.0) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr)
    model(X).sum().backward()
    optimizer.step()


def values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# -- item 1: aliases are stand-ins, never owned ---------------------------------------------------


def _parent_with_own_frozen_layer() -> tuple[nn.Module, LazyClonedModel]:
    base = small_model()
    base.requires_grad_(False)
    parent = LazyClonedModel(base)
    parent.patch_block("1", lambda m: m.__setitem__(1, nn.BatchNorm1d(8).eval().requires_grad_(False)))
    return base, parent


def test_a_child_keeps_its_statistics_when_its_parent_trains_its_own_batchnorm() -> None:
    base, parent = _parent_with_own_frozen_layer()
    before = state(base)
    child = LazyClonedModel(parent)
    child_before = values(child)
    parent.train()
    parent(X)
    assert not torch.equal(parent.state_dict()["1.1.running_mean"], child_before["1.1.running_mean"])
    assert same_values(values(child), child_before)
    assert_same(before, base)


def test_unfreezing_a_child_and_stepping_never_writes_its_parents_frozen_tensors() -> None:
    base, parent = _parent_with_own_frozen_layer()
    parent.patch_block(
        "2", lambda m: setattr(m, "weight", nn.Parameter(torch.randn(2, 8), requires_grad=False))
    )
    before, parent_before = state(base), values(parent)
    child = LazyClonedModel(parent)
    child.requires_grad_(True)
    sgd_step(child)
    assert same_values(values(parent), parent_before)
    assert not torch.equal(child.state_dict()["2.weight"], parent_before["2.weight"])
    assert_same(before, base)


def test_refreezing_and_unfreezing_after_the_base_froze_gives_private_bytes() -> None:
    base = small_model()
    before_values = values(base)
    clone = LazyClonedModel(base)
    clone.requires_grad_(False)
    base.requires_grad_(False)
    before = state(base)
    clone.requires_grad_(True)
    sgd_step(clone)
    assert_same(before, base)
    assert same_values(values(base), before_values)
    assert not torch.equal(clone.state_dict()["0.weight"], before_values["0.weight"])


def test_a_tagged_parameter_made_trainable_gets_private_bytes() -> None:
    base = small_model()
    base.requires_grad_(False)
    before = state(base)
    clone = LazyClonedModel(base)
    clone.patch_block("0", lambda m: setattr(m.weight, "tag", "mine"))
    clone.requires_grad_(True)
    sgd_step(clone)
    assert_same(before, base)
    assert clone[0].weight.tag == "mine"
    assert not torch.equal(clone[0].weight, base[0].weight)


def test_an_alias_unfrozen_outside_any_scope_trains_private_bytes() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    clone.requires_grad_(False)  # base trainable: the clone holds aliases
    before = state(base)
    for p in clone.parameters():
        if p.requires_grad is False:
            p.requires_grad_(True)  # the clone's own alias objects
    sgd_step(clone)
    assert_same(before, base)


def test_a_child_of_a_frozen_clone_follows_the_base_like_its_parent() -> None:
    base = small_model()
    parent = LazyClonedModel(base)
    parent.requires_grad_(False)  # aliases of the base's (trainable) parameters
    child = LazyClonedModel(parent)
    fresh = small_model(seed=7).state_dict()
    base.load_state_dict(fresh, assign=True)
    with torch.no_grad():
        expected = base(X)
        assert torch.equal(parent(X), expected)
        assert torch.equal(child(X), expected)


# -- item 2: rollback restores the clone's own tensors too ----------------------------------------


def _clone_owning_layer_0() -> tuple[nn.Module, LazyClonedModel]:
    """A clone owning the first layer, so a whole-tree method reaches the clone's own tensors first."""
    base = small_model()
    clone = LazyClonedModel(base)
    clone.patch_block("0", lambda m: setattr(m, "weight", nn.Parameter(torch.randn(8, 4))))
    return base, clone


def test_a_refused_conversion_leaves_the_clones_own_layers_unconverted() -> None:
    base, clone = _clone_owning_layer_0()
    before, clone_before = state(base), values(clone)
    own = clone[0].weight
    with pytest.raises(SharedWeightsError):
        clone.double()
    assert same_values(values(clone), clone_before)
    assert clone[0].weight is own and own.dtype == torch.float32
    assert_same(before, base)


def test_a_refused_apply_leaves_the_clones_own_layers_unwritten() -> None:
    base, clone = _clone_owning_layer_0()
    before, clone_before = state(base), values(clone)

    def zero(module: nn.Module) -> None:
        for p in module.parameters(recurse=False):
            nn.init.zeros_(p)

    with pytest.raises(SharedWeightsError):
        clone.apply(zero)
    assert same_values(values(clone), clone_before)
    assert_same(before, base)


def test_a_patch_writing_the_clones_own_buffer_then_raising_keeps_nothing() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    clone.patch_block("1", lambda m: m.__setitem__(1, nn.BatchNorm1d(8).eval()))
    before, clone_before = state(base), values(clone)

    def write_then_fail(m: nn.Module) -> None:
        m[1].running_mean.fill_(5.0)
        m[1].weight.requires_grad_(False)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        clone.patch_block("1", write_then_fail)
    assert same_values(values(clone), clone_before)
    assert clone[1][1].weight.requires_grad
    assert_same(before, base)


# -- item 4: training-mode buffers are decided at forward time -------------------------------------


@pytest.mark.parametrize(
    "make_training",
    [
        lambda c: c.patch_block("1", lambda m: m.train()),
        lambda c: c.apply(lambda m: m.train()),
        lambda c: c.patch_block("1.1", lambda m: setattr(m, "training", True)),
    ],
    ids=["patch_block-train", "apply-train", "training-flag"],
)
def test_a_module_put_in_training_mode_any_way_gets_private_buffers(make_training) -> None:  # type: ignore[no-untyped-def]
    base = small_model()
    before = state(base)
    clone = LazyClonedModel(base)
    make_training(clone)
    clone(X)
    assert_same(before, base)
    assert not torch.equal(clone.state_dict()["1.1.running_mean"], base.state_dict()["1.1.running_mean"])


def test_a_base_with_one_module_in_training_mode_is_not_written_by_a_plain_forward() -> None:
    base = small_model()
    base.eval()
    base[1][1].train()
    before = state(base)
    clone = LazyClonedModel(base)
    clone(X)
    assert_same(before, base)


# -- item 5: the protected set is read from the base when a scope opens ----------------------------


def test_a_module_the_base_gains_after_a_first_patch_is_protected() -> None:
    base = small_model()
    clone = LazyClonedModel(base)
    clone.patch_block("0", lambda m: setattr(m, "bias", nn.Parameter(torch.zeros(8))))
    base[1][0] = nn.Linear(8, 8)  # a replaced child in a subtree the clone shares
    before = state(base)

    def zero(m: nn.Module) -> None:
        m[0].weight.data.zero_()

    with pytest.raises(SharedWeightsError):
        clone.patch_block("1", zero)
    assert_same(before, base)


# -- item 6: nothing of a scope is reachable from the tree; no cycles ------------------------------


def test_deepcopy_and_fusion_of_children_work_inside_a_scope() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    before = state(base)
    clone = LazyClonedModel(base)
    got: dict[str, nn.Module] = {}

    def fuse(m: nn.Module) -> None:
        got["copy"] = copy.deepcopy(m[0])
        got["fused"] = torch.nn.utils.fusion.fuse_conv_bn_eval(m[0], m[1])
        got["ao"] = torch.ao.quantization.fuse_modules(m, [["0", "1", "2"]])

    clone.patch_block("", fuse)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(got["ao"](x), base(x), atol=1e-5)
        assert torch.allclose(torch.relu(got["fused"](x)), base(x), atol=1e-5)
        assert torch.equal(got["copy"](x), base[0](x))
    assert_same(before, base)


def test_peft_modules_to_save_inside_patch_block_root() -> None:
    peft = pytest.importorskip("peft")
    base = small_model()
    before = state(base)
    clone = LazyClonedModel(base)
    config = peft.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2)
    clone.patch_block("", lambda m: peft.inject_adapter_in_model(config, m))
    with torch.no_grad():
        clone(X)
    assert_same(before, base)
    assert "modules_to_save" in dict(clone.named_modules()).get("2", nn.Module())._modules


def test_add_adapter_with_modules_to_save_on_a_diffusers_clone() -> None:
    peft = pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    import cow_model.diffusers  # noqa: F401 - registers add_adapter as scoped
    from instantid.testing.tiny_pipelines import tiny_sdxl_unet

    unet = tiny_sdxl_unet(seed=0)
    before = state(unet)
    clone = LazyClonedModel(unet)
    config = peft.LoraConfig(
        r=2, target_modules=["to_q"], modules_to_save=["conv_out"], init_lora_weights=False
    )
    clone.add_adapter(config)
    assert type(clone.conv_out).__name__ == "ModulesToSaveWrapper"
    assert type(unet.conv_out) is nn.Conv2d
    assert_same(before, unet)


def test_a_dropped_clone_is_freed_by_reference_counting() -> None:
    base = small_model()
    gc.collect()
    gc.disable()
    try:
        clone = LazyClonedModel(base)
        clone.patch_block("2", lambda m: setattr(m, "weight", nn.Parameter(torch.randn(2, 8))))
        clone.train()
        clone.eval()
        clone.requires_grad_(False)
        with pytest.raises(SharedWeightsError):
            clone.double()
        clone(X)
        child = LazyClonedModel(clone)
        child.patch_block("0", lambda m: setattr(m, "note", 1))
        refs = [weakref.ref(clone), weakref.ref(clone[2].weight), weakref.ref(child)]
        del clone, child
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()


# -- the smaller items -----------------------------------------------------------------------------


class TiedPaths(nn.Module):
    """T5's layout: one embedding module at ``shared`` and at ``encoder.embed_tokens``."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.embed_tokens = self.shared
        self.encoder.proj = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.proj(self.encoder.embed_tokens(ids))


@pytest.mark.parametrize("path", ["shared", "encoder.embed_tokens"])
def test_a_module_at_several_paths_is_patched_at_every_path(path: str) -> None:
    torch.manual_seed(0)
    base = TiedPaths().eval()
    before = state(base)
    ids = torch.tensor([[1, 2, 3]])
    others = [LazyClonedModel(base) for _ in range(3)]  # clones sharing the module: more references to it
    for other in others:
        other.patch_block("encoder", lambda m: setattr(m, "note", 1))
    clone = LazyClonedModel(base)
    new = nn.Parameter(torch.randn(10, 4))
    clone.patch_block(path, lambda m: setattr(m, "weight", new))
    assert clone.shared is clone.encoder.embed_tokens
    assert clone.shared.weight is new
    with torch.no_grad():
        assert not torch.equal(clone(ids), base(ids))
    assert_same(before, base)


class RootBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(3))
        self.lin = nn.Linear(3, 3)


def test_state_dict_reports_the_base_conversion_for_root_buffers() -> None:
    base = RootBuffer()
    clone = LazyClonedModel(base)
    base.double()
    assert {k: v.dtype for k, v in clone.state_dict().items()} == {
        k: v.dtype for k, v in base.state_dict().items()
    }
    assert [b.dtype for b in clone.buffers()] == [torch.float64]


def test_a_forward_racing_scopes_on_the_same_clone_never_sees_a_dict_change_size() -> None:
    base = nn.Sequential(*[nn.Identity() for _ in range(200)], small_model())
    clone = LazyClonedModel(base)
    errors: list[BaseException] = []
    stop = threading.Event()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, between any two bytecodes

    def forward() -> None:
        with torch.no_grad():
            while not stop.is_set():
                try:
                    clone(X)
                except BaseException as error:  # the race is what is tested
                    errors.append(error)
                    return

    reader = threading.Thread(target=forward)
    reader.start()
    try:
        for i in range(100):
            clone.patch_block(str(i % 3), lambda m, i=i: setattr(m, "note", i))
            clone.apply(lambda m: None)
    finally:
        stop.set()
        reader.join(10)
        sys.setswitchinterval(interval)
    assert errors == []


def test_a_child_made_while_the_parents_scope_is_open_in_another_thread_holds_no_stand_ins() -> None:
    base = small_model()
    parent = LazyClonedModel(base)
    opened, release = threading.Event(), threading.Event()

    def slow(m: nn.Module) -> None:
        m[0].weight  # noqa: B018  (a stand-in is made)
        opened.set()
        release.wait(5)

    worker = threading.Thread(target=parent.patch_block, args=("1", slow))
    worker.start()
    opened.wait(5)
    made: list[nn.Module] = []
    maker = threading.Thread(target=lambda: made.append(LazyClonedModel(parent)))
    maker.start()
    maker.join(0.2)
    release.set()
    worker.join(5)
    maker.join(5)
    child = made[0]
    for module in child.modules():
        for kind in ("_modules", "_parameters", "_buffers"):
            assert type(module.__dict__[kind]) in (dict, type(base.__dict__[kind])), kind
    with torch.no_grad():
        assert torch.equal(child(X), base(X))
