"""Tests for distill_ray.kd.curriculum: measurers against float64 references, rank fusion by hand,
schedules at their endpoints and midpoints, and rank-consistent sharding/sampling."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from torch.testing import assert_close

from distill_ray.kd import curriculum as cur

K, N, C = 3, 12, 6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _teacher_logits(seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(K, N, C, generator=_gen(seed), dtype=torch.float64) * 2.0).to(dtype)


def _labels(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, C, (N,), generator=_gen(seed))


def _entropy_ref(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(-1)


# ---------------------------------------------------------------------------------------------
# measurers


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_ensemble_entropy_matches_reference(temperature):
    logits = _teacher_logits()
    mean_p = torch.softmax(logits / temperature, -1).mean(0)
    assert_close(cur.ensemble_entropy(logits, temperature=temperature), _entropy_ref(mean_p))


def test_ensemble_entropy_extremes():
    flat = torch.zeros(K, N, C)
    assert_close(cur.ensemble_entropy(flat), torch.full((N,), math.log(C)))
    sure = torch.zeros(K, N, C)
    sure[..., 0] = 100.0
    assert cur.ensemble_entropy(sure).abs().max().item() < 1e-6


def test_teacher_disagreement_matches_reference_and_extremes():
    logits = _teacher_logits()
    p = torch.softmax(logits, -1)
    expected = _entropy_ref(p.mean(0)) - _entropy_ref(p).mean(0)
    assert_close(cur.teacher_disagreement(logits), expected)
    # Identical teachers do not disagree however unsure they are; two sure, different teachers
    # disagree by log 2 (the JS divergence of two disjoint point masses).
    same = logits[:1].expand(K, N, C)
    assert cur.teacher_disagreement(same).abs().max().item() < 1e-12
    opposed = torch.full((2, 1, C), -50.0, dtype=torch.float64)
    opposed[0, 0, 0] = opposed[1, 0, 1] = 50.0
    assert_close(cur.teacher_disagreement(opposed), torch.tensor([math.log(2.0)], dtype=torch.float64))


def test_teacher_ce_matches_reference():
    logits, labels = _teacher_logits(), _labels()
    mean_p = torch.softmax(logits, -1).mean(0)
    assert_close(cur.teacher_ce(logits, labels), -mean_p[torch.arange(N), labels].log())
    with pytest.raises(ValueError, match="labels"):
        cur.teacher_ce(logits, torch.full((N,), -100))


def test_student_loss_matches_reference():
    logits, labels = _teacher_logits()[0], _labels()
    expected = -torch.log_softmax(logits, -1)[torch.arange(N), labels]
    assert_close(cur.student_loss(logits, labels), expected)


def test_sequence_length_counts_real_tokens():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert cur.sequence_length(mask).tolist() == [3.0, 1.0, 4.0]
    assert cur.sequence_length(mask.bool()).dtype == torch.float32


def test_measurers_upcast_half_precision():
    half = _teacher_logits(dtype=torch.float16)
    for fn in (cur.ensemble_entropy, cur.teacher_disagreement):
        out = fn(half)
        assert out.dtype == torch.float32
        assert_close(out.double(), fn(half.double()), atol=1e-5, rtol=1e-5)


def test_measurer_registry_and_unknown_name():
    assert set(cur.MEASURERS) == {"ensemble_entropy", "teacher_disagreement", "teacher_ce", "student_loss",
                                  "sequence_length", "reference_rouge_loss"}
    assert cur.measurer("teacher_ce") is cur.teacher_ce
    with pytest.raises(ValueError) as err:
        cur.measurer("entropy")
    assert "'entropy'" in str(err.value) and all(name in str(err.value) for name in cur.MEASURERS)


# ---------------------------------------------------------------------------------------------
# ordering, buckets, fusion


def test_difficulty_order_is_stable():
    difficulty = torch.tensor([2.0, 1.0, 2.0, 1.0, 0.0, 1.0])
    assert cur.difficulty_order(difficulty).tolist() == [4, 1, 3, 5, 0, 2]


@pytest.mark.parametrize("size,num_buckets", [(10, 3), (12, 4), (7, 7), (5, 8), (1000, 7)])
def test_difficulty_buckets_are_balanced_and_follow_the_order(size, num_buckets):
    difficulty = torch.randn(size, generator=_gen(size))
    buckets = cur.difficulty_buckets(difficulty, num_buckets)
    counts = torch.bincount(buckets, minlength=num_buckets)
    assert counts.sum().item() == size and len(counts) == num_buckets
    assert counts.max().item() - counts.min().item() <= 1
    along_order = buckets[cur.difficulty_order(difficulty)]
    assert bool((along_order[1:] >= along_order[:-1]).all())  # easier samples, lower buckets
    assert cur.difficulty_buckets(torch.arange(10.0), 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_rrf_hand_computed_example():
    # Ranks easy -> hard: m1 = [1, 3, 2], m2 = [3, 1, 2]; ties in m3 go by index: m3 = [2, 3, 1].
    m1 = torch.tensor([0.1, 0.5, 0.3])
    m2 = torch.tensor([3.0, 1.0, 2.0])
    m3 = torch.tensor([1.0, 1.0, 0.0])
    fused = cur.reciprocal_rank_fusion(m1, m2, k=60)
    expected = -torch.tensor([1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 1 / 62 + 1 / 62], dtype=torch.float64)
    assert_close(fused, expected, rtol=0, atol=1e-15)
    # Item 2 is the median of both, yet fusion calls it the hardest: 2/62 < 1/61 + 1/63.
    assert cur.difficulty_order(fused).tolist() == [0, 1, 2]
    fused3 = cur.reciprocal_rank_fusion(m1, m2, m3, k=60)
    expected3 = expected - torch.tensor([1 / 62, 1 / 63, 1 / 61], dtype=torch.float64)
    assert_close(fused3, expected3, rtol=0, atol=1e-15)
    assert cur.difficulty_order(fused3).tolist() == [2, 0, 1]


def test_average_ranks_share_tied_positions():
    assert cur._average_ranks(torch.tensor([5.0, 7.0, 7.0, 9.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert cur._average_ranks(torch.tensor([3.0, 1.0, 3.0, 3.0, 0.0])).tolist() == [4.0, 2.0, 4.0, 4.0, 1.0]
    assert cur._average_ranks(torch.tensor([2.0, 2.0])).tolist() == [1.5, 1.5]


def test_reference_rouge_loss_hand_computed_with_directions_and_ties():
    # ROUGE-L (lower = harder): idx3 (1.0) rank 1; idx0, idx2 (0.5) share ranks 2-3 -> 2.5; idx1 (0.0) rank 4.
    # loss (higher = harder):   idx2 (1.0) rank 1; idx0, idx3 (2.0) share ranks 2-3 -> 2.5; idx1 (3.0) rank 4.
    rouge = torch.tensor([0.5, 0.0, 0.5, 1.0])
    loss = torch.tensor([2.0, 3.0, 1.0, 2.0])
    fused = cur.reference_rouge_loss(rouge, loss, k=60)
    expected = -torch.tensor([2 / 62.5, 2 / 64, 1 / 62.5 + 1 / 61, 1 / 61 + 1 / 62.5], dtype=torch.float64)
    assert fused.dtype == torch.float64
    assert_close(fused, expected, rtol=0, atol=1e-15)
    # idx2 and idx3 fuse to exactly the same value; the order then keeps index order (deterministic).
    assert fused[2].item() == fused[3].item()
    assert cur.difficulty_order(fused).tolist() == [2, 3, 0, 1]
    # k only changes the weights: k = 0 gives plain reciprocal ranks.
    assert_close(cur.reference_rouge_loss(rouge, loss, k=0),
                 -torch.tensor([2 / 2.5, 2 / 4, 1 / 2.5 + 1, 1 + 1 / 2.5], dtype=torch.float64), rtol=0, atol=1e-15)


def test_reference_rouge_loss_depends_on_values_not_row_order():
    rouge = torch.tensor([0.0, 0.2, 0.0, 0.7, 0.2, 1.0, 0.0, 0.4])
    loss = torch.tensor([3.0, 1.5, 2.5, 0.5, 1.5, 0.1, 2.5, 1.0])
    fused = cur.reference_rouge_loss(rouge, loss)
    permutation = torch.randperm(len(rouge), generator=_gen(5))
    assert_close(cur.reference_rouge_loss(rouge[permutation], loss[permutation]), fused[permutation], rtol=0, atol=0)


def test_rank_fusion_refuses_nan_and_unknown_tie_rules():
    with pytest.raises(ValueError, match="NaN"):
        cur.reference_rouge_loss(torch.tensor([0.5, 0.2]), torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="tie rule"):
        cur.reciprocal_rank_fusion(torch.tensor([1.0]), ties="dense")


def test_rrf_of_a_ranking_with_itself_preserves_the_order():
    difficulty = torch.randn(200, generator=_gen(3))
    order = cur.difficulty_order(difficulty).tolist()
    assert cur.difficulty_order(cur.reciprocal_rank_fusion(difficulty, k=60)).tolist() == order
    assert cur.difficulty_order(cur.reciprocal_rank_fusion(difficulty, difficulty * 10 + 5, k=1)).tolist() == order
    with pytest.raises(ValueError, match="same"):
        cur.reciprocal_rank_fusion(difficulty, difficulty[:5])


# ---------------------------------------------------------------------------------------------
# schedules


def test_schedule_value_constant_and_linear():
    assert cur.schedule_value("constant", 70, 100, 4.0, 1.0) == 4.0
    linear = [cur.schedule_value("linear", s, 100, 1.0, 3.0) for s in (0, 25, 50, 100, 150, -5)]
    assert linear == pytest.approx([1.0, 1.5, 2.0, 3.0, 3.0, 1.0])
    assert cur.schedule_value("linear", 5, 0, 1.0, 3.0) == 3.0  # no steps: already at the end


def test_schedule_value_cosine():
    values = [cur.schedule_value("cosine", s, 100, 1.0, 3.0) for s in (0, 25, 50, 100, 200)]
    assert values == pytest.approx([1.0, 1.0 + (1 - math.cos(math.pi / 4)), 2.0, 3.0, 3.0])
    assert cur.schedule_value("cosine", 50, 100, 0.9, 0.5) == pytest.approx(0.7)  # decreasing too


def test_schedule_value_stage():
    temps = (1.0, 1.33, 1.67, 2.0)
    assert [cur.schedule_value("stage", 0, 10, 9.0, 9.0, stage=s, stage_values=temps) for s in range(6)] == \
        [1.0, 1.33, 1.67, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="stage_values"):
        cur.schedule_value("stage", 0, 10, 1.0, 2.0, stage=1)


def test_unknown_schedule_and_scheduler_kinds_list_the_choices():
    with pytest.raises(ValueError) as err:
        cur.schedule_value("cosin", 0, 10, 1.0, 2.0)
    assert "'cosin'" in str(err.value) and all(k in str(err.value) for k in cur.SCHEDULE_KINDS)
    with pytest.raises(ValueError) as err:
        cur.make_scheduler("ramp")
    assert "'ramp'" in str(err.value) and all(k in str(err.value) for k in cur.SCHEDULER_KINDS)
    with pytest.raises(ValueError) as err:
        cur.MultiStage(unit="minute")
    assert "'minute'" in str(err.value) and "epoch, step" in str(err.value)


def test_make_scheduler_builds_each_kind():
    assert cur.make_scheduler("none") is None
    assert cur.make_scheduler("linear_ramp", start_fraction=0.5) == cur.LinearRamp(start_fraction=0.5)
    assert cur.make_scheduler("multi_stage", num_stages=2, temperatures=[1, 2]).temperatures == (1.0, 2.0)
    assert cur.make_scheduler("confidence", tau=0.5) == cur.ConfidenceSampling(tau=0.5)
    assert set(cur.SCHEDULERS) == set(cur.SCHEDULER_KINDS)


# ---------------------------------------------------------------------------------------------
# schedulers


def test_linear_ramp_values():
    ramp = cur.LinearRamp(start_fraction=0.3, full_at_epoch=3.0)
    fractions = [ramp.open_fraction(e) for e in (0, 1.5, 3, 10, -1)]
    assert fractions == pytest.approx([0.3, 0.65, 1.0, 1.0, 0.3])
    with pytest.raises(ValueError, match="start_fraction"):
        cur.LinearRamp(start_fraction=0.0)


def test_multi_stage_pocl_defaults():
    stages = cur.MultiStage()
    assert (stages.num_stages, stages.stage_length, stages.unit) == (4, 1.0, "epoch")
    assert [stages.stage_at(e) for e in (0, 0.99, 1, 1.5, 2, 3, 3.7, 50)] == [0, 0, 1, 1, 2, 3, 3, 3]
    assert [stages.temperature(s) for s in range(4)] == [1.0, 1.33, 1.67, 2.0]
    assert [stages.open_fraction(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert stages.alpha(2, base_alpha=0.7) == 0.7


def test_multi_stage_in_steps_and_float_lengths():
    by_step = cur.MultiStage(num_stages=3, stage_length=250, unit="step", temperatures=(1, 2, 3), alphas=(0.9, 0.7, 0.5))
    assert [by_step.stage_at(s) for s in (0, 249, 250, 499, 500, 10_000)] == [0, 0, 1, 1, 2, 2]
    assert [by_step.alpha(s, base_alpha=0.1) for s in range(3)] == [0.9, 0.7, 0.5]
    # 0.3 / 0.1 is 2.9999999999999996 in floats; stage 3 must still start at epoch 0.3.
    tenth = cur.MultiStage(num_stages=10, stage_length=0.1, temperatures=(1.0,) * 10)
    assert [tenth.stage_at(e) for e in (0.3, 0.7, 0.29)] == [3, 7, 2]
    with pytest.raises(ValueError, match="num_stages is 4"):
        cur.MultiStage(temperatures=(1.0, 2.0))


def test_confidence_sampling_weights():
    sampler = cur.ConfidenceSampling(tau=1.0, floor=0.05)
    confidence = torch.tensor([0.9, 0.1, 0.5, 0.01, 0.3])
    weights = sampler.sampling_weights(confidence)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    expected = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.3], dtype=torch.float64)
    assert_close(weights, expected / expected.sum())
    ordered = sampler.sampling_weights(torch.linspace(0, 1, 50))
    assert bool((ordered[1:] >= ordered[:-1]).all())
    assert ordered[-1].item() > ordered[10].item()
    sharp = cur.ConfidenceSampling(tau=0.01).sampling_weights(confidence)  # floor**100 underflows
    assert math.isfinite(sharp.sum().item()) and sharp[0].item() > 0.99
    flat = cur.ConfidenceSampling(tau=1000.0).sampling_weights(confidence)
    assert_close(flat, torch.full((5,), 0.2, dtype=torch.float64), atol=0.01, rtol=0)


# ---------------------------------------------------------------------------------------------
# opening, sharding, sampling


def test_open_subset():
    order = torch.tensor([5, 3, 0, 9, 1, 2, 4, 6, 7, 8])
    assert cur.open_subset(order, 0.3).tolist() == [5, 3, 0]  # 0.3 * 10 is 3.0000000000000004
    assert cur.open_subset(order, 0.25).tolist() == [5, 3, 0]
    assert cur.open_subset(order, 0.0).tolist() == [5]
    assert len(cur.open_subset(order, 1.0)) == 10
    assert len(cur.open_subset(order, 1.5)) == 10


@pytest.mark.parametrize("world_size", [2, 3])
def test_shard_for_rank_partitions_the_open_subset(world_size):
    order = cur.difficulty_order(torch.randn(101, generator=_gen(5)))
    open_idx = cur.open_subset(order, 0.7)  # 71 indices
    assert len(open_idx) == 71
    shards = [cur.shard_for_rank(open_idx, epoch=2, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    kept = 71 - 71 % world_size
    assert [len(s) for s in shards] == [kept // world_size] * world_size
    union = torch.cat(shards)
    assert len(set(union.tolist())) == kept  # disjoint
    assert set(union.tolist()) <= set(open_idx.tolist())
    # Again: same shards. Another epoch or seed: a different shuffle of the same subset.
    again = [cur.shard_for_rank(open_idx, epoch=2, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    assert all(torch.equal(a, b) for a, b in zip(shards, again))
    next_epoch = cur.shard_for_rank(open_idx, epoch=3, seed=7, rank=0, world_size=world_size)
    other_seed = cur.shard_for_rank(open_idx, epoch=2, seed=8, rank=0, world_size=world_size)
    assert not torch.equal(next_epoch, shards[0]) and not torch.equal(other_seed, shards[0])


def test_shard_for_rank_without_drop_last_covers_everything():
    indices = torch.arange(10, 21)  # 11 indices over 3 ranks
    shards = [cur.shard_for_rank(indices, 0, 0, r, 3, drop_last=False) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(torch.cat(shards).tolist()) == set(range(10, 21))
    assert len(cur.shard_for_rank(indices, 0, 0, 0, 1)) == 11
    with pytest.raises(ValueError, match="rank"):
        cur.shard_for_rank(indices, 0, 0, 3, 3)


def test_sample_for_rank_is_one_global_draw_split_by_rank():
    weights = cur.ConfidenceSampling().sampling_weights(torch.rand(50, generator=_gen(9)))
    whole = cur.sample_for_rank(weights, 100, epoch=1, seed=3, rank=0, world_size=1)
    assert len(whole) == 100
    shards = [cur.sample_for_rank(weights, 100, epoch=1, seed=3, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [33, 33, 33]
    for r in range(3):
        assert torch.equal(shards[r], whole[:99][r::3])
        assert torch.equal(shards[r], cur.sample_for_rank(weights, 100, epoch=1, seed=3, rank=r, world_size=3))
    assert not torch.equal(whole, cur.sample_for_rank(weights, 100, epoch=2, seed=3, rank=0, world_size=1))


def test_sample_for_rank_follows_the_weights():
    weights = torch.tensor([0.7, 0.2, 0.1, 0.0])
    drawn = cur.sample_for_rank(weights, 20_000, epoch=0, seed=0, rank=0, world_size=1)
    frequencies = torch.bincount(drawn, minlength=4).double() / len(drawn)
    assert frequencies[3].item() == 0.0
    assert_close(frequencies, weights.double(), atol=0.015, rtol=0)
    with pytest.raises(ValueError, match="non-negative"):
        cur.sample_for_rank(torch.tensor([-1.0, 2.0]), 4, 0, 0, 0, 1)


def test_the_cache_holds_each_measure_as_the_curriculum_computes_it():
    from distill_ray.cache.build import finish_rows

    rng = np.random.default_rng(0)
    logits = torch.as_tensor(rng.normal(size=(2, 40, 5)).astype(np.float32) * 3)
    labels = np.where(np.arange(40) % 4 == 0, -1, rng.integers(0, 5, 40))
    batch = {"label": labels, "a/logits": logits[0].numpy(), "b/logits": logits[1].numpy()}
    out = finish_rows(batch, ("a", "b"), "float32", None, 5, False, None)
    for name in ("ensemble_entropy", "teacher_disagreement"):
        np.testing.assert_allclose(out[f"difficulty/{name}"], cur.MEASURERS[name](logits).numpy(), rtol=1e-6)
    labeled = labels >= 0
    np.testing.assert_allclose(out["difficulty/teacher_ce"][labeled],
                               cur.MEASURERS["teacher_ce"](logits[:, labeled], torch.as_tensor(labels[labeled])).numpy(),
                               rtol=1e-6)
