"""Long-tail distillation for classifiers: per-class KD weights (inverse frequency, effective number),
per-class temperatures, logit adjustment, each against hand-computed numbers or float64 references,
and the config keys. Pure: no Ray is started."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill_ray.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config
from distill_ray.kd.blending import blend_probs
from distill_ray.kd.long_tail import class_temperatures, class_weights, log_prior, \
    logit_adjusted_cross_entropy, row_classes, row_temperature_kd
from distill_ray.kd.losses import KD_KINDS, kd_divergence_to_probs

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
