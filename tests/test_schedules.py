"""Learning-rate schedules: factors of the base rate at known steps."""

import math

import pytest

from distill_ray.kd.schedules import LR_SCHEDULES, ONECYCLE_START, lr_factor


def test_constant_with_warmup_ramps_then_holds():
    factors = [lr_factor("constant", s, 100, warmup_fraction=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[:10] == sorted(factors[:10]) and set(factors[10:]) == {1.0}


def test_cosine_and_linear_decay_from_the_peak_to_zero():
    assert lr_factor("cosine", 0, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("linear", 25, 100) == pytest.approx(0.75)
    # After a warm-up the decay spans the remaining steps only.
    assert lr_factor("cosine", 20, 100, warmup_fraction=0.2) == 1.0
    assert lr_factor("cosine", 60, 100, warmup_fraction=0.2) == pytest.approx(0.5)


def test_onecycle_rises_from_a_25th_to_the_peak_then_anneals():
    curve = [lr_factor("onecycle", s, 1000) for s in range(1001)]
    assert curve[0] == pytest.approx(ONECYCLE_START)
    assert max(curve) == pytest.approx(1.0) and curve.index(max(curve)) == 300  # 30% warm-up by default
    assert curve[-1] < 1e-4 and all(a >= b for a, b in zip(curve[300:], curve[301:]))
    assert lr_factor("onecycle", 100, 1000, warmup_fraction=0.1) == pytest.approx(1.0)


def test_bad_schedule_names_the_choices():
    with pytest.raises(ValueError, match="valid: " + ", ".join(LR_SCHEDULES)):
        lr_factor("step", 0, 10)
    with pytest.raises(ValueError, match="warmup_fraction"):
        lr_factor("cosine", 0, 10, warmup_fraction=1.0)
    assert all(math.isfinite(lr_factor(k, s, 0)) for k in LR_SCHEDULES for s in (0, 5))
