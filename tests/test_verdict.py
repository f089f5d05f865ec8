"""The run's verdict (distill_ray/evaluation/verdict.py): the noise of a student-baseline difference, the
gain/tie/loss thresholds, and each rule's "try:" line from the figures that trigger it. Pure, no Ray;
the verdict of a real run is checked in tests/test_run_e2e.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill_ray.evaluation.metrics import disagreements
from distill_ray.evaluation.report import report_markdown
from distill_ray.evaluation.verdict import classification_verdict, paired_se, unpaired_se

HOW = "2 standard errors of the paired difference on 300 test rows"
SEARCH = ("try: a search over the distillation settings (loss.temperature, loss.alpha, train.lr): distill-ray run "
          "CONFIG --search N; nothing in this run's figures points at the data, the teachers or the student's size")
LABELS_ONLY = ("try: add unlabeled rows (data.unlabeled_path) or a transfer set (data.transfer: mixup, or augment for text): all 1,200 "
               "train rows are labeled and the teachers are recipes trained on them, so the teachers know nothing "
               "about these rows that the labels do not say")


def test_paired_se_matches_a_hand_computed_value():
    # b = 20 rows only the student gets right, c = 11 only the baseline, n = 300:
    # sqrt(20 + 11 - 9^2 / 300) / 300 = sqrt(30.73) / 300 = 5.543464 / 300
    assert paired_se(20, 11, 300) == pytest.approx(0.0184782, abs=1e-7)
    assert paired_se(0, 0, 300) == 0.0  # the two models agree on every row: no noise in their difference
    # The unpaired fallback: sqrt(0.74 * 0.26 / 300 + 0.70 * 0.30 / 300) = sqrt(0.0013413)
    assert unpaired_se(0.74, 0.70, 300) == pytest.approx(0.0366242, abs=1e-7)
    with pytest.raises(ValueError, match="no test rows"):
        paired_se(1, 0, 0)


def test_paired_se_is_the_standard_error_of_the_mean_per_row_difference():
    right_s = np.array([1] * 20 + [0] * 11 + [1] * 200 + [0] * 69)  # 20 only-student, 11 only-baseline rows
    right_b = np.array([0] * 20 + [1] * 11 + [1] * 200 + [0] * 69)
    d = right_s - right_b
    assert paired_se(20, 11, 300) == pytest.approx(d.std() / math.sqrt(len(d)), rel=1e-12)


def test_disagreements_count_labeled_rows_only_one_model_gets_right():
    labels = torch.tensor([0, 1, 2, 0, 1, -1])
    a = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 1, 0]), 3).float()  # right on rows 0, 1, 4
    b = torch.nn.functional.one_hot(torch.tensor([0, 0, 2, 1, 1, 1]), 3).float()  # right on rows 0, 2, 4
    assert disagreements(a, b, labels) == (1, 1)  # row 1 only A, row 2 only B; row 5 is unlabeled
    # Against a constant guess of class 0 (right on rows 0 and 3): only A on rows 1 and 4, only it on row 3.
    assert disagreements(a.numpy(), np.zeros((6, 3)), labels.numpy()) == (2, 1)


@pytest.mark.parametrize("student_only, baseline_only, outcome", [
    (10, 2, "gain"),  # +8 points against a noise of 2 * sqrt(12 - 0.64) / 100 = 6.7 points
    (8, 2, "tie"),  # +6 points against 2 * sqrt(10 - 0.36) / 100 = 6.2 points: within the noise
    (2, 8, "tie"),
    (2, 10, "loss"),  # -8 points against 6.7
    (0, 0, "tie"),  # no row differs: a difference of 0 is not more than a noise of 0
])
def test_gain_tie_and_loss_thresholds(student_only, baseline_only, outcome):
    baseline = 0.70
    student = baseline + (student_only - baseline_only) / 100
    v = classification_verdict(student=student, baseline=baseline, teachers={"t": 0.9}, num_test=100,
                               student_only=student_only, baseline_only=baseline_only)
    assert v.outcome == outcome
    assert v.noise == pytest.approx(2 * paired_se(student_only, baseline_only, 100))
    assert v.noise_kind == "paired" and v.difference == pytest.approx((student_only - baseline_only) / 100)


def test_a_gain_is_one_plain_line_with_the_share_of_the_gap():
    v = classification_verdict(student=0.80, baseline=0.74, teachers={"mlp_a": 0.78, "cnn_b": 0.86}, num_test=300,
                               student_only=30, baseline_only=12, train_rows=1200, labeled_rows=1200,
                               teachers_are_recipes=True, student_train_accuracy=0.5)
    # 6 points against 2 * sqrt(42 - 18^2 / 300) / 300 = 4.3; (0.80 - 0.74) / (0.86 - 0.74) = 50%
    assert v.outcome == "gain" and v.rules == ()
    assert v.lines == (f"verdict: the student beats its baseline by 6.0 points (noise ±4.3 points: {HOW}): "
                       "distillation paid; 50.0% of the gap to the best teacher (cnn_b, 0.8600)",)
    assert v.gap_recovered == pytest.approx(0.5)


def test_a_tie_with_no_rule_triggered_suggests_a_search():
    # +3 points against 2 * sqrt(31 - 81 / 300) / 300 = 3.7; the best teacher 6 points above the baseline;
    # 100 unlabeled train rows; the student fits its rows to 0.77, 3 points under the best teacher.
    v = classification_verdict(student=0.77, baseline=0.74, teachers={"mlp_a": 0.78, "cnn_b": 0.80}, num_test=300,
                               student_only=20, baseline_only=11, train_rows=1200, labeled_rows=1100,
                               teachers_are_recipes=True, student_train_accuracy=0.77)
    assert v.outcome == "tie" and v.rules == ("search",)
    assert v.lines == (
        "verdict: no clear gain: the student (0.7700) does not beat its baseline trained from labels "
        f"alone (0.7400) by more than the noise: +3.0 points, noise ±3.7 points ({HOW})", SEARCH)


def test_a_loss_says_so_and_all_labeled_rows_with_recipe_teachers_ask_for_unlabeled_rows():
    v = classification_verdict(student=0.70, baseline=0.74, teachers={"mlp_a": 0.78, "cnn_b": 0.80}, num_test=300,
                               student_only=10, baseline_only=22, train_rows=1200, labeled_rows=1200,
                               teachers_are_recipes=True, student_train_accuracy=0.76)
    assert v.outcome == "loss" and v.rules == ("labels_only",)
    assert v.lines == (
        "verdict: distillation did not pay: the student (0.7000) is 4.0 points below its baseline trained from "
        f"labels alone (0.7400), more than the noise (±3.7 points: {HOW})", LABELS_ONLY)
    # The same rows with a pretrained teacher among them, or with unlabeled rows: the rule stays quiet.
    for other in ({"teachers_are_recipes": False}, {"labeled_rows": 1000}):
        quiet = classification_verdict(**{**dict(student=0.70, baseline=0.74, teachers={"mlp_a": 0.78, "cnn_b": 0.80},
                                                 num_test=300, student_only=10, baseline_only=22, train_rows=1200,
                                                 labeled_rows=1200, teachers_are_recipes=True,
                                                 student_train_accuracy=0.76), **other})
        assert quiet.rules == ("search",), other


def test_transfer_rows_turn_the_labels_only_rule_into_a_larger_transfer_set():
    # 1,200 labeled rows and 600 transfer rows, all of the unlabeled ones: only the transfer set is beyond the labels.
    v = classification_verdict(student=0.74, baseline=0.74, teachers={"mlp_a": 0.80}, num_test=300, student_only=5,
                               baseline_only=5, train_rows=1800, labeled_rows=1200, transfer_rows=600,
                               teachers_are_recipes=True)
    assert v.rules == ("labels_only",)
    assert v.lines[1] == ("try: a larger transfer set (raise data.transfer_size, now 600 rows): the teachers are "
                          "recipes trained on the 1,200 labeled train rows and there are no other unlabeled rows, so "
                          "what they add beyond the labels comes from the transfer rows alone")


@pytest.mark.parametrize("train_accuracy, fires", [(0.74, True), (0.76, False), (None, False)])
def test_a_student_far_under_the_best_teacher_on_its_own_rows_asks_for_a_wider_student(train_accuracy, fires):
    v = classification_verdict(student=0.72, baseline=0.72, teachers={"mlp_a": 0.78, "cnn_b": 0.80}, num_test=300,
                               student_only=9, baseline_only=9, student_train_accuracy=train_accuracy)
    assert ("too_small" in v.rules) == fires
    if fires:  # 0.80 - 0.74 = 6 points, more than 5
        assert v.lines[1] == ("try: a wider student (student.options): its accuracy on its own training rows is "
                              "0.7400, 6.0 points under the best teacher's 0.8000 on test (more than 5.0 points): the "
                              "student may be too small to follow them")


@pytest.mark.parametrize("best, student_only, baseline_only, fires", [
    (0.755, 0, 0, True),  # 1.5 points above the baseline: under 2 points (no noise at all)
    (0.775, 20, 11, True),  # 3.5 points: over 2 points but under the noise, 2 * sqrt(30.73) / 300 = 3.7 points
    (0.790, 20, 11, False),  # 5 points: above both
    (0.700, 0, 0, True),  # below the baseline
])
def test_teachers_not_above_the_baseline_leave_nothing_to_distil(best, student_only, baseline_only, fires):
    baseline = 0.74
    v = classification_verdict(student=baseline + (student_only - baseline_only) / 300, baseline=baseline,
                               teachers={"a": best - 0.01, "b": best}, num_test=300, student_only=student_only,
                               baseline_only=baseline_only)
    assert v.outcome == "tie" and ("no_gap" in v.rules) == fires and v.best_teacher == "b"
    if best == 0.775:
        assert v.lines[1] == ("try: stronger teachers or more teacher training (teachers[].recipe, teachers[].options: "
                              "wider, more epochs): the best teacher (b, 0.7750) is only 3.5 points above the baseline "
                              "(0.7400); it takes more than 3.7 points above it (the larger of 2.0 points and the "
                              "noise) to have something to distil: the teachers are not better than labels alone")
    if best == 0.700:
        assert "the best teacher (b, 0.7000) is 4.0 points below the baseline (0.7400); it takes more than 2.0 " \
               "points above it" in v.lines[1]


def test_without_paired_counts_the_unpaired_noise_is_used_and_said():
    v = classification_verdict(student=0.70, baseline=0.74, teachers={"t": 0.9}, num_test=300)
    # 4 points against 2 * 3.66 = 7.3 points: a tie the paired noise (3.7 above) would have called a loss
    assert v.outcome == "tie" and v.noise_kind == "unpaired"
    assert "noise ±7.3 points (2 standard errors of the unpaired difference on 300 test rows)" in v.lines[0]


def test_the_report_carries_the_verdict_lines():
    v = classification_verdict(student=0.70, baseline=0.74, teachers={"mlp_a": 0.78, "cnn_b": 0.80}, num_test=300,
                               student_only=10, baseline_only=22, train_rows=1200, labeled_rows=1200,
                               teachers_are_recipes=True)
    metrics = {"student": 0.70, "baseline": 0.74, "teachers": {"mlp_a": 0.78, "cnn_b": 0.80}, "metric": "accuracy",
               "verdict": v.to_dict()}
    text = report_markdown(metrics, {}, "tiny", plots=False)
    assert v.to_dict()["noise_factor"] == 2.0 and v.to_dict()["lines"] == list(v.lines)
    section = text.split("## Verdict\n\n")[1].split("\n\n")[0]
    assert section.splitlines() == [f"- {line}" for line in v.lines]
    assert "## Verdict" not in report_markdown({**metrics, "verdict": None}, {}, "tiny", plots=False)


class _Split:
    """The part of a cached split's Ray Dataset that scoring.train_accuracy reads, in memory."""

    def __init__(self, x: np.ndarray, label: np.ndarray, sampled: list | None = None):
        self.x, self.label, self.sampled = x, label, sampled

    def random_sample(self, fraction: float, seed: int):
        keep = np.random.default_rng(seed).random(len(self.x)) < fraction
        self.sampled.append(fraction)
        return _Split(self.x[keep], self.label[keep])

    def iter_batches(self, batch_size: int, batch_format: str):
        for i in range(0, len(self.x), batch_size):
            yield {"x": self.x[i:i + batch_size], "label": self.label[i:i + batch_size]}


class _Cache:
    def __init__(self, split: _Split):
        self.split = split

    def rows(self, name: str) -> int:
        return len(self.split.x) if name == "train" else 0

    def dataset(self, name: str, columns):
        assert (name, list(columns)) == ("train", ["x", "label"])
        return self.split


def test_train_accuracy_scores_labeled_rows_and_samples_a_large_split():
    from distill_ray.evaluation.scoring import train_accuracy

    class First(torch.nn.Module):  # predicts the class of the input's first feature
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = np.zeros((2500, 2), np.float32)
    x[:, 0] = np.arange(2500) % 3
    label = x[:, 0].astype(np.int64)
    label[:500] = (label[:500] + 1) % 3  # 500 wrong
    label[500:1000] = -1  # 500 unlabeled, not scored
    sampled: list = []
    assert train_accuracy(_Cache(_Split(x, label, sampled)), First()) == pytest.approx(1500 / 2000)
    assert sampled == []  # 2,500 rows: all of them
    got = train_accuracy(_Cache(_Split(x, label, sampled)), First(), rows=1000)
    assert sampled == [0.4]  # about 1,000 of the 2,500, seeded: near 0.75
    assert got == pytest.approx(0.75, abs=0.05)
    assert train_accuracy(_Cache(_Split(x, np.full(2500, -1))), First()) is None
