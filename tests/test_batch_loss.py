"""``kd.objectives.batch_loss``, the one function that makes a batch's loss, checked by its gradients
against float64 references written out by hand: per row ``alpha * KD + (1 - alpha) * task`` on
labeled rows, KD alone on unlabeled ones (label -1, or either label of a mixed pair). Pure: no Ray,
no model, a few milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_ray.config import apply_overrides, config_from_dict, config_to_dict, load_config
from distill_ray.kd.blending import TeacherBlend
from distill_ray.kd.objectives import DenseLogits, batch_loss

REPO = Path(__file__).resolve().parents[1]
B, C, K, T = 6, 5, 2, 2.0


def _cfg(alpha: float, *overrides: tuple[str, object]):
    raw = config_to_dict(load_config(REPO / "jobs/configs/tiny.yaml"))
    return config_from_dict(apply_overrides(raw, [("loss.kind", "forward_kl"), ("loss.alpha", alpha),
                                                  ("loss.label_smoothing", 0.0), *overrides]))


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g, dtype=torch.float64)
    teachers = torch.randn(K, B, C, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([3, -1, 0, -1, 4, 1])  # rows 1 and 3 unlabeled
    return logits, teachers, y


def _grad(cfg, logits, teachers, y, alpha, y_b=None, lam=None) -> torch.Tensor:
    """d total / d student logits, from the product's batch_loss."""
    student = logits.clone().requires_grad_(True)
    parts = batch_loss(cfg, TeacherBlend("uniform", K), student, DenseLogits(teachers), student, y,
                       temperature=T, alpha=alpha, causal=False, y_b=y_b, lam=lam)
    (grad,) = torch.autograd.grad(parts.total, student)
    return grad


# Hand-written float64 references, per row (before the batch mean's 1/B):
#   KD = T^2 KL(p || softmax(s / T)), p = the teachers' mean softmax(t / T)  ->  d/ds = T (softmax(s / T) - p)
#   task = CE(s, y)                                                        ->  d/ds = softmax(s) - onehot(y)
def _kd_grad(logits: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(teachers / T, -1).mean(0)
    return T * (torch.softmax(logits / T, -1) - p)


def _task_grad(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, -1) - torch.nn.functional.one_hot(y.clamp_min(0), C).double()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_labeled_rows_learn_alpha_kd_plus_one_minus_alpha_task_and_unlabeled_rows_kd_alone(alpha):
    logits, teachers, y = _batch()
    grad = _grad(_cfg(alpha), logits, teachers, y, alpha)
    kd, task = _kd_grad(logits, teachers) / B, _task_grad(logits, y) / B
    labeled = y >= 0
    # Unlabeled rows: exactly their KD term's gradient, whatever alpha; no task gradient.
    torch.testing.assert_close(grad[~labeled], kd[~labeled], rtol=1e-12, atol=1e-14)
    # Labeled rows: the blend of the two; alpha = 0 is the task term alone, alpha = 1 the KD term alone.
    expected = {0.0: task, 1.0: kd}.get(alpha, alpha * kd + (1 - alpha) * task)
    torch.testing.assert_close(grad[labeled], expected[labeled], rtol=1e-12, atol=1e-14)


def test_a_mixed_pair_with_an_unlabeled_side_trains_on_kd_alone():
    """MixUp/CutMix rows weigh two labels by lam; a row is labeled only when both are."""
    logits, teachers, y = _batch(1)
    y = torch.tensor([3, 2, 0, 1, 4, 1])
    y_b = torch.tensor([1, -1, 2, 0, -1, 3])  # rows 1 and 4: one side unlabeled
    lam = torch.tensor([0.7, 0.4, 0.5, 0.9, 0.2, 0.6], dtype=torch.float64)
    alpha = 0.25
    grad = _grad(_cfg(alpha), logits, teachers, y, alpha, y_b=y_b, lam=lam)
    kd = _kd_grad(logits, teachers) / B
    task = (lam[:, None] * _task_grad(logits, y) + (1 - lam[:, None]) * _task_grad(logits, y_b)) / B
    labeled = (y >= 0) & (y_b >= 0)
    assert labeled.tolist() == [True, False, True, True, False, True]
    torch.testing.assert_close(grad[~labeled], kd[~labeled], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad[labeled], (alpha * kd + (1 - alpha) * task)[labeled], rtol=1e-12, atol=1e-14)


def test_the_parts_are_what_the_history_logs():
    logits, teachers, y = _batch()
    alpha = 0.3
    parts = batch_loss(_cfg(alpha), TeacherBlend("uniform", K), logits, DenseLogits(teachers), logits, y,
                       temperature=T, alpha=alpha, causal=False)
    labeled = y >= 0
    assert parts.labeled.tolist() == labeled.tolist() and parts.kd.shape == parts.task.shape == (B,)
    assert parts.hint is None and parts.attention is None and parts.feature_metrics() == {}
    rows = torch.where(labeled, alpha * parts.kd + (1 - alpha) * parts.task, parts.kd)
    metrics = parts.metrics()
    assert metrics["loss"] == pytest.approx(rows.mean().item(), rel=1e-12)
    assert metrics["task_loss"] == pytest.approx(parts.task[labeled].mean().item(), rel=1e-12)
    assert metrics["labeled_share"] == pytest.approx(4 / 6)


def test_margin_kd_weighs_each_rows_kd_gradient_by_the_blended_teachers_margin():
    """loss.kind=margin_kd reaches the step: a row's KD gradient is forward KL's times m^gamma / mean(m^gamma),
    m the blended target's top-1 minus top-2 probability, the mean over the whole batch (labeled or not)."""
    logits, teachers, y = _batch(2)
    alpha, gamma = 0.3, 2.0
    grad = _grad(_cfg(alpha, ("loss.kind", "margin_kd"), ("loss.margin_gamma", gamma)), logits, teachers, y, alpha)
    top2 = torch.softmax(teachers / T, -1).mean(0).topk(2, -1).values
    weight = (top2[:, 0] - top2[:, 1]) ** gamma
    kd = (weight / weight.mean())[:, None] * _kd_grad(logits, teachers) / B
    task = _task_grad(logits, y) / B
    labeled = y >= 0
    torch.testing.assert_close(grad[~labeled], kd[~labeled], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad[labeled], (alpha * kd + (1 - alpha) * task)[labeled], rtol=1e-10, atol=1e-12)
