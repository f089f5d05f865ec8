"""What `distill-ray tune` prints: a line per trial result and per failed trial, then the trial table;
Ray Tune's own status tables go to SWEEP_DIR/tune.log (to the terminal only with -v). No Ray started."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from distill_ray.config import load_config
from distill_ray.tune.space import load_space
from distill_ray.tune.summary import trials_text
from distill_ray.tune.terminal import trial_lines, tune_output

REPO = Path(__file__).resolve().parents[1]


def test_a_line_per_epoch_result_and_per_failure_while_tunes_tables_go_to_the_log(tmp_path, capsys):
    cfg = load_config(REPO / "jobs/configs/tiny.yaml")
    space = load_space(REPO / "tune_spaces/kd_basic.yaml", cfg)
    lines = trial_lines(cfg, space)
    error = tmp_path / "error.txt"
    error.write_text("Traceback (most recent call last):\n  ...\nTrialStalled: no training progress for 21 s\n")
    trial = SimpleNamespace(trial_id="f091f_00001", config={"loss.temperature": 1.1671, "loss.alpha": 0.626,
                                                            "loss.kind": "js"}, error_file=str(error), path="x")
    with tune_output(tmp_path / "tune.log"):
        print("╭──── Trial status: 2 RUNNING ────╮")  # what Tune's reporter prints
        logging.getLogger("ray.tune").error("Trial task failed for trial f091f_00001\nTraceback ...")
        lines.on_trial_result(0, [], trial, {"kind": "step", "step": 5, "val_accuracy": 0.1})  # a checkpoint report
        lines.on_trial_result(0, [], trial, {"kind": "epoch", "epoch": 1, "val_accuracy": 0.6733})
        lines.on_trial_error(0, [], trial)
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "tune: trial f091f_00001 epoch 1/2 val_accuracy 0.6733  loss.temperature=1.167 loss.alpha=0.626 loss.kind=js",
        "tune: trial f091f_00001 failed (loss.temperature=1.167 loss.alpha=0.626 loss.kind=js): "
        "TrialStalled: no training progress for 21 s"]
    assert "Trial task failed" not in out.err
    log = (tmp_path / "tune.log").read_text()
    assert "Trial status: 2 RUNNING" in log and "Trial task failed" in log


def test_the_final_table_is_aligned_best_first():
    cfg = load_config(REPO / "jobs/configs/tiny.yaml")
    space = load_space(REPO / "tune_spaces/kd_basic.yaml", cfg)
    rows = [{"trial_id": "a_00001", "params": {"loss.temperature": 1.5, "loss.alpha": 0.5, "loss.kind": "js"},
             "metric": 0.71, "epochs": 2, "status": "done"},
            {"trial_id": "a_00000", "params": {"loss.temperature": 7.25, "loss.alpha": 0.1, "loss.kind": "skew_kl"},
             "metric": None, "epochs": None, "status": "error"}]
    text = trials_text(cfg, space, rows).splitlines()
    assert text[0].split() == ["rank", "trial", "loss.temperature", "loss.alpha", "loss.kind", "val_accuracy",
                               "epochs", "status"]
    assert text[1].split() == ["1", "a_00001", "1.5", "0.5", "js", "0.71", "2", "done"]
    assert text[2].split() == ["2", "a_00000", "7.25", "0.1", "skew_kl", "-", "-", "error"]
    assert text[1].index("0.71") == text[2].index("-  ") == text[0].index("val_accuracy")  # columns line up
