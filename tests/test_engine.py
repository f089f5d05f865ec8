"""The Ray engine on a real local Ray and real Fashion-MNIST: teacher pool, cache, Train loop, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_ray.config import apply_overrides, config_from_dict, config_to_dict
from distill_ray.models import build_model, forward_logits, load_model

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("engine")
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    raw = apply_overrides(raw, [("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache")),
                                ("teachers.0.path", str(root / "teachers/mlp_a")),
                                ("teachers.1.path", str(root / "teachers/cnn_b"))])
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def prepared(ray_local, tiny_cfg, small_fashion_mnist):
    from distill_ray.pipeline import build_cache, prepare_teachers

    dirs = prepare_teachers(tiny_cfg, small_fashion_mnist)
    targets = build_cache(tiny_cfg, small_fashion_mnist, dirs)
    return dirs, targets


def test_recipe_teachers_are_real_and_reused(prepared, tiny_cfg, small_fashion_mnist, capsys):
    from distill_ray.evaluate import accuracy, predict_logits
    from distill_ray.pipeline import prepare_teachers

    dirs, _ = prepared
    for name, path in dirs.items():
        model, spec = load_model(path)
        acc = accuracy(predict_logits(model, small_fashion_mnist.val.inputs), small_fashion_mnist.val.labels)
        assert acc > 0.6, f"teacher {name} learned nothing: {acc}"
        assert spec["val_accuracy"] == pytest.approx(acc, abs=1e-6)
    mtimes = {n: (p / "distill_spec.json").stat().st_mtime for n, p in dirs.items()}
    prepare_teachers(tiny_cfg, small_fashion_mnist)
    assert "reusing" in capsys.readouterr().out
    assert mtimes == {n: (p / "distill_spec.json").stat().st_mtime for n, p in dirs.items()}


def test_cache_holds_each_teachers_logits_for_every_sample(prepared, small_fashion_mnist):
    dirs, targets = prepared
    d = small_fashion_mnist
    all_ids = np.concatenate([d.train.ids, d.val.ids, d.test.ids])
    assert sorted(targets.ids.tolist()) == sorted(all_ids.tolist())
    rows = targets.rows_for(d.val.ids[:50])
    for name, path in dirs.items():
        model, _ = load_model(path)
        with torch.no_grad():
            direct = forward_logits(model, torch.as_tensor(d.val.inputs[:50])).numpy()
        np.testing.assert_allclose(targets.logits(name, rows), direct, atol=2e-2, rtol=2e-3)  # fp16 storage


def test_cache_is_reused_and_corruption_is_refused(prepared, tiny_cfg, small_fashion_mnist, capsys):
    from distill_ray.pipeline import build_cache
    from distill_ray.soft_targets import CorruptCacheError

    dirs, targets = prepared
    again = build_cache(tiny_cfg, small_fashion_mnist, dirs)
    assert "reusing verified cache" in capsys.readouterr().out
    np.testing.assert_array_equal(again.ids, targets.ids)
    shard = sorted(Path(tiny_cfg.cache.dir).glob("*/shard-*.parquet"))[0]
    original = shard.read_bytes()
    try:
        corrupted = bytearray(original)
        corrupted[len(corrupted) // 2] ^= 0xFF
        shard.write_bytes(bytes(corrupted))
        with pytest.raises(CorruptCacheError, match=shard.name):
            build_cache(tiny_cfg, small_fashion_mnist, dirs)
    finally:
        shard.write_bytes(original)


def test_pool_matches_direct_inference_and_survives_a_killed_actor(prepared, ray_local, small_fashion_mnist):
    import ray

    from distill_ray.teachers import TeacherPool, TeacherSpec

    dirs, _ = prepared
    specs = [TeacherSpec(name, str(path), num_cpus=0.25, replicas=1, max_restarts=2) for name, path in dirs.items()]
    pool = TeacherPool(specs)
    try:
        x = small_fashion_mnist.val.inputs[:32]
        first = pool.infer(x)
        for name, path in dirs.items():
            model, _ = load_model(path)
            with torch.no_grad():
                direct = forward_logits(model, torch.as_tensor(x)).numpy()
            np.testing.assert_allclose(first[name]["logits"], direct, atol=1e-5)
        victim = pool.actor_handles()["mlp_a"][0]
        ray.kill(victim, no_restart=False)  # Ray restarts it (max_restarts); the pool retries the batch
        second = pool.infer(x)
        np.testing.assert_allclose(second["mlp_a"]["logits"], first["mlp_a"]["logits"], atol=1e-6)
        stats = pool.stats()
        assert stats["mlp_a"]["rows"] == 64 and stats["mlp_a"]["batches"] == 2  # no batch lost or counted twice
        assert stats["cnn_b"]["rows"] == 64
        assert stats["mlp_a"]["retries"] >= 1
    finally:
        pool.shutdown()


def test_teachers_are_frozen(prepared):
    from distill_ray.teachers import TeacherRunner

    dirs, _ = prepared
    runner = TeacherRunner("mlp_a", str(dirs["mlp_a"]))
    runner.assert_frozen()
    assert all(not p.requires_grad for p in runner.model.parameters())
    runner.model.train()
    with pytest.raises(AssertionError, match="trainable"):
        runner.infer(np.zeros((1, 1, 28, 28), np.float32))


def test_train_loop_learns_resumes_after_failure_and_logs_weights(prepared, tiny_cfg, small_fashion_mnist, tmp_path):
    from distill_ray.pipeline import distill_data, split_targets
    from distill_ray.train import load_trained_student, run_training

    _, targets = prepared
    st = split_targets(targets, small_fashion_mnist)
    data = distill_data(tiny_cfg, small_fashion_mnist, st)
    marker = tmp_path / "failed_once"
    result = run_training(tiny_cfg, data, str(tmp_path / "ray"), "student",
                          fail_once_at_step={"step": 15, "marker": str(marker)})
    assert marker.exists(), "the injected failure did not fire"
    student, history, state = load_trained_student(tiny_cfg, data, result.checkpoint)

    # The run finished every step once, despite dying at step 15 (resumed from step 10's checkpoint).
    steps = [row["step"] for row in history if row.get("kind") != "epoch"]
    assert steps == sorted(set(steps)), "a step was logged twice after resume"
    epochs = [row for row in history if row.get("kind") == "epoch"]
    assert [row["epoch"] for row in epochs] == [0, 1]
    # Curriculum: stage 0 opens half the data at T=1, stage 1 all of it at T=2.
    assert {r["open_fraction"] for r in history if r["epoch"] == 0} == {0.5}
    assert {r["temperature"] for r in history if r["epoch"] == 1 and "temperature" in r} == {2.0}
    n, batch = len(small_fashion_mnist.train), tiny_cfg.train.batch_size
    assert state["step"] == (n // 2) // batch + n // batch
    # Teacher weights on the simplex, logged every logged step.
    weights = [sum(v for k, v in r.items() if k.startswith("teacher_weight/")) for r in history if "loss" in r]
    assert weights and all(abs(w - 1) < 1e-5 for w in weights)
    # It learned: validation accuracy well above chance (10 classes) and agrees with teachers.
    assert epochs[-1]["val_accuracy"] > 0.6
    assert epochs[-1]["agreement/mlp_a"] > 0.6


def test_online_mode_asks_the_pool_for_every_batch(prepared, tiny_cfg, small_fashion_mnist, tmp_path):
    import ray

    from distill_ray.pipeline import distill_data, split_targets, teacher_specs
    from distill_ray.teachers import TeacherPool

    dirs, targets = prepared
    cfg = config_from_dict(apply_overrides(
        config_to_dict(tiny_cfg),
        [("train.mode", "online"), ("train.epochs", 1)]))
    pool = TeacherPool(teacher_specs(cfg, dirs))
    try:
        data = distill_data(cfg, small_fashion_mnist, split_targets(targets, small_fashion_mnist), pool=pool)
        assert data.teacher_logits is None
        from distill_ray.train import load_trained_student, run_training

        result = run_training(cfg, data, str(tmp_path / "ray"), "online")
        _, history, state = load_trained_student(cfg, data, result.checkpoint)
        served = {name: sum(s["rows"] for s in ray.get([a.stats.remote() for a in actors]))
                  for name, actors in pool.actor_handles().items()}
        # Epoch 0 opens half the data (stage 0 of 2): every trained row was asked of every teacher once.
        trained_rows = state["step"] * cfg.train.batch_size
        assert served == {name: trained_rows for name in cfg.teacher_names()}
        assert history[-1]["val_accuracy"] > 0.4
    finally:
        pool.shutdown()
