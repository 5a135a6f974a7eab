"""instantid.serve on a local Ray (2 CPUs, two replicas, tiny random-weight pipelines, the test face models), over HTTP.

One cluster for the module (started by the fixture, shut down after the last test, whatever
happened); the application is deployed from a Ray Serve config file's ``args``, as
``serve run config.yaml`` would. Every HTTP call has a timeout; waits poll with a deadline.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from instantid.testing.face_images import faceless_crop, tagged_crop
from instantid.testing.face_models import build_antelopev2_like
from instantid.testing.serve_cluster import deploy, local_cluster, replica_actors, replica_statuses, wait_for

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]==2.60.0')")
requests = pytest.importorskip("requests", reason="the service tests drive HTTP with requests")
yaml = pytest.importorskip("yaml", reason="the config file is YAML")

HTTP_TIMEOUT = 60
CAPACITY = 2
SWEEP_S = 0.5
CONFIG = """
applications:
  - name: instantid
    route_prefix: /
    import_path: instantid.serve:build_app
    args:
      store: {store}
      pipeline_factory: instantid.testing.serve_models:tiny_pipeline
      adapter_factory: instantid.testing.serve_models:tiny_adapter
      face_models: {faces}
      num_replicas: 2
      replica_cpus: 0.5
      torch_threads: 1
      default_steps: 2
      max_steps: 8
      max_side: 64
      max_identities_per_replica: {capacity}
      sweep_interval_s: {sweep}
      health_check_period_s: 1
      max_image_pixels: 200000
      max_body_mb: 1
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    faces = build_antelopev2_like(root / "insightface")
    config = root / "config.yaml"
    config.write_text(CONFIG.format(store=root / "ids", faces=faces, capacity=CAPACITY, sweep=SWEEP_S))
    with local_cluster(num_cpus=2) as url:
        deploy(yaml.safe_load(config.read_text())["applications"][0]["args"])
        yield url


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def register(url: str, **body) -> str:
    body.setdefault("embedding", (np.random.default_rng(len(body)).normal(size=512) * 20).tolist())
    answer = requests.post(f"{url}/identities", json=body, timeout=HTTP_TIMEOUT)
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def new_identity(url: str, seed: int) -> str:
    return register(url, embedding=(np.random.default_rng(seed).normal(size=512) * 20).tolist())


def generate(url: str, identity: str, *, header: bool = True, **body):
    body = {"prompt": "a portrait", "format": "json", **body}
    headers = {"serve_multiplexed_model_id": identity} if header else {}
    if not header:
        body["identity"] = identity
    return requests.post(f"{url}/generate", json=body, headers=headers, timeout=HTTP_TIMEOUT)


def ok(answer) -> dict:
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_register_a_face_image_and_generate(service):
    answer = requests.post(
        f"{service}/identities?id=face-one", data=png(tagged_crop(400, 100)), headers={"content-type": "image/png"},
        timeout=HTTP_TIMEOUT,
    )  # fmt: skip
    assert answer.status_code == 201, answer.text
    described = answer.json()
    assert described["id"] == "face-one" and described["source"] == "image" and described["image_size"] == [320, 320]
    assert np.allclose(np.mean(described["kps"], axis=0), [160, 160], atol=16)  # the tag is in the crop's centre
    assert requests.get(f"{service}/identities/face-one", timeout=HTTP_TIMEOUT).json() == described
    assert "face-one" in requests.get(f"{service}/identities", timeout=HTTP_TIMEOUT).json()["ids"]

    image = requests.post(
        f"{service}/generate", json={"prompt": "a portrait", "seed": 3},
        headers={"serve_multiplexed_model_id": "face-one"}, timeout=HTTP_TIMEOUT,
    )  # fmt: skip
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (16, 16)
    again = generate(service, "face-one", header=False, seed=3)  # the id in the body, JSON answer
    assert base64.b64decode(ok(again)["image"]) == image.content
    other = ok(generate(service, register(service), seed=3))
    assert base64.b64decode(other["image"]) != image.content, "the identity made no difference to the image"
    for option in ({"weight": 0.0}, {"identitynet_strength": 0.0}):  # per-request options reach the view
        changed = ok(generate(service, "face-one", seed=3, **option))
        assert base64.b64decode(changed["image"]) != image.content, option


def test_second_request_lands_on_the_replica_that_loaded_the_identity(service):
    identity = new_identity(service, 100)
    first = generate(service, identity)
    assert first.headers["x-instantid-cold"] == "1"
    replica = first.headers["x-instantid-replica"]
    time.sleep(0.3)  # a replica tells Ray's router which identities it holds every 0.1 s
    for _ in range(3):
        later = generate(service, identity)
        assert later.headers["x-instantid-replica"] == replica
        assert later.headers["x-instantid-cold"] == "0"
        assert identity in ok(later)["loaded"]


def test_each_replica_holds_at_most_its_capacity_least_recently_used_out(service):
    identities = [new_identity(service, 200 + i) for i in range(5)]
    seen: dict[str, list[str]] = {}
    for identity in identities:
        answer = ok(generate(service, identity))
        assert len(answer["loaded"]) <= CAPACITY and answer["capacity"] == CAPACITY
        assert answer["loaded"][-1] == identity  # most recently used last
        previous = seen.get(answer["replica"])
        if answer["cold"] and previous is not None and len(previous) == CAPACITY:
            assert previous[0] not in answer["loaded"], "the least recently used identity was not evicted"
        seen[answer["replica"]] = answer["loaded"]
    # 5 identities, 2 replicas of 2: one was evicted, and asking for it again loads it again
    held = {i for loaded in seen.values() for i in loaded}
    evicted = [i for i in identities if i not in held]
    assert evicted
    assert ok(generate(service, evicted[0]))["cold"] is True


def test_delete_refuses_it_everywhere_and_replicas_drop_it(service):
    identity = new_identity(service, 300)
    loaded_on = ok(generate(service, identity))["replica"]
    assert requests.delete(f"{service}/identities/{identity}", timeout=HTTP_TIMEOUT).json() == {"deleted": identity}
    assert requests.get(f"{service}/identities/{identity}", timeout=HTTP_TIMEOUT).status_code == 404
    gone = generate(service, identity)
    assert gone.status_code == 404 and "unknown identity" in gone.json()["error"]
    assert requests.delete(f"{service}/identities/{identity}", timeout=HTTP_TIMEOUT).status_code == 404
    time.sleep(3 * SWEEP_S)  # the sweep drops it from replicas that hold it without a request for it
    statuses = replica_statuses()
    assert loaded_on in statuses and len(statuses) == 2
    for status in statuses.values():
        assert identity not in status["loaded"]


def test_an_identity_deleted_mid_traffic_fails_cleanly(service):
    identity = new_identity(service, 400)
    ok(generate(service, identity))
    statuses: list[int] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            statuses.append(generate(service, identity).status_code)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        wait_for(lambda: 200 in statuses, timeout_s=HTTP_TIMEOUT)
        assert requests.delete(f"{service}/identities/{identity}", timeout=HTTP_TIMEOUT).status_code == 200
        wait_for(lambda: statuses[-1] == 404, timeout_s=HTTP_TIMEOUT)
    finally:
        stop.set()
        worker.join(HTTP_TIMEOUT)
    assert set(statuses) <= {200, 404}, statuses
    assert statuses[statuses.index(404) :] == [404] * (len(statuses) - statuses.index(404))  # never served again


BAD = [
    ("generate", {"data": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("generate", {"json": {"prompt": "p", "stepz": 2, "identity": "face-one"}}, 400, "stepz"),
    ("generate", {"json": {"prompt": 7, "identity": "face-one"}}, 400, "prompt"),
    ("generate", {"json": {"prompt": "p", "steps": 0, "identity": "face-one"}}, 422, "steps"),
    ("generate", {"json": {"prompt": "p", "steps": 9, "identity": "face-one"}}, 422, "at most 8"),
    ("generate", {"json": {"prompt": "p", "width": 20, "identity": "face-one"}}, 422, "multiple of 8"),
    ("generate", {"json": {"prompt": "p", "width": 128, "identity": "face-one"}}, 422, "at most 64"),
    ("generate", {"json": {"prompt": "p"}}, 400, "no identity"),
    ("generate", {"json": {"prompt": "p", "identity": "nobody"}}, 404, "unknown identity 'nobody'"),
    ("generate", {"json": {"prompt": "p", "identity": "a"}, "headers": {"serve_multiplexed_model_id": "b"}}, 400,
     "differ"),
    ("generate", {"json": {"prompt": "p", "identity": "../x"}}, 422, "invalid identity id"),
    ("identities", {"data": b"\x89PNG not really", "headers": {"content-type": "image/png"}}, 400,
     "cannot read the image"),
    ("identities", {"data": "faceless", "headers": {"content-type": "image/png"}}, 422, "No face detected"),
    ("identities", {"data": "huge", "headers": {"content-type": "image/png"}}, 413, "pixels"),
    ("identities", {"data": b"x" * (2**20 + 1), "headers": {"content-type": "image/png"}}, 413, "limit"),
    ("identities", {"json": {"embedding": [1.0] * 511}}, 422, "511"),
    ("identities", {"json": {"embedding": "abc"}}, 400, "embedding"),
    ("identities", {"json": {}}, 422, "exactly one"),
    ("identities", {"json": {"image": "***"}}, 400, "base64"),
    ("identities", {"json": {"embedding": [1.0] * 512, "id": "face-one"}}, 409, "already exists"),
]  # fmt: skip


@pytest.mark.parametrize("route, kwargs, status, message", BAD, ids=[f"{b[0]}-{b[2]}-{b[3][:14]}" for b in BAD])
def test_bad_input_is_a_4xx_with_a_message(service, route, kwargs, status, message):
    if kwargs.get("data") == "faceless":
        kwargs = {**kwargs, "data": png(faceless_crop())}
    elif kwargs.get("data") == "huge":
        kwargs = {**kwargs, "data": png(np.zeros((500, 500, 3), np.uint8))}
    if route == "generate" or "face-one" in str(kwargs):  # needs the identity of the first test
        requests.post(
            f"{service}/identities", json={"id": "face-one", "embedding": [1.0] * 512}, timeout=HTTP_TIMEOUT
        )
    answer = requests.post(f"{service}/{route}", timeout=HTTP_TIMEOUT, **kwargs)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_a_request_past_its_timeout_is_a_504_and_the_replica_carries_on(service):
    identity = new_identity(service, 500)
    late = generate(service, identity, timeout_s=1e-4)
    assert late.status_code == 504 and "time limit" in late.json()["error"]
    ok(generate(service, identity))
    health = requests.get(f"{service}/health", timeout=HTTP_TIMEOUT).json()
    assert health["status"] == "ok" and health["replica"]["face_analysis"] is True


def test_concurrent_requests_for_different_identities_equal_sequential_ones(service):
    identities = [new_identity(service, 700 + i) for i in range(3)]
    jobs = [(identity, seed) for identity in identities for seed in (1, 2)]
    sequential = {job: ok(generate(service, job[0], seed=job[1]))["image"] for job in jobs}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ok(generate(service, job[0], seed=job[1])), jobs * 2))
    for job, answer in zip(jobs * 2, answers, strict=True):
        assert answer["image"] == sequential[job], job
    assert len({sequential[job] for job in jobs}) == len(jobs)


def test_a_replica_killed_mid_request_is_replaced_and_requests_succeed(service):
    import ray

    identity = new_identity(service, 600)
    slow = {"seed": 5, "steps": 8}
    before = ok(generate(service, identity, **slow))
    victim = next(name for name in replica_actors() if name.rsplit("#", 1)[1] == before["replica"].split("-")[0])
    answers: list = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            answers.append(generate(service, identity, **slow))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        wait_for(lambda: len(answers) >= 2, timeout_s=HTTP_TIMEOUT)  # requests in flight on the replica holding it
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        after = ok(generate(service, identity, **slow))  # the next request: another replica, loaded from the store
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join(HTTP_TIMEOUT)
    assert after["replica"] != before["replica"] and after["image"] == before["image"]
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]
    assert all(a.json()["image"] == before["image"] for a in answers)
    victim_tag = before["replica"]

    def replaced():  # two replicas answer again, neither of them the one killed
        statuses = replica_statuses()
        return len(statuses) == 2 and victim_tag not in statuses

    wait_for(replaced, timeout_s=90, interval_s=1.0)
    assert ok(generate(service, identity, seed=5, steps=8))["image"] == before["image"]
