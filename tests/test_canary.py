"""Canary and A/B routing: the sticky bucketing and the split's validation as pure units, then one
real Serve canary over HTTP: the challenger's measured share, sticky keys, and promote / rollback
under concurrent load with no non-2xx answer."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from distill_ray.config import ConfigError, ServeConfig, config_from_dict, load_config
from distill_ray.serving.canary import (
    STICKY_HEADER,
    VERSION_HEADER,
    LoadedStudent,
    StudentRouter,
    TrafficSplit,
    TrafficSplitError,
    batch_by_student,
    check_same_kind,
    goes_to_challenger,
    key_bucket,
    version_label,
)
from distill_ray.serving.options import replica_settings, serve_config_from_dict, settings_from_app_args

REPO = Path(__file__).resolve().parents[1]
NUM_FEATURES = 8


# --- pure: bucketing -----------------------------------------------------------------------------

def test_key_bucket_is_the_keys_sha256_in_0_1_not_the_salted_hash():
    import hashlib

    assert key_bucket("user-0") == int.from_bytes(hashlib.sha256(b"user-0").digest()[:8], "big") / 2**64
    # Fixed numbers: any process, any machine, any PYTHONHASHSEED gives these.
    assert (key_bucket("user-0"), key_bucket("alice")) == (0.4987398565283515, 0.1712650529798836)
    assert all(0.0 <= key_bucket(f"k{i}") < 1.0 for i in range(1000))


def test_buckets_spread_evenly_so_a_fraction_of_keys_is_that_fraction():
    buckets = [key_bucket(f"client-{i}") for i in range(20_000)]
    for fraction in (0.05, 0.2, 0.5):
        share = sum(b < fraction for b in buckets) / len(buckets)
        assert abs(share - fraction) < 0.01, (fraction, share)


def test_goes_to_challenger_by_key_or_by_draw_and_the_edges():
    key = "alice"
    b = key_bucket(key)
    assert goes_to_challenger(b + 1e-9, key) and not goes_to_challenger(b, key)
    # A raised fraction never moves a challenger key back to the champion.
    assert all(goes_to_challenger(f, key) for f in (b + 0.01, 0.9, 1.0))
    assert goes_to_challenger(0.3, None, draw=lambda: 0.29) and not goes_to_challenger(0.3, None, draw=lambda: 0.3)
    assert not any(goes_to_challenger(0.0, f"k{i}") for i in range(200))
    assert all(goes_to_challenger(1.0, f"k{i}") for i in range(200))


# --- pure: the split and ServeConfig -----------------------------------------------------------

def test_traffic_split_round_trips_promotes_and_rolls_back():
    split = TrafficSplit(champion="/a", challenger="/b", challenger_fraction=0.2, sticky_header="X-User")
    assert TrafficSplit.from_user_config(split.to_user_config()) == split
    assert split.promoted() == TrafficSplit(champion="/b", sticky_header="X-User")
    assert split.rolled_back() == TrafficSplit(champion="/a", sticky_header="X-User")
    with pytest.raises(TrafficSplitError, match="no challenger to promote"):
        split.promoted().promoted()
    with pytest.raises(TrafficSplitError, match="no challenger to roll back"):
        split.rolled_back().rolled_back()


@pytest.mark.parametrize("raw, message", [
    ({"champion": "/a", "challenger": "/b", "challenger_fraction": 1.5}, "challenger_fraction: 1.5 is out of range"),
    ({"champion": "/a", "challenger_fraction": 0.1}, "needs serve.challenger"),
    ({"champion": "/a", "challenger": "/a", "challenger_fraction": 0.1}, "is the champion itself"),
    ({"champion": "/a", "sticky_header": "X Key"}, "sticky_header: 'X Key' is not a header name"),
    ({"champion": "/a", "challenger_fraction": "0.1"}, "expected a number in [0, 1]"),
    ({"champion": "/a", "fraction": 0.1}, "unknown key(s) fraction; valid keys: champion, challenger"),
    ({}, "serve.champion: a student directory is required"),
])
def test_traffic_split_refuses_bad_user_config_naming_the_key(raw, message):
    with pytest.raises(TrafficSplitError) as err:
        TrafficSplit.from_user_config(raw)
    assert message in str(err.value)


@pytest.mark.parametrize("serve, message", [
    ({"challenger": "runs/b", "challenger_fraction": 1.2}, "serve.challenger_fraction: 1.2 is out of range; must be <= 1.0"),
    ({"challenger": "runs/b", "challenger_fraction": -0.1}, "serve.challenger_fraction: -0.1 is out of range; must be >= 0.0"),
    ({"challenger_fraction": 0.1}, "serve.challenger_fraction: 0.1 needs serve.challenger"),
    ({"sticky_header": "X_Key"}, "serve.sticky_header: 'X_Key' is not a header name"),
])
def test_serve_config_validates_the_canary_keys(serve, message):
    with pytest.raises(ConfigError) as err:
        serve_config_from_dict(serve)
    assert message in str(err.value)
    # The experiment config goes through the same checks.
    raw = load_config(REPO / "jobs/configs/tiny.yaml")
    from distill_ray.config import config_to_dict

    data = config_to_dict(raw)
    data["serve"] = {**data["serve"], **serve}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_replica_settings_leave_the_split_out_of_the_init_args():
    cfg = serve_config_from_dict({"challenger": "runs/b", "challenger_fraction": 0.3, "sticky_header": "X-U",
                                  "max_batch_size": 4})
    settings = replica_settings(cfg)
    assert settings["max_batch_size"] == 4
    assert (settings["challenger"], settings["challenger_fraction"], settings["sticky_header"]) == (
        None, 0.0, ServeConfig().sticky_header)


# --- pure: the router with stand-in services ----------------------------------------------------

def fake_service(kind: str = "features", shape=(NUM_FEATURES,), scale: float = 1.0):
    schema = SimpleNamespace(input_shape=shape, accepts_text=False, vocab_size=None)
    return SimpleNamespace(generates=kind == "lm", predictor=SimpleNamespace(schema=schema),
                           batch_probabilities=lambda xs: [scale * x for x in xs])


def test_version_label_prefers_the_card_version_and_falls_back_on_a_clash():
    assert version_label({"version": "v2"}, "run_b@v2") == "v2"
    assert version_label({"version": "v1"}, "run_b@v1", taken=["v1"]) == "run_b@v1"
    assert version_label({"version": "unversioned"}, "b@unversioned") == "b@unversioned"
    assert version_label({}, "b@unversioned") == "b@unversioned"


def test_router_reuses_loaded_students_and_refuses_another_kind():
    loads = []

    def load(path, taken):
        loads.append(path)
        kind = "lm" if path == "/lm" else "features"
        return LoadedStudent(path, fake_service(kind, shape=(4,) if path == "/small" else (NUM_FEATURES,)),
                             version_label({"version": "v1"}, f"{path}@v1", taken))

    router = StudentRouter.single(load("/a", []))
    canary = router.rerouted(TrafficSplit("/a", "/b", 0.5), load)
    assert loads == ["/a", "/b"] and canary.champion is router.champion
    assert (canary.champion.version, canary.challenger.version) == ("v1", "/b@v1")
    promoted = canary.rerouted(canary.split.promoted(), load)
    assert loads == ["/a", "/b"] and promoted.champion is canary.challenger and promoted.challenger is None
    assert all(promoted.pick(f"k{i}") is canary.challenger for i in range(50))
    with pytest.raises(TrafficSplitError, match="is a causal LM but the champion /a is a classifier"):
        router.rerouted(TrafficSplit("/a", "/lm", 0.1), load)
    with pytest.raises(TrafficSplitError, match=r"inputs shaped \[4\].*inputs shaped \[8\]"):
        router.rerouted(TrafficSplit("/a", "/small", 0.1), load)
    twin = LoadedStudent("/twin", fake_service(), router.champion.version)
    with pytest.raises(TrafficSplitError, match="both identify as 'v1'"):
        check_same_kind(router.champion, twin)


def test_router_pick_follows_the_key_and_batch_by_student_keeps_order():
    a = LoadedStudent("/a", fake_service(scale=1.0), "v1")
    b = LoadedStudent("/b", fake_service(scale=10.0), "v2")
    router = StudentRouter(TrafficSplit("/a", "/b", 0.2), a, b)
    keys = [f"user-{i}" for i in range(2000)]
    picks = [router.pick(k) for k in keys]
    assert picks == [router.pick(k) for k in keys]  # sticky
    assert all((p is b) == (key_bucket(k) < 0.2) for p, k in zip(picks, keys))
    assert [router.pick(None, draw=lambda: d).version for d in (0.1, 0.5)] == ["v2", "v1"]
    items = [(a, 1.0), (b, 2.0), (a, 3.0), (b, 4.0)]
    assert batch_by_student(items) == [1.0, 20.0, 3.0, 40.0]


def test_app_args_take_the_canary_keys(tmp_path):
    a, b = save_student(tmp_path / "a", "alpha", "v1", seed=0), save_student(tmp_path / "b", "beta", "v2", seed=1)
    student_dir, cfg = settings_from_app_args({"student_dir": str(a), "challenger": str(b),
                                               "challenger_fraction": "0.25"})
    assert student_dir == a.resolve() and (cfg.challenger, cfg.challenger_fraction) == (str(b), 0.25)


def test_start_refuses_a_challenger_of_another_input_before_deploying(tmp_path):
    from distill_ray.models import build_model, save_model
    from distill_ray.serving.launch import check_canary_students
    from distill_ray.serving.options import traffic_split

    a = save_student(tmp_path / "a", "alpha", "v1", seed=0)
    other = save_model(build_model("mlp", (5,), 3, {"hidden": [4]}), tmp_path / "b" / "student",
                       {"arch": "mlp", "input_shape": [5], "num_classes": 3, "options": {"hidden": [4]},
                        "task": "classification"})
    cfg = ServeConfig(challenger=str(other), challenger_fraction=0.1)
    with pytest.raises(TrafficSplitError, match=r"inputs shaped \[5\] but the champion .* inputs shaped \[8\]"):
        check_canary_students(traffic_split(a, cfg), cfg)
    check_canary_students(traffic_split(a, ServeConfig(challenger=str(save_student(tmp_path / "c", "gamma", "v1", 2)),
                                                       challenger_fraction=0.1)), cfg)  # same kind: accepted


def test_cli_refuses_flags_with_promote_and_a_fraction_out_of_range(tmp_path, capsys):
    from distill_ray.cli import main

    assert main(["serve", "promote", "--challenger-fraction", "0.5"]) == 2
    assert "takes only --address; drop --challenger-fraction" in capsys.readouterr().err
    a = save_student(tmp_path / "a", "alpha", "v1", seed=0)
    assert main(["serve", str(a), "--challenger", str(a), "--challenger-fraction", "1.5"]) == 2
    assert "serve.challenger_fraction: 1.5 is out of range; must be <= 1.0" in capsys.readouterr().err


# --- real Serve: a canary over HTTP ------------------------------------------------------------

def save_student(root: Path, name: str, version: str, seed: int) -> Path:
    from distill_ray.models import build_model, save_model

    torch.manual_seed(seed)
    model = build_model("mlp", (NUM_FEATURES,), 3, {"hidden": [16]})
    directory = save_model(model, root / "student", {"arch": "mlp", "input_shape": [NUM_FEATURES], "num_classes": 3,
                                                     "options": {"hidden": [16]}, "task": "classification"})
    (directory / "distill_card.json").write_text(json.dumps({"name": name, "version": version}))
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BODY = json.dumps({"inputs": [[0.5] * NUM_FEATURES]}).encode()


def ask(client: httpx.Client, url: str, key: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", **({STICKY_HEADER: key} if key else {})}
    return client.post(f"{url}/predict", content=BODY, headers=headers, timeout=30)


def versions_of(url: str, n: int, keys=None, workers: int = 16) -> Counter:
    with httpx.Client() as client, ThreadPoolExecutor(workers) as pool:
        replies = list(pool.map(lambda i: ask(client, url, keys[i] if keys else None), range(n)))
    assert {r.status_code for r in replies} == {200}, [r.text for r in replies if r.status_code != 200][:3]
    return Counter(r.headers[VERSION_HEADER] for r in replies)


@pytest.fixture(scope="module")
def canary(ray_local, tmp_path_factory):
    from ray import serve

    from distill_ray.serving import start_serve

    root = tmp_path_factory.mktemp("canary")
    # Both cards say v1, as two run directories do: the challenger is named by its model id.
    champion, challenger = save_student(root / "a", "alpha", "v1", 0), save_student(root / "b", "beta", "v1", 1)
    cfg = ServeConfig(challenger=str(challenger), challenger_fraction=0.2, max_batch_size=8,
                      batch_wait_timeout_s=0.002)
    url = start_serve(champion, host="127.0.0.1", port=free_port(), serve_config=cfg, blocking=False)
    yield SimpleNamespace(url=url, champion=champion, challenger=challenger, cfg=cfg,
                          versions=("v1", "beta@v1"))
    serve.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_the_challenger_answers_its_fraction_and_a_key_sticks(canary):
    counts = versions_of(canary.url, 1000)
    assert set(counts) == set(canary.versions)
    share = counts["beta@v1"] / 1000
    assert 0.15 <= share <= 0.25, counts
    for key in ("alice", "bob", "carol"):
        expected = "beta@v1" if key_bucket(key) < 0.2 else "v1"
        sticky = versions_of(canary.url, 20, keys=[key] * 20)
        assert sticky == Counter({expected: 20})
        counts += sticky
    # The answer body is what it was (the model field names the student, no new fields).
    with httpx.Client() as client:
        reply = ask(client, canary.url, key="alice")
    assert set(reply.json()) == {"predictions", "prediction_ids", "probabilities", "model"}
    counts[reply.headers[VERSION_HEADER]] += 1

    # Ray's metrics agent holds each version's answers apart: the challenger's (a version no other test
    # serves) exactly, with its predictions and batches; the champion's "v1" is shared with other tests.
    from prometheus_client.parser import text_string_to_metric_families

    from distill_ray.serving.launch import metrics_url
    from distill_ray.serving.metrics import BATCH_SIZE, EXPORT_PREFIX, PREDICTIONS, REQUESTS

    def scraped(name: str, version: str, **labels: str) -> float:
        text = urllib.request.urlopen(metrics_url(), timeout=10).read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == EXPORT_PREFIX + name and sample.labels.get("model_version") == version
                   and all(sample.labels.get(k) == v for k, v in labels.items()))

    wanted = {(REQUESTS, "beta@v1"): counts["beta@v1"], (PREDICTIONS, "beta@v1"): counts["beta@v1"],
              (BATCH_SIZE + "_sum", "beta@v1"): counts["beta@v1"]}
    deadline = time.monotonic() + 60  # workers report to the agent every 10 s by default
    while True:
        found = {(name, v): scraped(name, v, **({"route": "/predict", "status": "200"} if name == REQUESTS else {}))
                 for name, v in wanted}
        if found == wanted and scraped(REQUESTS, "v1", route="/predict", status="200") >= counts["v1"]:
            break
        assert time.monotonic() < deadline, f"scraped {found}, answered {wanted}"
        time.sleep(1.0)


class Load:
    """Clients sending /predict without pause from threads until stopped; every status and version kept."""

    def __init__(self, url: str, clients: int = 16):
        self.url, self.stop, self.lock = url, threading.Event(), threading.Lock()
        self.statuses: Counter = Counter()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        with httpx.Client() as client:
            while not self.stop.is_set():
                try:
                    status = ask(client, self.url).status_code
                except httpx.HTTPError as err:  # a dropped connection counts as a failure too
                    status = f"{type(err).__name__}"
                with self.lock:
                    self.statuses[status] += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        time.sleep(1.0)  # under load before the change starts
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(1.0)  # and still under load after it
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def replica_ids() -> set[str]:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    from distill_ray.serving.options import APP_NAME, DEPLOYMENT_NAME

    details = ServeInstanceDetails.model_validate(_get_global_client().get_serve_details())
    return {r.replica_id for r in details.applications[APP_NAME].deployments[DEPLOYMENT_NAME].replicas}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_promote_and_rollback_under_load_drop_nothing(canary):
    from distill_ray.serving import start_serve
    from distill_ray.serving.launch import promote, rollback

    before = replica_ids()
    with Load(canary.url) as load:
        split = promote()
    assert split.champion == str(canary.challenger.resolve()) and split.challenger is None
    assert set(load.statuses) == {200} and load.statuses[200] > 50, load.statuses
    assert replica_ids() == before  # reconfigured in place, not restarted
    assert versions_of(canary.url, 200) == Counter({"beta@v1": 200})
    assert versions_of(canary.url, 50, keys=["alice"] * 50) == Counter({"beta@v1": 50})
    with pytest.raises(ValueError, match="no challenger to promote"):
        promote()

    # The same canary again (same config: Serve updates in place), then rolled back under load.
    start_serve(canary.champion, host="127.0.0.1", port=int(canary.url.rsplit(":", 1)[1]),
                serve_config=canary.cfg, blocking=False)
    assert set(versions_of(canary.url, 200)) == set(canary.versions)
    assert replica_ids() == before
    with Load(canary.url) as load:
        split = rollback()
    assert split.champion == str(canary.champion.resolve()) and split.challenger is None
    assert set(load.statuses) == {200} and load.statuses[200] > 50, load.statuses
    assert replica_ids() == before
    assert versions_of(canary.url, 200) == Counter({"v1": 200})
