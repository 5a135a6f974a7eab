"""The identity store and request parsing of instantid.serve, without Ray."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest

pytest.importorskip("fsspec", reason="the identity store needs fsspec (installed with ray[serve])")
pytest.importorskip("pydantic", reason="instantid.serve's settings need pydantic (installed with ray[serve])")

from instantid.serve.errors import BadRequest, IdentityExists, PayloadTooLarge, UnknownIdentity, Unprocessable
from instantid.serve.identities import capacity, place_kps
from instantid.serve.inputs import (
    GenerateRequest,
    RegisterRequest,
    decode_image,
    image_bytes,
    parse_json,
    validated,
)
from instantid.serve.store import IdentityRecord, IdentityStore


def record(identity_id: str = "alice", seed: int = 0, **kwargs) -> IdentityRecord:
    return IdentityRecord(identity_id, np.random.default_rng(seed).normal(size=512) * 20, **kwargs)


@pytest.fixture(params=["directory", "memory"])
def store(request, tmp_path):
    url = str(tmp_path / "ids") if request.param == "directory" else f"memory://ids-{tmp_path.name}"
    return IdentityStore(url)


def test_round_trip_keeps_everything(store):
    kps = np.arange(10, dtype=np.float32).reshape(5, 2)
    put = store.put(record(kps=kps, image_size=(64, 48), source="image", extra={"det_score": 0.9}))
    got = store.get("alice")
    assert np.array_equal(got.embedding, put.embedding) and got.embedding.shape == (1, 512)
    assert np.array_equal(got.kps, kps) and got.image_size == (64, 48)
    assert got.revision == put.revision == store.revision("alice")
    assert got.describe()["det_score"] == 0.9 and got.source == "image"
    assert store.ids() == ["alice"] and store.exists("alice")


def test_put_refuses_a_taken_id_and_keeps_the_first(store):
    first = store.put(record(seed=0))
    with pytest.raises(IdentityExists, match="already exists"):
        store.put(record(seed=1))
    assert store.get("alice").revision == first.revision


def test_delete_then_unknown(store):
    store.put(record())
    store.delete("alice")
    assert store.ids() == []
    for call in (store.get, store.revision, store.delete):
        with pytest.raises(UnknownIdentity, match="unknown identity 'alice'"):
            call("alice")


def test_directory_writes_leave_no_temporary_files(tmp_path):
    store = IdentityStore(tmp_path)
    store.put(record("a"))
    with pytest.raises(IdentityExists):
        store.put(record("a"))
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", ".hidden", "", "x" * 65, 7])
def test_ids_that_are_not_file_names_are_refused(store, bad):
    with pytest.raises(Unprocessable, match="invalid identity id"):
        store.get(bad)


def test_a_foreign_file_is_named(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "x.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not an instantid-identity/1 file"):
        IdentityStore(tmp_path).get("x")


@pytest.mark.parametrize(
    "embedding, message",
    [(np.zeros(512), "not all zero"), (np.full(512, np.nan), "finite"), (np.ones(511), r"\[511\]")],
)
def test_bad_embeddings(embedding, message):
    with pytest.raises(Unprocessable, match=message):
        IdentityRecord("a", embedding)


def test_bad_keypoints():
    with pytest.raises(Unprocessable, match="5 finite"):
        record(kps=np.zeros((4, 2)))


def test_requests_wrong_types_are_400_and_out_of_range_422():
    with pytest.raises(BadRequest, match="prompt"):
        validated(GenerateRequest, {"prompt": 3})
    with pytest.raises(BadRequest, match="stepz"):
        validated(GenerateRequest, {"prompt": "p", "stepz": 3})
    with pytest.raises(BadRequest, match="steps"):
        validated(GenerateRequest, {"prompt": "p", "steps": "4"})
    with pytest.raises(Unprocessable, match="steps"):
        validated(GenerateRequest, {"prompt": "p", "steps": 0})
    with pytest.raises(Unprocessable, match="start"):
        validated(GenerateRequest, {"prompt": "p", "start": 0.9, "end": 0.1})
    with pytest.raises(BadRequest, match="JSON object"):
        validated(GenerateRequest, ["prompt"])
    with pytest.raises(Unprocessable, match="exactly one"):
        validated(RegisterRequest, {"image": "eA==", "embedding": [1.0] * 512})
    assert validated(GenerateRequest, {"prompt": "p", "guidance_scale": 5}).guidance_scale == 5.0


def test_bodies_and_images():
    from PIL import Image

    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_json(b"{", 100)
    with pytest.raises(PayloadTooLarge, match="limit is 10"):
        parse_json(b"[" + b"1," * 20 + b"1]", 10)
    with pytest.raises(BadRequest, match="base64"):
        image_bytes("not base64!")
    with pytest.raises(BadRequest, match="cannot read the image"):
        decode_image(b"GIF89a-not-really", 10**6)
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert decode_image(image_bytes("data:image/png;base64," + base64.b64encode(data).decode()), 1200).shape == (30, 40, 3)
    with pytest.raises(PayloadTooLarge, match="40x30"):
        decode_image(data, 1199)


def test_keypoints_are_fitted_into_the_output():
    kps = np.array([[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]], np.float32)
    placed = place_kps(record(kps=kps, image_size=(40, 40)), 80, 160)
    assert np.allclose(placed, kps * 2 + [0, 40])
    centred = place_kps(record(), 64, 64)
    assert np.allclose(centred.mean(axis=0), [32, 32], atol=4) and np.all((centred > 0) & (centred < 64))


def test_capacity_from_memory():
    mib = 2**20
    assert capacity(10 * mib, 2048, None) == 204
    assert capacity(10 * mib, 2048, 50) == 50
    assert capacity(5000 * mib, 2048, None) == 1


def test_the_config_file_in_the_docs_validates():
    import re
    from pathlib import Path

    yaml = pytest.importorskip("yaml", reason="the config file is YAML")
    from instantid.serve.config import ServeSettings

    text = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    application = config["applications"][0]
    assert application["import_path"] == "instantid.serve:build_app"
    settings = ServeSettings.model_validate(application["args"])
    assert settings.device == "cuda" and settings.num_replicas == 2
    with pytest.raises(ValueError, match="num_replicaz"):
        ServeSettings.model_validate({**application["args"], "num_replicaz": 2})
    with pytest.raises(ValueError, match="exactly one of `pipeline`"):
        ServeSettings.model_validate({**application["args"], "pipeline_factory": "x:y"})
