"""GPU paths: teachers on fractional GPUs in bf16, Train workers with use_gpu and bf16 autocast.

Skipped (with the reason) on machines without CUDA; run them where a GPU is lent:
``pytest -m gpu tests/test_gpu.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill_ray.config import apply_overrides, config_from_dict

pytestmark = [pytest.mark.gpu, pytest.mark.ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_cfg(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("gpu")
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    return config_from_dict(apply_overrides(raw, [
        ("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache")),
        ("teachers.0.path", str(root / "teachers/mlp_a")), ("teachers.1.path", str(root / "teachers/cnn_b")),
        ("teachers.0.num_gpus", 0.25), ("teachers.1.num_gpus", 0.25),
        ("teachers.0.dtype", "bfloat16"), ("teachers.1.dtype", "bfloat16"),
        ("train.use_gpu", True), ("train.precision", "bf16"), ("train.checkpoint_every_steps", 1000)]))


def test_bf16_teachers_on_fractional_gpus_match_fp32(ray_local, gpu_cfg, small_fashion_mnist):
    from distill_ray.evaluation.metrics import predict_logits
    from distill_ray.models import load_model
    import ray

    from distill_ray.pipeline import load_data, prepare_teachers
    from distill_ray.teachers.service import teacher_services
    from distill_ray.teachers.setup import teacher_specs
    from distill_ray.train.stages import with_teachers

    dirs = prepare_teachers(gpu_cfg, load_data(gpu_cfg))
    x = small_fashion_mnist.val.inputs[:256]
    with teacher_services(teacher_specs(gpu_cfg, dirs)) as services:
        rows = with_teachers(ray.data.from_items([{"id": i, "x": x[i]} for i in range(len(x))]),
                             tuple(services.values())).to_pandas().sort_values("id")
    for name, path in dirs.items():
        model, _ = load_model(path)
        fp32 = predict_logits(model, x).numpy()
        bf16 = np.stack(rows[f"{name}/logits"].to_numpy())
        assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.98
        np.testing.assert_allclose(bf16, fp32, atol=0.25, rtol=0.05)


def test_gpu_worker_with_bf16_autocast_learns(ray_local, gpu_cfg, small_fashion_mnist, tmp_path):
    from distill_ray.pipeline import build_cache, load_data, prepare_teachers, training_inputs
    from distill_ray.train.loop import load_trained_student, run_training

    source = load_data(gpu_cfg)
    dirs = prepare_teachers(gpu_cfg, source)
    data = training_inputs(gpu_cfg, build_cache(gpu_cfg, source, dirs), source.info)
    result = run_training(gpu_cfg, data, str(tmp_path / "ray"), "gpu")
    _, history, _ = load_trained_student(gpu_cfg, data, result.checkpoint)
    assert history[-1]["val_accuracy"] > 0.6
