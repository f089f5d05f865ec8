"""The run report (plots + report.md) and the reliability-diagram numbers, on synthetic inputs. No Ray."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from distill_ray.evaluation.metrics import expected_calibration_error, reliability_bins
from distill_ray.evaluation.report import PLOTS, gap_recovered, stage_boundaries, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_reliability_bins_match_a_hand_computed_case():
    # 4 bins of width 0.25. Max probabilities 0.9, 0.8, 0.6, 0.55, 0.35; the first, third and fifth are right.
    probs = np.array([[0.9, 0.1, 0.0],
                      [0.2, 0.8, 0.0],
                      [0.6, 0.4, 0.0],
                      [0.0, 0.45, 0.55],
                      [0.33, 0.35, 0.32]])
    labels = np.array([0, 0, 0, 1, 1])
    bins = reliability_bins(probs, labels, n_bins=4)
    np.testing.assert_allclose(bins["edges"], [0, 0.25, 0.5, 0.75, 1.0])
    # bin (0.25, 0.5]: {0.35 right}; (0.5, 0.75]: {0.6 right, 0.55 wrong}; (0.75, 1]: {0.9 right, 0.8 wrong}
    assert bins["count"].tolist() == [0, 1, 2, 2]
    assert np.isnan(bins["confidence"][0]) and np.isnan(bins["accuracy"][0])
    np.testing.assert_allclose(bins["confidence"][1:], [0.35, 0.575, 0.85])
    np.testing.assert_allclose(bins["accuracy"][1:], [1.0, 0.5, 0.5])
    # ECE = 1/5 * |1 - 0.35| + 2/5 * |0.5 - 0.575| + 2/5 * |0.5 - 0.85| = 0.13 + 0.03 + 0.14 = 0.30
    assert bins["ece"] == pytest.approx(0.30)
    assert bins["ece"] == pytest.approx(expected_calibration_error(torch.as_tensor(probs), labels, num_bins=4))


def test_reliability_bins_agree_with_ece_and_put_confidence_one_in_the_last_bin():
    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.as_tensor(rng.normal(size=(500, 10)) * 3), -1).numpy()
    labels = rng.integers(0, 10, 500)
    bins = reliability_bins(probs, labels)
    assert bins["count"].sum() == 500 and len(bins["count"]) == 15
    assert bins["ece"] == pytest.approx(expected_calibration_error(torch.as_tensor(probs), labels))
    one_hot = reliability_bins(np.eye(3), np.array([0, 1, 2]), n_bins=5)
    assert one_hot["count"].tolist() == [0, 0, 0, 0, 3] and one_hot["ece"] == 0.0


def _synthetic_run(steps_per_epoch: int = 10, epochs: int = 4):
    history, baseline = [], []
    step = 0
    for epoch in range(epochs):
        stage = min(epoch, 2)
        for _ in range(steps_per_epoch):
            step += 1
            w = min(0.9, 0.34 + 0.02 * step)
            history.append({"step": step, "epoch": epoch, "stage": stage, "open_fraction": [0.5, 0.75, 1.0][stage],
                            "temperature": [1.0, 1.5, 2.0][stage], "alpha": 0.7, "loss": 1.0 / step,
                            "kd_loss": 0.5, "task_loss": 0.5, "samples_per_s": 1000.0, "blend_loss": 0.3,
                            "teacher_weight/cnn": w, "teacher_weight/mlp": (1 - w) * 0.7,
                            "teacher_weight/vit": (1 - w) * 0.3})
            baseline.append({"step": step, "epoch": epoch, "stage": stage, "open_fraction": 1.0,
                             "temperature": 2.0, "alpha": 0.0, "loss": 1.0 / step})
        history.append({"step": step, "epoch": epoch, "stage": stage, "kind": "epoch",
                        "val_accuracy": 0.7 + 0.04 * epoch, "val_loss": 0.5, "val_ece": 0.02})
        baseline.append({"step": step, "epoch": epoch, "stage": stage, "kind": "epoch",
                         "val_accuracy": 0.68 + 0.03 * epoch, "val_loss": 0.6, "val_ece": 0.03})
    return history, baseline


def test_write_report_creates_plots_and_markdown(tmp_path):
    history, baseline_history = _synthetic_run()
    teachers = {"cnn": 0.90, "mlp": 0.88, "vit": 0.83}
    metrics = {"student": 0.87, "baseline": 0.85, "blend": 0.905, "teachers": teachers,
               "teacher_weights": {"cnn": 0.9, "mlp": 0.07, "vit": 0.03},
               "params": {"student": 38_170, "teachers": {"cnn": 824_650, "mlp": 1_863_690, "vit": 407_690}},
               "timings": {"data": 0.5, "teachers": 12.0, "cache": 2.0, "train_student": 20.0, "train_baseline": 18.0},
               "metric": "accuracy", "split": "test", "num_test": 200}
    rows = {name: {"accuracy": acc, "ece": 0.01, "params": metrics["params"]["teachers"][name], "latency_ms": 0.5}
            for name, acc in teachers.items()}
    rows["blend"] = {"accuracy": 0.905, "ece": 0.011}
    rows["baseline"] = {"accuracy": 0.85, "ece": 0.02, "params": 38_170, "latency_ms": 0.02}
    rows["student"] = {"accuracy": 0.87, "ece": 0.03, "params": 38_170, "latency_ms": 0.021}
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 200)
    reliability = {name: (torch.softmax(torch.as_tensor(rng.normal(size=(200, 10)) * s), -1).numpy(), labels)
                   for name, s in (("student", 2.0), ("baseline", 1.5), ("cnn", 4.0), ("mlp", 3.0), ("vit", 2.5))}

    path = write_report(tmp_path, metrics, history, baseline_history, rows, reliability, config_name="synthetic")

    assert path == tmp_path / "report.md"
    for name in PLOTS:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 10_000, f"{name} is suspiciously small ({len(data)} bytes)"
    text = path.read_text()
    assert "synthetic" in text
    for line in ("| cnn | 0.9000 | 0.0100 | 824,650 | 0.500 | 0.900 |",
                 "| vit | 0.8300 | 0.0100 | 407,690 | 0.500 | 0.030 |",
                 "| blend | 0.9050 | 0.0110 | - | - |  |",
                 "| baseline | 0.8500 | 0.0200 | 38,170 | 0.020 |  |",
                 "| student | 0.8700 | 0.0300 | 38,170 | 0.021 |  |"):
        assert line in text, line
    # (0.87 - 0.85) / (0.90 - 0.85) = 40%
    assert "**40.0%**" in text and "best teacher: cnn" in text
    for name in PLOTS:
        assert f"]({name})" in text
    assert "| train_student | 20.00 |" in text and "| total | 52.50 |" in text


def test_report_without_baseline_or_weights_still_writes_everything(tmp_path):
    history, _ = _synthetic_run(epochs=2)
    history = [{k: v for k, v in r.items() if not k.startswith("teacher_weight/")} for r in history]
    metrics = {"student": 0.8, "baseline": None, "teachers": {"t": 0.9}, "teacher_weights": {"t": 1.0}}
    rows = {"t": {"accuracy": 0.9, "ece": 0.01}, "student": {"accuracy": 0.8, "ece": 0.02}}
    labels = np.arange(20) % 10
    write_report(tmp_path, metrics, history, None, rows, {"student": (np.full((20, 10), 0.1), labels)})
    assert all((tmp_path / name).read_bytes()[:8] == PNG_MAGIC for name in PLOTS)
    assert "Gap recovered: n/a" in (tmp_path / "report.md").read_text()


def test_gap_and_stage_boundaries():
    assert gap_recovered(0.87, 0.85, 0.90) == pytest.approx(0.4)
    assert gap_recovered(0.87, None, 0.90) is None and gap_recovered(0.87, 0.9, 0.9) is None
    # Perplexity: lower is better. 683 from a baseline of 819 toward a teacher at 24 closes 17%.
    assert gap_recovered(683.0, 819.0, 24.0, lower_is_better=True) == pytest.approx(136 / 795)
    assert gap_recovered(1064.0, 1022.0, 1395.0, lower_is_better=True) is None  # teacher worse than baseline
    history, _ = _synthetic_run(steps_per_epoch=10, epochs=4)
    assert stage_boundaries(history) == [11, 21]  # stages 0 -> 1 at epoch 1, 1 -> 2 at epoch 2, then stays


def test_report_says_at_which_epoch_student_and_baseline_are_reported():
    from distill_ray.evaluation.report import report_markdown

    metrics = {"student": 0.87, "baseline": 0.84, "teachers": {"t": 0.88}, "teacher_weights": {"t": 1.0},
               "best_epoch": {"student": 33, "baseline": 98}, "epochs": {"student": 40, "baseline": 443}}
    rows = {"t": {"accuracy": 0.88}, "baseline": {"accuracy": 0.84}, "student": {"accuracy": 0.87}}
    text = report_markdown(metrics, rows)
    assert "student at its best validation epoch, 34 of 40; baseline at its best validation epoch, 99 of 443" in text
    assert "= **75.0%**" in text


def test_report_gives_a_cut_students_layers_and_size_against_its_teacher():
    from distill_ray.evaluation.report import report_markdown

    metrics = {"student": 40.0, "baseline": None, "teachers": {"smollm2": 24.0}, "teacher_weights": {"smollm2": 1.0},
               "metric": "perplexity", "student_init": {"teacher": "smollm2", "layers": [0, 3, 29], "teacher_layers": 30,
                                                        "params": 50_000_000, "teacher_params": 134_515_008}}
    text = report_markdown(metrics, {"smollm2": {"perplexity": 24.0}, "student": {"perplexity": 40.0}}, plots=False)
    assert "Student cut from smollm2: layers [0, 3, 29] of its 30, 50,000,000 of its 134,515,008 params (0.372×)" in text
    assert "Student cut from" not in report_markdown({**metrics, "student_init": None},
                                                    {"student": {"perplexity": 40.0}}, plots=False)


def test_report_names_every_feature_column_and_every_column_left_out():
    from distill_ray.evaluation.report import report_markdown

    data = {"format": "parquet", "kind": "tabular", "source": "/d/t.parquet",
            "rows": {"train": 1200, "val": 150, "test": 300}, "labeled": {"train": 1200, "val": 150, "test": 300},
            "feature_fields": [f"f{i}" for i in range(36) if i != 3],
            "left_out": {"f3": "not in data.feature_fields", "label": "label column"}}
    metrics = {"student": 0.8, "baseline": None, "teachers": {"t": 0.9}, "teacher_weights": {"t": 1.0}, "data": data}
    text = report_markdown(metrics, {"t": {"accuracy": 0.9}, "student": {"accuracy": 0.8}}, plots=False)
    assert "## Data\n\nparquet (tabular) from `/d/t.parquet`: 1,200 train / 150 val / 300 test rows, " \
           "1,200 train rows labeled.\n" in text
    assert "Feature columns (35): `f0`, `f1`, `f2`, `f4`, " in text and "`f34`, `f35`.\n" in text  # all, in full
    assert "| column left out | why |\n|---|---|\n| `f3` | not in data.feature_fields |\n| `label` | label column |" in text
    assert "## Data" not in report_markdown({**metrics, "data": {}}, {"student": {"accuracy": 0.8}}, plots=False)


def test_a_teacher_on_its_own_tokenizer_is_reported_apart_and_left_out_of_the_gap(capsys):
    """Its perplexity is per token of another tokenizer: the table leaves the cell empty, a note gives it,
    and the gap is measured to the best teacher scored on the student's tokens."""
    from distill_ray.evaluation.report import report_markdown
    from distill_ray.evaluation.scoring import print_summary

    metrics = {"student": 30.0, "baseline": 40.0, "teachers": {"smol": 20.0, "wp": None}, "metric": "perplexity",
               "teacher_weights": {"smol": 0.7, "wp": 0.3}, "params": {"student": 10, "teachers": {"smol": 200, "wp": 50}}}
    wp = {"own_perplexity": 12.5, "own_accuracy": 0.25, "own_tokenizer": "minilm", "params": 50, "rouge_l": 0.1}
    rows = {"smol": {"perplexity": 20.0, "accuracy": 0.5, "params": 200, "rouge_l": 0.3}, "wp": wp,
            "baseline": {"perplexity": 40.0, "accuracy": 0.3}, "student": {"perplexity": 30.0, "accuracy": 0.4}}
    text = report_markdown(metrics, rows, plots=False)
    assert "| wp | - | - | 50 |" in text and "(best teacher: smol)" in text and "= **50.0%**" in text
    assert "wp reads its own tokenizer (minilm): perplexity 12.5000, next-token accuracy 0.2500" in text
    print_summary(rows, ("smol", "wp"), metrics["teacher_weights"], "perplexity", 0.5)
    out = capsys.readouterr().out
    assert "wp: perplexity 12.5000, tok acc 0.2500 per token of its own tokenizer (minilm)" in out
    assert "gap recovered (student - baseline) / (best teacher - baseline): 50.0%" in out


def test_without_matplotlib_the_report_keeps_its_numbers_and_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plots extra were not installed
    history, _ = _synthetic_run(epochs=2)
    metrics = {"student": 0.8, "baseline": 0.7, "teachers": {"t": 0.9}, "teacher_weights": {"t": 1.0}}
    rows = {"t": {"accuracy": 0.9, "ece": 0.01}, "student": {"accuracy": 0.8, "ece": 0.02}}
    path = write_report(tmp_path, metrics, history, None, rows, {"student": (np.full((20, 10), 0.1), np.arange(20) % 10)})
    text = path.read_text()
    assert "| student | 0.8000 | 0.0200 |" in text and "**50.0%**" in text
    assert "pip install 'distill-ray[plots]'" in text and not any((tmp_path / name).exists() for name in PLOTS)
    assert "distill-ray[plots]" in capsys.readouterr().out
