"""The main job end to end on a small real subset: run directory per the outputs contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill_ray.config import apply_overrides, config_from_dict
from distill_ray.models import build_model, forward_logits, load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
def test_run_writes_metrics_student_and_card(ray_local, small_fashion_mnist, tiny_prepared, tmp_path):
    """`distill-ray run` as a user types it (joining this session's Ray): a quiet terminal, the run
    directory per the outputs contract, and the verdict as the run's last lines. The baseline trains 3x
    the student's epochs (train.baseline_epochs=6): a student that loses to its baseline, without a
    second run (measured: 9 and 12 points below it in two runs, against a noise of ±5.7 and ±5.5 points).

    The run finds the session's recipe teachers and soft-target cache (``tiny_prepared``: the same
    config's, built by the same ``prepare_teachers`` / ``build_cache``) and reuses them after checking
    them, as a second `distill-ray run` of a config does; training them is tested there and in
    tests/test_engine.py. This saves the subprocess two teacher trainings and a cache build."""
    import subprocess
    import sys

    from distill_ray.config import dump_config

    tiny_prepared(tmp_path)
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    cfg = config_from_dict(apply_overrides(raw, [
        ("run_dir", str(tmp_path / "runs")), ("cache.dir", str(tmp_path / "cache")),
        ("teachers.0.path", str(tmp_path / "teachers/mlp_a")), ("teachers.1.path", str(tmp_path / "teachers/cnn_b")),
        ("train.baseline", True), ("train.baseline_epochs", 6)]))
    (tmp_path / "run.yaml").write_text(dump_config(cfg))
    address = ray_local.get_runtime_context().gcs_address
    done = subprocess.run([sys.executable, "-m", "distill_ray", "run", str(tmp_path / "run.yaml"), "--address", address],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = (done.stdout + done.stderr).splitlines()
    # One line per phase and the final table; Ray's own chatter is in the run's logs, not here.
    assert len(terminal) <= 40, "\n".join(terminal)
    assert not [line for line in terminal if "PlacementGroupCleaner" in line or "RayTrainWorker" in line
                or "pid=" in line or "(raylet)" in line or " INFO " in line], "\n".join(terminal)
    assert any(line.startswith("student: done in") for line in terminal)
    assert any(line.startswith("model") and "test acc" in line for line in terminal)  # the final table
    assert any(line.startswith("baseline ") for line in terminal)
    run_dir = cfg.run_path()
    assert (run_dir / "logs" / "driver.log").is_file()
    kept = [p for p in (run_dir / "ray_results" / "student").glob("checkpoint_*") if p.is_dir()]
    assert len(kept) == 2  # CheckpointConfig(num_to_keep=2) of a run that was never restarted
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    for key in ("student", "teachers", "baseline", "teacher_weights", "params", "timings"):
        assert key in on_disk, key
    assert set(on_disk["teachers"]) == {"mlp_a", "cnn_b"}
    assert abs(sum(on_disk["teacher_weights"].values()) - 1) < 1e-5
    assert 0.5 < on_disk["student"] <= 1 and 0.5 < on_disk["baseline"] <= 1
    assert on_disk["params"]["student"] < min(on_disk["params"]["teachers"].values())
    # The exported student reloads without pickle and reproduces the reported test accuracy.
    student, spec = load_model(run_dir / "student")
    d = small_fashion_mnist
    with torch.no_grad():
        predicted = forward_logits(student, torch.as_tensor(d.test.inputs)).argmax(-1).numpy()
    assert np.mean(predicted == d.test.labels) == pytest.approx(on_disk["student"], abs=1e-6)
    card = json.loads((run_dir / "student" / "distill_card.json").read_text())
    assert card["teachers"] == ["mlp_a", "cnn_b"] and card["teacher_weights"] == on_disk["teacher_weights"]
    # Its lineage, what the model registry records: the teachers' weights by the cache's own fingerprint,
    # the data's files, and the validation split's class counts.
    from distill_ray.data.sources import data_files_fingerprint
    from distill_ray.models import fingerprint

    lineage = json.loads((run_dir / "lineage.json").read_text())
    for name in ("mlp_a", "cnn_b"):
        assert lineage["teacher_fingerprints"][name] == fingerprint(load_model(tmp_path / "teachers" / name)[0])
    assert lineage["data_fingerprint"] == data_files_fingerprint(cfg)
    assert sum(lineage["val_class_counts"]) == on_disk["data"]["labeled"]["val"]
    assert len(lineage["val_class_counts"]) == 10 and lineage["class_names"] == list(small_fashion_mnist.class_names)
    # `distill-ray eval` scores the run's student on the same split to the same number.
    from distill_ray.cli import main

    config_path = tmp_path / "config.yaml"
    config_path.write_text((run_dir / "config.yaml").read_text())
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(run_dir), "--data", str(config_path)]) == 0
    assert json.loads(out.getvalue())["accuracy"] == pytest.approx(on_disk["student"], abs=1e-6)
    # The report: four real PNGs and a report.md naming every model.
    for png in ("val_accuracy.png", "teacher_weights.png", "schedule.png", "reliability.png"):
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, png
    report = (run_dir / "report.md").read_text()
    assert all(name in report for name in ("mlp_a", "cnn_b", "blend", "baseline", "student"))
    # The student beats its own untrained initialisation by a wide margin.
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.student.arch, d.input_shape, d.num_classes, cfg.student.options)
    with torch.no_grad():
        untrained_acc = np.mean(forward_logits(untrained, torch.as_tensor(d.test.inputs)).argmax(-1).numpy()
                                == d.test.labels)
    assert on_disk["student"] > untrained_acc + 0.3
    # The verdict: the run's last lines, in metrics.json and in report.md.
    from distill_ray.evaluation.verdict import paired_se

    verdict, out = on_disk["verdict"], done.stdout.splitlines()
    assert out[-len(verdict["lines"]):] == verdict["lines"]
    assert out[-len(verdict["lines"]) - 2].startswith("report: ")
    assert "## Verdict\n\n" + "\n".join(f"- {line}" for line in verdict["lines"]) in report
    assert verdict["outcome"] == "loss" and verdict["lines"][0].startswith(
        "verdict: distillation did not pay: the student (0.")
    # Its noise, from the test rows only one of the two gets right: recounted from the exported student
    # and the baseline's reported (best-epoch) weights.
    ckpt = max((p for p in (run_dir / "ray_results" / "baseline").glob("checkpoint_*") if p.is_dir()),
               key=lambda p: p.stat().st_mtime)
    base = build_model(cfg.student.arch, d.input_shape, d.num_classes, cfg.student.options)
    base.load_state_dict(torch.load(ckpt / "train_state.pt", weights_only=True)["best_student"])
    with torch.no_grad():
        base_predicted = forward_logits(base.eval(), torch.as_tensor(d.test.inputs)).argmax(-1).numpy()
    right_s, right_b = predicted == d.test.labels, base_predicted == d.test.labels
    b, c = int((right_s & ~right_b).sum()), int((right_b & ~right_s).sum())
    assert (verdict["student_only"], verdict["baseline_only"], verdict["num_test"]) == (b, c, 300)
    assert verdict["difference"] == pytest.approx(on_disk["student"] - on_disk["baseline"])
    assert verdict["difference"] == pytest.approx((b - c) / 300)
    assert verdict["noise"] == pytest.approx(2 * paired_se(b, c, 300)) and verdict["difference"] < -verdict["noise"]
    # The rules, on this run's own figures: every train row labeled and both teachers recipes ...
    assert "labels_only" in verdict["rules"] and (
        "try: add unlabeled rows (data.unlabeled_path) or a transfer set (data.transfer: mixup, or augment for text): all 1,200 train rows "
        "are labeled and the teachers are recipes trained on them, so the teachers know nothing about these rows "
        "that the labels do not say") in verdict["lines"]
    # ... the exported student's accuracy on the train rows (all 1,200: under the sampling bound) against
    # the best teacher ...
    with torch.no_grad():
        fit = np.mean(forward_logits(student, torch.as_tensor(d.train.inputs)).argmax(-1).numpy() == d.train.labels)
    assert verdict["student_train_accuracy"] == pytest.approx(fit, abs=1e-9)
    best = max(on_disk["teachers"].values())
    assert ("too_small" in verdict["rules"]) == (best - fit > 0.05)
    # ... and the best teacher against the baseline.
    assert ("no_gap" in verdict["rules"]) == (best - on_disk["baseline"] < max(0.02, verdict["noise"]))
