"""Teacher services (distill_ray/teachers/service.py): a teacher loaded once in Ray actors that every
caller shares: its answers equal a direct forward, concurrent callers share forwards, a causal LM scores
given tokens at given positions, and a service is stopped by whoever started it, and only by them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray


def _saved_mlp(tmp_path, seed: int = 0) -> str:
    from distill_ray.models import build_model, save_model

    torch.manual_seed(seed)
    model = build_model("mlp", (20,), 7, {"hidden": [16]})
    return str(save_model(model, tmp_path / "mlp", {"arch": "mlp", "input_shape": [20], "num_classes": 7,
                                                     "options": {"hidden": [16]}}))


def _saved_lm(tmp_path, vocab: int = 97) -> str:
    from distill_ray.models import build_model, save_model

    torch.manual_seed(0)
    options = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
               "intermediate_size": 64}
    model = build_model("hf_causal_lm", (16,), vocab, options)
    return str(save_model(model, tmp_path / "lm", {"arch": "hf_causal_lm", "input_shape": [16],
                                                    "num_classes": vocab, "options": options}))


def _named_replicas(scope: str) -> list[str]:
    import ray

    from distill_ray.teachers.service import NAMESPACE

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(scope + "/")]


def test_concurrent_callers_share_forwards_and_each_gets_its_own_rows(ray_local, tmp_path):
    import ray

    from distill_ray.models import forward_logits, load_model
    from distill_ray.teachers.spec import TeacherSpec
    from distill_ray.teachers.service import start_service, stop_service

    spec = TeacherSpec("mlp", _saved_mlp(tmp_path), num_cpus=0.25, batch_size=512)
    service = start_service(spec, "test-batching", batch_wait_s=0.2)
    try:
        x = np.random.default_rng(0).normal(size=(16, 8, 20)).astype(np.float32)
        answers = ray.get([service.infer_async(x[i]) for i in range(16)])  # 16 callers at once
        [stats] = service.stats()
        # The handle travels: a Ray task (as a Train worker or a Tune trial is a Ray actor) asks it too.
        from_a_task = ray.get(ray.remote(num_cpus=0.1)(lambda s, rows: s.infer(rows)).remote(service, x[3]))
    finally:
        stop_service(service)
    model, _ = load_model(spec.model_dir)
    with torch.no_grad():
        direct = forward_logits(model.eval(), torch.as_tensor(x.reshape(-1, 20))).numpy().reshape(16, 8, 7)
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer["logits"], direct[i], rtol=1e-5, atol=1e-5)
    assert stats["rows"] == 16 * 8 and stats["forwards"] < 16, stats  # batched across callers
    np.testing.assert_allclose(from_a_task["logits"], direct[3], rtol=1e-5, atol=1e-5)


def test_a_causal_lm_scores_given_tokens_at_given_positions_as_a_direct_forward(ray_local, tmp_path):
    import torch.nn.functional as F

    from distill_ray.models import forward_logits, load_model
    from distill_ray.teachers.spec import TeacherSpec
    from distill_ray.teachers.service import start_service, stop_service

    spec = TeacherSpec("lm", _saved_lm(tmp_path), num_cpus=0.25, batch_size=32)
    service = start_service(spec, "test-score")
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 97, size=(3, 12))
    positions = np.array([[0, 5, 11], [2, 3, -1], [7, -1, -1]])
    try:
        got = service.score(tokens, positions, k=5)
    finally:
        stop_service(service)
    model, _ = load_model(spec.model_dir)
    with torch.no_grad():
        logprobs = F.log_softmax(forward_logits(model.eval(), torch.as_tensor(tokens)).float(), -1)
    assert got["topk_logprobs"].shape == (3, 3, 5) and got["tail_mass"].shape == (3, 3)
    for row in range(3):
        for j, pos in enumerate(positions[row]):
            if pos < 0:  # padding: nothing asked, nothing answered
                assert (got["topk_indices"][row, j] == -1).all() and got["tail_mass"][row, j] == 0
                continue
            values, indices = logprobs[row, pos].topk(5)
            np.testing.assert_allclose(got["topk_logprobs"][row, j], values.numpy(), atol=1e-5)
            np.testing.assert_array_equal(got["topk_indices"][row, j], indices.numpy())
            assert got["tail_mass"][row, j] == pytest.approx(1 - values.exp().sum().item(), abs=1e-5)


def test_a_service_is_found_under_its_scope_and_stopped_only_by_whoever_started_it(ray_local, tmp_path):
    from distill_ray.teachers.spec import TeacherSpec
    from distill_ray.teachers.service import start_service, stop_service, teacher_services

    trace = tmp_path / "answered.txt"
    spec = TeacherSpec("mlp", _saved_mlp(tmp_path), num_cpus=0.25, replicas=2, trace_file=str(trace))
    x = np.ones((4, 20), np.float32)
    # A run of its own starts the service and stops it at the end.
    with teacher_services([spec], scope="test-own") as services:
        assert len(_named_replicas("test-own")) == 2
        assert services["mlp"].infer(x)["logits"].shape == (4, 7)
    assert _named_replicas("test-own") == []
    # A sweep's service: a trial finds it under the sweep's scope, uses it, and leaves it up.
    started = start_service(spec, "test-sweep")
    try:
        for _ in range(2):  # two trials
            with teacher_services([spec], scope="test-sweep") as services:
                assert services["mlp"].infer(x)["logits"].shape == (4, 7)
            assert len(_named_replicas("test-sweep")) == 2
    finally:
        stop_service(started)
    assert _named_replicas("test-sweep") == []
    loads = trace.with_name("answered.txt.loads").read_text().split()[::2]
    assert loads == ["mlp"] * 4  # 2 replicas for the run, 2 for the sweep; the trials loaded none
