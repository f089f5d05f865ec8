"""Long-tail distillation for classifiers: per-class KD weights (inverse frequency, effective number),
per-class temperatures, logit adjustment, each against hand-computed numbers or float64 references;
their way into ``batch_loss`` (rows' gradients written out by hand), the config keys, the seeded
long-tailed train split (pure row functions), and the per-class recall and balanced accuracy of the
report. Pure: no Ray is started."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_ray.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config
from distill_ray.data.rows import class_counts_text, id_uniform, keep_long_tail, long_tail_shares, \
    split_stats, sum_class_counts
from distill_ray.evaluation.metrics import balanced_accuracy, classifier_scores, per_class_recall
from distill_ray.evaluation.report import is_long_tailed, report_markdown
from distill_ray.kd.blending import TeacherBlend, blend_probs
from distill_ray.kd.long_tail import LongTail, class_temperatures, class_weights, log_prior, \
    logit_adjusted_cross_entropy, row_classes, row_temperature_kd
from distill_ray.kd.losses import KD_KINDS, kd_divergence_to_probs
from distill_ray.kd.objectives import DenseLogits, batch_loss, long_tail_terms

REPO = Path(__file__).resolve().parents[1]
PROB_KINDS = tuple(k for k in KD_KINDS if k != "mse_logits")


def _cfg(alpha: float, *overrides):
    raw = config_to_dict(load_config(REPO / "jobs/configs/tiny.yaml"))
    return config_from_dict(apply_overrides(raw, [("loss.kind", "forward_kl"), ("loss.alpha", alpha),
                                                  ("loss.label_smoothing", 0.0), *overrides]))


# --- class weights -------------------------------------------------------------------------------

def test_inverse_frequency_weights_are_one_over_n_averaging_one_over_the_rows():
    # raw 1/6, 1/3, 1; sum_c n_c raw_c = 3 over 10 rows -> w = raw * 10 / 3
    w = class_weights([6, 3, 1], "inverse_frequency")
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor([5 / 9, 10 / 9, 10 / 3], dtype=torch.float64), rtol=1e-15, atol=0)
    assert float((torch.tensor([6.0, 3, 1], dtype=torch.float64) * w).sum()) == pytest.approx(10.0, rel=1e-15)


def test_effective_number_weights_match_cui_et_al_by_hand():
    # beta 0.5: (1 - b) / (1 - b^n) = 0.5 / 0.875 = 4/7 for n = 3, 1 for n = 1; rows 4, sum n raw = 19/7
    w = class_weights([3, 1], "effective_number", beta=0.5)
    torch.testing.assert_close(w, torch.tensor([16 / 19, 28 / 19], dtype=torch.float64), rtol=1e-14, atol=0)
    # the default beta = 0.9999 on a 100x tail, against the formula in float64
    n = torch.tensor([5000.0, 500.0, 50.0], dtype=torch.float64)
    raw = (1 - 0.9999) / (1 - 0.9999 ** n)
    torch.testing.assert_close(class_weights(n, "effective_number"), raw * n.sum() / (n * raw).sum(), rtol=1e-12, atol=0)
    # beta 0 weighs every class alike; beta -> 1 tends to inverse frequency
    torch.testing.assert_close(class_weights([7, 2, 1], "effective_number", beta=0.0), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(class_weights([7, 2, 1], "effective_number", beta=1 - 1e-9),
                               class_weights([7, 2, 1], "inverse_frequency"), rtol=1e-6, atol=0)


def test_none_gives_ones_and_a_class_without_rows_gets_the_largest_weight():
    assert torch.equal(class_weights([5, 0, 1], "none"), torch.ones(3, dtype=torch.float64))
    # raw 1/4, (the rarest's) 1, 1; rows 5, sum n raw = 2 -> w = raw * 5 / 2
    torch.testing.assert_close(class_weights([4, 0, 1], "inverse_frequency"),
                               torch.tensor([5 / 8, 5 / 2, 5 / 2], dtype=torch.float64), rtol=1e-15, atol=0)
    w = class_weights([4, 0, 1], "effective_number")
    assert w[1] == w[2] == w.max()
    with pytest.raises(ValueError, match="choose one of: none, inverse_frequency, effective_number"):
        class_weights([1, 2], "inverse")
    with pytest.raises(ValueError, match="class counts"):
        class_weights([0, 0], "inverse_frequency")
    with pytest.raises(ValueError, match="beta"):
        class_weights([1, 2], "effective_number", beta=1.0)


# --- per-class temperatures and the prior ----------------------------------------------------------

def test_class_temperatures_run_from_one_at_the_head_to_factor_at_the_tail_in_log_frequency():
    # log 100, log 10, log 1: the middle class is halfway -> 1.5 at factor 2
    torch.testing.assert_close(class_temperatures([100, 10, 1], 2.0),
                               torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64), rtol=1e-15, atol=0)
    # not sorted by frequency: each class by its own count; a class without rows is the tail's
    torch.testing.assert_close(class_temperatures([10, 1000, 0, 100], 3.0),
                               torch.tensor([3.0, 1.0, 3.0, 2.0], dtype=torch.float64), rtol=1e-15, atol=0)
    assert torch.equal(class_temperatures([100, 10, 1], 1.0), torch.ones(3, dtype=torch.float64))
    assert torch.equal(class_temperatures([50, 50], 4.0), torch.ones(2, dtype=torch.float64))  # balanced
    with pytest.raises(ValueError, match="factor"):
        class_temperatures([1, 2], 0.5)


def test_log_prior_is_the_log_share_of_rows_with_an_empty_class_as_the_rarest():
    torch.testing.assert_close(log_prior([3, 1, 0]), torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64).log(),
                               rtol=1e-15, atol=1e-15)


def test_a_rows_class_is_its_label_else_the_blended_teachers_top_class():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    assert row_classes(torch.tensor([1, -1, 0]), probs).tolist() == [1, 0, 0]
    assert row_classes(None, probs).tolist() == [2, 0, 1]


# --- KD at a temperature per row -------------------------------------------------------------------

def _reference_forward_kl(student, teachers, weights, temperatures):
    """Per row, float64, written out: T^2 sum_c p_c (log p_c - log q_c), p the mixture at the row's T."""
    out = []
    for i in range(student.shape[0]):
        t = float(temperatures[i])
        p = sum(weights[i, k] * torch.softmax(teachers[k, i] / t, -1) for k in range(teachers.shape[0]))
        logq = torch.log_softmax(student[i] / t, -1)
        out.append(t * t * (p * (p.log() - logq)).sum())
    return torch.stack(out)


def _inputs(seed=0, rows=7, classes=5, teachers=3):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(teachers, rows, classes, generator=g, dtype=torch.float64) * 3
    weights = torch.softmax(torch.randn(rows, teachers, generator=g, dtype=torch.float64), -1)
    temperatures = 1.0 + 3.0 * torch.rand(rows, generator=g, dtype=torch.float64)
    return student, teacher, weights, temperatures


def test_row_temperature_kd_matches_a_float64_loop_in_value_and_gradient():
    student, teacher, weights, temperatures = _inputs()
    s = student.clone().requires_grad_(True)
    got = row_temperature_kd(s, teacher, weights, temperatures)
    torch.testing.assert_close(got, _reference_forward_kl(student, teacher, weights, temperatures),
                               rtol=1e-12, atol=1e-14)
    # d/ds_i [T_i^2 KL(p_i || softmax(s_i / T_i))] = T_i (softmax(s_i / T_i) - p_i), each row its own T
    g = torch.Generator().manual_seed(1)
    up = torch.randn(len(student), generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((got * up).sum(), s)
    t = temperatures[:, None]
    p = torch.einsum("bk,kbc->bc", weights, torch.softmax(teacher / t[None], -1))
    torch.testing.assert_close(grad, up[:, None] * t * (torch.softmax(student / t, -1) - p), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("kind", PROB_KINDS)
def test_row_temperature_kd_is_each_rows_kd_at_its_own_temperature(kind):
    """Every kind, row by row against kd_divergence_to_probs at that row's scalar temperature (itself
    tested against float64 references in test_losses.py), values and gradients."""
    student, teacher, weights, temperatures = _inputs(2)
    s = student.clone().requires_grad_(True)
    got = row_temperature_kd(s, teacher, weights, temperatures, kind=kind, skew_alpha=0.3)
    (grad,) = torch.autograd.grad(got.sum(), s)
    for i in range(len(student)):
        t = float(temperatures[i])
        row = student[i:i + 1].clone().requires_grad_(True)
        want = kd_divergence_to_probs(row, blend_probs(teacher[:, i:i + 1], weights[i:i + 1], t), kind=kind,
                                      temperature=t, skew_alpha=0.3, reduction="none")
        (want_grad,) = torch.autograd.grad(want.sum(), row)
        torch.testing.assert_close(got[i:i + 1], want.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad[i:i + 1], want_grad, rtol=1e-11, atol=1e-13)


def test_one_temperature_for_every_row_is_plain_kd_and_only_the_student_gets_gradient():
    student, teacher, weights, _ = _inputs(3)
    same = torch.full((len(student),), 2.5, dtype=torch.float64)
    torch.testing.assert_close(row_temperature_kd(student, teacher, weights, same),
                               kd_divergence_to_probs(student, blend_probs(teacher, weights, 2.5), temperature=2.5,
                                                      reduction="none"), rtol=1e-13, atol=1e-15)
    leaves = [x.clone().requires_grad_(True) for x in (student, teacher, weights, same)]
    row_temperature_kd(*leaves).sum().backward()
    assert leaves[0].grad is not None and all(x.grad is None for x in leaves[1:])
    with pytest.raises(ValueError, match="mse_logits"):
        row_temperature_kd(student, teacher, weights, same, kind="mse_logits")
    with pytest.raises(ValueError, match="temperatures"):
        row_temperature_kd(student, teacher, weights, same * 0)


# --- logit adjustment ---------------------------------------------------------------------------------

def test_logit_adjusted_cross_entropy_by_hand_and_tau_zero_is_plain_cross_entropy():
    # logits 0, 0 with prior (0.8, 0.2) at tau 1: softmax of the adjusted logits is the prior itself
    logits = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    prior = torch.tensor([0.8, 0.2], dtype=torch.float64).log()
    loss = logit_adjusted_cross_entropy(logits, torch.tensor([1, 0]), prior, tau=1.0)
    torch.testing.assert_close(loss, torch.tensor([-math.log(0.2), -math.log(0.8)], dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), logits)  # softmax(adjusted) - onehot
    torch.testing.assert_close(grad, torch.tensor([[0.8, -0.8], [-0.2, 0.2]], dtype=torch.float64))
    # tau 2 doubles the shift: softmax(2 log prior) = (0.64, 0.04) / 0.68
    half = logit_adjusted_cross_entropy(torch.zeros(1, 2), torch.tensor([1]), prior.float(), tau=2.0)
    assert half.item() == pytest.approx(-math.log(0.04 / 0.68), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 4, generator=g), torch.randint(0, 4, (9,), generator=g)
    for smoothing in (0.0, 0.1):
        assert torch.equal(logit_adjusted_cross_entropy(x, y, torch.randn(4), 0.0, label_smoothing=smoothing),
                           F.cross_entropy(x, y, reduction="none", label_smoothing=smoothing))


# --- config -------------------------------------------------------------------------------------------

def test_the_keys_parse_with_defaults_that_change_nothing():
    cfg = _cfg(0.5)
    assert (cfg.loss.class_weights, cfg.loss.class_temperature, cfg.loss.logit_adjustment) == ("none", 1.0, 0.0)
    assert cfg.data.long_tail.imbalance is None and cfg.data.long_tail.seed == 0
    cfg = _cfg(0.5, ("loss.class_weights", "effective_number"), ("loss.class_temperature", 1.5),
               ("loss.logit_adjustment", 1), ("data.long_tail.imbalance", 100), ("data.long_tail.seed", 3))
    assert (cfg.loss.class_weights, cfg.loss.class_temperature, cfg.loss.logit_adjustment) == \
        ("effective_number", 1.5, 1.0)
    assert (cfg.data.long_tail.imbalance, cfg.data.long_tail.seed) == (100.0, 3)


@pytest.mark.parametrize("override, must_contain", [
    (("loss.class_weights", "inverse"), ["loss.class_weights", "'inverse'", "none, inverse_frequency, effective_number"]),
    (("loss.class_temperature", 0.5), ["loss.class_temperature", "0.5", ">= 1.0"]),
    (("loss.logit_adjustment", -1), ["loss.logit_adjustment", "-1", ">= 0"]),
    (("data.long_tail.imbalance", 0.5), ["data.long_tail.imbalance", "0.5", ">= 1.0"]),
    (("data.long_tail.ratio", 10), ["data.long_tail.ratio", "unknown key", "imbalance, seed"]),
])
def test_errors_name_the_key_the_value_and_the_choices(override, must_contain):
    with pytest.raises(ConfigError) as err:
        _cfg(0.5, override)
    for part in must_contain:
        assert part in str(err.value)


@pytest.mark.parametrize("kind", ["mse_logits", "focal_kd", "margin_kd", "dkd"])
def test_a_class_temperature_is_refused_for_kinds_of_one_temperature(kind):
    with pytest.raises(ConfigError, match=rf"loss\.class_temperature: 1\.5 .*loss\.kind='{kind}'.*forward_kl"):
        _cfg(0.5, ("loss.kind", kind), ("loss.class_temperature", 1.5))
    assert _cfg(0.5, ("loss.kind", kind), ("loss.class_weights", "inverse_frequency")).loss.kind == kind


@pytest.mark.parametrize("key, value", [("loss.class_weights", "inverse_frequency"), ("loss.class_temperature", 2.0),
                                        ("loss.logit_adjustment", 1.0), ("data.long_tail.imbalance", 10)])
def test_a_language_model_asking_for_long_tail_kd_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: .*for classifiers"):
        load_config(REPO / "jobs/configs/tiny_lm.yaml", [f"{key}={value}"])


# --- through batch_loss -----------------------------------------------------------------------------

B, C, K, T = 6, 5, 2, 2.0
COUNTS = (400, 120, 40, 12, 4)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g, dtype=torch.float64)
    teachers = torch.randn(K, B, C, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([3, -1, 0, -1, 4, 1])
    return logits, teachers, y


def _run(cfg, logits, teachers, y, alpha, long_tail, y_b=None, lam=None):
    student = logits.clone().requires_grad_(True)
    parts = batch_loss(cfg, TeacherBlend("uniform", K), student, DenseLogits(teachers), student, y,
                       temperature=T, alpha=alpha, causal=False, y_b=y_b, lam=lam, long_tail=long_tail)
    (grad,) = torch.autograd.grad(parts.total, student)
    return parts, grad


def _kd_grad(logits, teachers, t):
    """d/ds of t^2 KL(p || softmax(s / t)) per row, p the teachers' mean softmax at t; t [B, 1] or a number."""
    return t * (torch.softmax(logits / t, -1) - torch.softmax(teachers / t, -1).mean(0))


def _task_grad(logits, y, shift=0.0):
    return torch.softmax(logits + shift, -1) - F.one_hot(y.clamp_min(0), C).double()


def test_the_defaults_leave_batch_loss_bit_identical():
    cfg = _cfg(0.3)
    assert long_tail_terms(cfg, COUNTS, C) is None
    logits, teachers, y = _batch()
    plain, plain_grad = _run(cfg, logits, teachers, y, 0.3, None)
    # terms that are all off, handed in explicitly, take the same path
    off, off_grad = _run(cfg, logits, teachers, y, 0.3, LongTail(None, None, log_prior(COUNTS).float(), 0.0))
    assert torch.equal(plain.total, off.total) and torch.equal(plain.kd, off.kd) and torch.equal(plain.task, off.task)
    assert torch.equal(plain_grad, off_grad)
    # and both are the loss as it was made before these terms existed, bit for bit (float32, as the loop runs)
    student, teachers32 = logits.float(), teachers.float()
    target = TeacherBlend("uniform", K)(teachers32, temperature=T, features=student).detach()
    kd = kd_divergence_to_probs(student, target, kind="forward_kl", temperature=T, skew_alpha=cfg.loss.skew_alpha,
                                reduction="none")
    task = F.cross_entropy(student, y.clamp_min(0), reduction="none", label_smoothing=0.0)
    before = torch.where(y >= 0, 0.3 * kd + 0.7 * task, kd).mean()
    now = batch_loss(cfg, TeacherBlend("uniform", K), student, DenseLogits(teachers32), student, y, temperature=T,
                     alpha=0.3, causal=False, long_tail=long_tail_terms(cfg, COUNTS, C))
    assert torch.equal(now.total, before)


def test_class_weights_weigh_each_rows_kd_by_its_label_or_the_teachers_top_class():
    alpha = 0.3
    cfg = _cfg(alpha, ("loss.class_weights", "inverse_frequency"))
    lt = long_tail_terms(cfg, COUNTS, C)
    assert lt.temperatures is None and lt.tau == 0.0
    logits, teachers, y = _batch(1)
    parts, grad = _run(cfg, logits, teachers, y, alpha, lt)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    w = (1 / n) * n.sum() / C  # inverse frequency averaging 1 over the rows
    classes = torch.where(y >= 0, y, torch.softmax(teachers, -1).mean(0).argmax(-1))
    kd = w[classes][:, None] * _kd_grad(logits, teachers, T) / B
    task = _task_grad(logits, y) / B
    labeled = y >= 0
    torch.testing.assert_close(grad[~labeled], kd[~labeled], rtol=1e-6, atol=1e-9)  # float32 weights
    torch.testing.assert_close(grad[labeled], (alpha * kd + (1 - alpha) * task)[labeled], rtol=1e-6, atol=1e-9)
    plain, _ = _run(_cfg(alpha), logits, teachers, y, alpha, None)
    torch.testing.assert_close(parts.kd, w[classes] * plain.kd, rtol=1e-6, atol=0)


def test_class_temperatures_take_each_rows_kd_at_its_class_temperature():
    alpha = 0.5
    cfg = _cfg(alpha, ("loss.class_temperature", 2.0))
    lt = long_tail_terms(cfg, COUNTS, C)
    assert lt.weights is None
    logits, teachers, y = _batch(2)
    _, grad = _run(cfg, logits, teachers, y, alpha, lt)
    log_n = torch.tensor(COUNTS, dtype=torch.float64).log()
    multiplier = 1 + (log_n.max() - log_n) / (log_n.max() - log_n.min())
    classes = torch.where(y >= 0, y, torch.softmax(teachers, -1).mean(0).argmax(-1))
    t = (T * multiplier[classes])[:, None]
    kd = _kd_grad(logits, teachers, t) / B
    labeled = y >= 0
    torch.testing.assert_close(grad[~labeled], kd[~labeled], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad[labeled], (alpha * kd + (1 - alpha) * _task_grad(logits, y) / B)[labeled],
                               rtol=1e-6, atol=1e-9)


def test_logit_adjustment_shifts_the_task_terms_logits_by_tau_log_prior():
    alpha, tau = 0.4, 1.5
    cfg = _cfg(alpha, ("loss.logit_adjustment", tau))
    lt = long_tail_terms(cfg, COUNTS, C)
    assert not lt.shapes_kd
    logits, teachers, y = _batch(3)
    _, grad = _run(cfg, logits, teachers, y, alpha, lt)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    kd = _kd_grad(logits, teachers, T) / B
    task = _task_grad(logits, y, tau * (n / n.sum()).log()) / B
    labeled = y >= 0
    torch.testing.assert_close(grad[~labeled], kd[~labeled], rtol=1e-12, atol=1e-14)  # KD untouched
    torch.testing.assert_close(grad[labeled], (alpha * kd + (1 - alpha) * task)[labeled], rtol=1e-6, atol=1e-8)


def test_a_mixed_batch_classes_every_row_by_the_teachers():
    alpha = 0.25
    cfg = _cfg(alpha, ("loss.class_weights", "inverse_frequency"))
    lt = long_tail_terms(cfg, COUNTS, C)
    logits, teachers, _ = _batch(4)
    y = torch.tensor([3, 2, 0, 1, 4, 1])
    y_b = torch.tensor([1, 0, 2, 0, 3, 3])
    lam = torch.tensor([0.7, 0.4, 0.5, 0.9, 0.2, 0.6], dtype=torch.float64)
    parts, _ = _run(cfg, logits, teachers, y, alpha, lt, y_b=y_b, lam=lam)
    plain, _ = _run(_cfg(alpha), logits, teachers, y, alpha, None, y_b=y_b, lam=lam)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    w = (1 / n) * n.sum() / C
    torch.testing.assert_close(parts.kd, w[torch.softmax(teachers, -1).mean(0).argmax(-1)] * plain.kd, rtol=1e-6, atol=0)


def test_long_tail_terms_pad_the_counts_and_refuse_none_or_too_many():
    cfg = _cfg(0.5, ("loss.class_weights", "inverse_frequency"), ("loss.class_temperature", 1.5),
               ("loss.logit_adjustment", 1.0))
    lt = long_tail_terms(cfg, (8, 2), 3)  # class 2 has no train rows: the rarest's weight, factor, prior
    # raw 1/8, 1/2, 1/2 over 10 rows, sum n raw = 2 -> x 5; the prior counts class 2 as 2 rows of 12
    torch.testing.assert_close(lt.weights, torch.tensor([0.625, 2.5, 2.5]))
    torch.testing.assert_close(lt.temperatures, torch.tensor([1.0, 1.5, 1.5]))
    torch.testing.assert_close(lt.log_prior, torch.tensor([8 / 12, 2 / 12, 2 / 12]).log())
    assert lt.tau == 1.0 and lt.weights.dtype == torch.float32
    with pytest.raises(ValueError, match="labeled rows for each of the 3 classes"):
        long_tail_terms(cfg, (), 3)
    with pytest.raises(ValueError, match="labeled rows for each of the 3 classes"):
        long_tail_terms(cfg, (1, 2, 3, 4), 3)


# --- the long-tailed train split ----------------------------------------------------------------------

def test_long_tail_shares_follow_the_exponential_profile():
    # 3 equal classes at imbalance 100: targets 100, 10, 1 of 100 rows each
    assert long_tail_shares([100, 100, 100], 100) == pytest.approx([1.0, 0.1, 0.01], rel=1e-12)
    # the largest class sets n_max; a class already below its target keeps everything, an empty one 1
    assert long_tail_shares([50, 200, 10, 0, 30], 16) == pytest.approx([1.0, 100 / 200, 1.0, 1.0, 12.5 / 30], rel=1e-12)
    assert long_tail_shares([7], 100) == [1.0]
    with pytest.raises(ValueError, match="imbalance"):
        long_tail_shares([1, 2], 0.5)


def _rows(n=30000, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**62, size=n, dtype=np.int64)
    split = rng.choice(np.array(["train", "train", "train", "val", "test"]), size=n)
    label = rng.integers(0, classes, size=n)
    label[rng.random(n) < 0.1] = -1  # some unlabeled train rows
    return {"id": ids, "split": split, "label": label, "x": np.arange(n)}


def test_keep_long_tail_cuts_train_classes_by_id_alone_and_leaves_the_rest():
    batch = _rows()
    shares = [1.0, 0.1, 0.01]
    kept = keep_long_tail({k: v.copy() for k, v in batch.items()}, shares, seed=5)
    # exactly the rows whose seeded uniform is below their class's share, nothing else
    u = id_uniform(batch["id"], 5, salt=3)
    cut = (batch["split"] == "train") & (batch["label"] >= 0)
    want = ~cut | (u < np.asarray(shares)[np.clip(batch["label"], 0, 2)])
    assert kept["x"].tolist() == batch["x"][want].tolist()
    # validation, test and unlabeled train rows all stay
    for split in ("val", "test"):
        assert (kept["split"] == split).sum() == (batch["split"] == split).sum()
    assert ((kept["split"] == "train") & (kept["label"] < 0)).sum() == ((batch["split"] == "train") & (batch["label"] < 0)).sum()
    # about share * rows per class (binomial; 4 standard deviations)
    for c, share in enumerate(shares):
        n = int((cut & (batch["label"] == c)).sum())
        got = int(((kept["split"] == "train") & (kept["label"] == c)).sum())
        assert abs(got - share * n) <= 4 * math.sqrt(n * share * (1 - share)) + 1, (c, got, share * n)
    # the same rows whatever the blocks: two halves give the union of the whole
    halves = [keep_long_tail({k: v[s] for k, v in batch.items()}, shares, seed=5)
              for s in (slice(0, 12345), slice(12345, None))]
    assert np.concatenate([h["x"] for h in halves]).tolist() == kept["x"].tolist()
    # another seed keeps other rows
    assert keep_long_tail({k: v.copy() for k, v in batch.items()}, shares, seed=6)["x"].tolist() != kept["x"].tolist()


def test_split_stats_count_the_labeled_train_rows_per_class():
    batch = {"id": np.arange(9), "split": np.array(["train"] * 6 + ["val"] * 3),
             "label": np.array([0, 2, 2, -1, 2, 0, 1, 1, 1])}
    stats = split_stats(batch, ())
    assert dict(zip(stats["split"], stats["class_counts"])) == {"train": "2,0,3", "val": ""}
    assert class_counts_text(np.array([-1, -1])) == ""
    assert sum_class_counts(["2,0,3", "", "1,1,0,4"]) == (3, 1, 3, 4)


# --- metrics and report ---------------------------------------------------------------------------------

def test_per_class_recall_and_balanced_accuracy_by_hand():
    # class 0: 3 rows, 2 right; class 1: 1 row, right; class 2: no row; one unlabeled row left out
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.9, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1, -1])
    assert per_class_recall(scores, labels) == [pytest.approx(2 / 3), 1.0, None]
    assert balanced_accuracy(scores, labels) == pytest.approx((2 / 3 + 1.0) / 2)
    scores_of = classifier_scores(scores, labels)
    assert scores_of["accuracy"] == pytest.approx(3 / 4) and scores_of["balanced_accuracy"] == pytest.approx(5 / 6)
    # a model that always answers the head class: accuracy 0.9 on a 9:1 split, balanced accuracy 0.5
    head = torch.tensor([[1.0, 0.0]] * 10)
    skewed = torch.tensor([0] * 9 + [1])
    assert classifier_scores(head, skewed)["accuracy"] == pytest.approx(0.9)
    assert balanced_accuracy(head, skewed) == pytest.approx(0.5)
    assert balanced_accuracy(head, torch.full((10,), -1)) is None


def _metrics(counts, **long_tail):
    terms = {"class_weights": "none", "class_temperature": 1.0, "logit_adjustment": 0.0, "imbalance": None}
    return {"teachers": {"t": 0.9}, "student": 0.8, "baseline": 0.7, "metric": "accuracy",
            "data": {"class_counts": counts, "class_names": ["shirt", "bag"]},
            "balanced_accuracy": {"t": 0.85, "blend": 0.86, "baseline": 0.6, "student": 0.75},
            "per_class_recall": {"t": [0.9, 0.8], "blend": [0.92, 0.8], "baseline": [1.0, 0.2], "student": [0.9, None]},
            "long_tail": {**terms, **long_tail}}


def test_the_report_gives_each_classs_recall_on_long_tailed_data_or_a_long_tail_loss():
    rows = {"t": {"accuracy": 0.9}, "blend": {"accuracy": 0.9}, "baseline": {"accuracy": 0.7},
            "student": {"accuracy": 0.8}}
    text = report_markdown(_metrics([500, 5]), rows, plots=False)
    assert "## Per class" in text and "500 to 5, 100.0× apart" in text
    assert "| class | train rows | t | blend | baseline | student |" in text
    assert "| shirt | 500 | 0.9000 | 0.9200 | 1.0000 | 0.9000 |" in text
    assert "| bag | 5 | 0.8000 | 0.8000 | 0.2000 | - |" in text
    assert "| **balanced accuracy** | | 0.8500 | 0.8600 | 0.6000 | 0.7500 |" in text
    assert "Long-tail settings" not in text
    # balanced data, no long-tail term: no section
    assert "## Per class" not in report_markdown(_metrics([500, 60]), rows, plots=False)
    # a long-tail term asks for it whatever the counts, and names the settings
    text = report_markdown(_metrics([500, 60], class_weights="effective_number", logit_adjustment=1.0), rows,
                           plots=False)
    assert "## Per class" in text
    assert "`loss.class_weights` = effective_number, `loss.logit_adjustment` = 1.0 (the baseline trains with " \
           "the logit adjustment too)." in text
    assert is_long_tailed([100, 10]) and not is_long_tailed([100, 11]) and is_long_tailed([3, 0])
    assert not is_long_tailed([5]) and not is_long_tailed([])


def test_the_shipped_long_tail_example_asks_for_every_term():
    cfg = load_config(REPO / "jobs/configs/long_tail.yaml")
    assert cfg.data.format == "fashion_mnist" and cfg.data.long_tail.imbalance == 100
    assert (cfg.loss.class_weights, cfg.loss.class_temperature, cfg.loss.logit_adjustment) == \
        ("effective_number", 1.5, 1.0)


def test_long_tail_terms_move_to_a_device_whole():
    """The worker moves the run's terms once to its device (train/loop.py); every tensor goes."""
    terms = LongTail.from_counts([100, 10, 1], "inverse_frequency", 1.5, 1.0)
    moved = terms.to("meta")
    assert all(t.device.type == "meta" for t in (moved.weights, moved.temperatures, moved.log_prior))
    assert moved.tau == terms.tau == 1.0 and terms.weights.device.type == "cpu"
