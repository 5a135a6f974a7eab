"""Many identities on one base UNet: 8 clones run concurrently from threads equal each run alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from instantid.diffusers import apply_instantid
from tests.diffusers.helpers import assert_unchanged, face, run, snapshot, unet_inputs


def test_eight_identities_concurrently_equal_each_alone(unet, adapter):
    before = snapshot(unet)
    args, kwargs = unet_inputs(batch=2)
    clones = [apply_instantid(unet, adapter, face(100 + i), weight=0.9) for i in range(8)]
    alone = [run(clone, args, kwargs) for clone in clones]
    base_out = run(unet, args, kwargs)

    with ThreadPoolExecutor(max_workers=8) as pool:
        rounds = [list(pool.map(lambda clone: run(clone, args, kwargs), clones)) for _ in range(2)]

    for outputs in rounds:
        for i, (out, expected) in enumerate(zip(outputs, alone, strict=True)):
            assert torch.equal(out, expected), f"identity {i} differs when run concurrently"
    # the identities differ from one another and from the base
    assert all(not torch.allclose(alone[0], other) for other in alone[1:])
    assert all(not torch.allclose(base_out, out) for out in alone)
    # the base is bitwise unchanged: values, storage pointers, version counters, modules, processors
    assert_unchanged(unet, before)
    assert torch.equal(run(unet, args, kwargs), base_out)
    # each identity holds only its own K/V (its processors' tensors count since issue 14), no weight copy
    sizes = {clone.private_bytes for clone in clones}
    base_bytes = sum(t.untyped_storage().nbytes() for t in unet.parameters())
    assert len(sizes) == 1 and 0 < sizes.pop() < base_bytes / 20
    for clone in clones:
        assert clone.shared_bytes == sum(t.untyped_storage().nbytes() for t in unet.state_dict().values())
