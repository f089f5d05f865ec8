"""The run's verdict: did the student beat the same student trained from labels alone (its baseline)
by more than the noise, and if not, what to try. Pure arithmetic on the run's own figures. No Ray.

A run has one seed, so the noise comes from the test set itself: the paired standard error of the
accuracy difference from the rows the two models disagree on (McNemar), ``paired_se``. The student
beats its baseline when ``difference > NOISE_FACTOR * se``; it loses when ``difference < -NOISE_FACTOR
* se``; anything between is a tie. ``NOISE_FACTOR * se`` is what the lines call "the noise".

When it does not beat the baseline, each rule below that the figures trigger adds one ``try:`` line
naming the config keys to change, with the figures that triggered it:

* nothing to distil: the best teacher is less than ``TEACHER_MARGIN`` (2 points) or less than the noise
  above the baseline;
* teachers that know nothing the labels do not say: every train row is labeled (no unlabeled rows
  beyond a transfer set) and every teacher is a recipe trained on those rows;
* a student too small to follow: its accuracy on its own training rows (at its reported weights,
  ``scoring.train_accuracy``) is more than ``FIT_GAP`` (5 points) below the best teacher's test accuracy;
* none of these: a search over the distillation settings.

Classification only: the noise here pairs per-row right and wrong; a perplexity's would pair per-row
log-likelihoods, which is not done, so ``run_experiment`` gives a language model no verdict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

NOISE_FACTOR = 2.0  # "more than the noise" = more than 2 standard errors of the paired difference
TEACHER_MARGIN = 0.02  # a best teacher less than 2 points above the baseline leaves nothing to distil
FIT_GAP = 0.05  # training accuracy more than 5 points under the best teacher: the student cannot follow


@dataclass(frozen=True)
class Verdict:
    """``outcome``: gain, tie or loss; ``lines``: what the run prints last and the report repeats.
    Accuracies are fractions; ``difference`` = student - baseline; ``noise`` = NOISE_FACTOR * ``se``."""

    outcome: str
    lines: tuple[str, ...]
    student: float
    baseline: float
    difference: float
    se: float
    noise: float
    noise_kind: str  # "paired" (McNemar, from the disagreements) or "unpaired" (from the two accuracies)
    num_test: int
    student_only: int | None = None  # test rows only the student gets right (None: unpaired noise)
    baseline_only: int | None = None  # test rows only the baseline gets right
    best_teacher: str | None = None
    best_teacher_accuracy: float | None = None
    gap_recovered: float | None = None
    student_train_accuracy: float | None = None
    rules: tuple[str, ...] = ()  # which rules fired: no_gap, labels_only, too_small, search

    def to_dict(self) -> dict:
        """For metrics.json: plain numbers, lines as a list."""
        out = asdict(self)
        out.update(lines=list(self.lines), rules=list(self.rules), noise_factor=NOISE_FACTOR)
        return out


def paired_se(student_only: int, baseline_only: int, n: int) -> float:
    """Standard error of the accuracy difference of two models scored on the same ``n`` rows:
    ``sqrt(b + c - (b - c)^2 / n) / n`` with b = rows only the student gets right and c = rows only
    the baseline does (the rows both get right or both wrong carry no difference)."""
    if n <= 0:
        raise ValueError(f"no test rows to compare on (n={n})")
    b, c = student_only, baseline_only
    return math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n


def unpaired_se(student: float, baseline: float, n: int) -> float:
    """The fallback without per-row counts: ``sqrt(p_s(1-p_s)/n + p_b(1-p_b)/n)``. It ignores that the
    two models err on many of the same rows, so it overstates the noise."""
    if n <= 0:
        raise ValueError(f"no test rows to compare on (n={n})")
    return math.sqrt(student * (1 - student) / n + baseline * (1 - baseline) / n)


def _points(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def classification_verdict(*, student: float, baseline: float, teachers: Mapping[str, float | None],
                           num_test: int, student_only: int | None = None, baseline_only: int | None = None,
                           train_rows: int | None = None, labeled_rows: int | None = None, transfer_rows: int = 0,
                           teachers_are_recipes: bool = False,
                           student_train_accuracy: float | None = None) -> Verdict:
    """The verdict from a classification run's test accuracies (fractions) on ``num_test`` rows.

    ``student_only`` / ``baseline_only``: test rows only the student / only the baseline gets right
    (the paired noise); without them the unpaired fallback. ``train_rows`` / ``labeled_rows``: train rows
    in all and labeled; ``transfer_rows``: how many of the unlabeled ones a transfer set made (data.transfer);
    ``teachers_are_recipes``: every teacher was trained by the project on the labeled train rows;
    ``student_train_accuracy``: the student's accuracy on its labeled training rows at its reported epoch.
    """
    paired = student_only is not None and baseline_only is not None
    se = paired_se(student_only, baseline_only, num_test) if paired else unpaired_se(student, baseline, num_test)
    noise = NOISE_FACTOR * se
    difference = student - baseline
    outcome = "gain" if difference > noise else "loss" if difference < -noise else "tie"
    scored = {name: acc for name, acc in teachers.items() if acc is not None}
    best_name = max(scored, key=scored.get) if scored else None
    best = scored[best_name] if best_name else None
    gap = difference / (best - baseline) if best is not None and best > baseline else None
    how = (f"{NOISE_FACTOR:g} standard errors of the {'paired' if paired else 'unpaired'} difference "
           f"on {num_test:,} test rows")

    if outcome == "gain":
        share = f"{gap:.1%} of the gap to the best teacher ({best_name}, {best:.4f})" if gap is not None else \
            "no teacher is above the baseline"
        lines = (f"verdict: the student beats its baseline by {_points(difference)} points "
                 f"(noise ±{_points(noise)} points: {how}): distillation paid; {share}",)
        return Verdict(outcome, lines, student, baseline, difference, se, noise, "paired" if paired else "unpaired",
                       num_test, student_only, baseline_only, best_name, best, gap, student_train_accuracy)

    if outcome == "loss":
        head = (f"verdict: distillation did not pay: the student ({student:.4f}) is {_points(-difference)} points "
                f"below its baseline trained from labels alone ({baseline:.4f}), more than the noise "
                f"(±{_points(noise)} points: {how})")
    else:
        head = (f"verdict: no clear gain: the student ({student:.4f}) does not beat its baseline trained "
                f"from labels alone ({baseline:.4f}) by more than the noise: {difference * 100:+.1f} points, "
                f"noise ±{_points(noise)} points ({how})")
    lines, rules = [head], []
    if best is not None and best - baseline < max(TEACHER_MARGIN, noise):
        rules.append("no_gap")
        where = f"{_points(baseline - best)} points below" if best < baseline else \
            f"only {_points(best - baseline)} points above"
        lines.append(f"try: stronger teachers or more teacher training (teachers[].recipe, teachers[].options: "
                     f"wider, more epochs): the best teacher ({best_name}, {best:.4f}) is {where} the baseline "
                     f"({baseline:.4f}); it takes more than {_points(max(TEACHER_MARGIN, noise))} points above it "
                     f"(the larger of {_points(TEACHER_MARGIN)} points and the noise) to have something to distil: "
                     "the teachers are not better than labels alone")
    # Unlabeled train rows beyond a transfer set's (whether data.transfer's rows count in train_rows or not).
    unlabeled = train_rows - labeled_rows - transfer_rows if train_rows is not None and labeled_rows is not None \
        else None
    if teachers_are_recipes and unlabeled is not None and unlabeled <= 0:
        rules.append("labels_only")
        if transfer_rows > 0:
            lines.append(f"try: a larger transfer set (raise data.transfer_size, now {transfer_rows:,} rows): the "
                         f"teachers are recipes trained on the {labeled_rows:,} labeled train rows and there are no "
                         "other unlabeled rows, so what they add beyond the labels comes from the transfer rows alone")
        else:
            lines.append(f"try: add unlabeled rows (data.unlabeled_path) or a transfer set (data.transfer: mixup, or "
                         "augment for text): "
                         f"all {train_rows:,} train rows are labeled and the teachers are recipes trained on them, "
                         "so the teachers know nothing about these rows that the labels do not say")
    if student_train_accuracy is not None and best is not None and best - student_train_accuracy > FIT_GAP:
        rules.append("too_small")
        lines.append(f"try: a wider student (student.options): its accuracy on its own training rows is "
                     f"{student_train_accuracy:.4f}, {_points(best - student_train_accuracy)} points under the best "
                     f"teacher's {best:.4f} on test (more than {_points(FIT_GAP)} points): the student may be too "
                     "small to follow them")
    if not rules:
        rules.append("search")
        lines.append("try: a search over the distillation settings (loss.temperature, loss.alpha, train.lr): "
                     "distill-ray run CONFIG --search N; nothing in this run's figures points at the data, the "
                     "teachers or the student's size")
    return Verdict(outcome, tuple(lines), student, baseline, difference, se, noise,
                   "paired" if paired else "unpaired", num_test, student_only, baseline_only, best_name, best, gap,
                   student_train_accuracy, tuple(rules))
