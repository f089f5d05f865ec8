"""The ablation table on the tiny config: real teachers, real cache, Ray Train runs per row and seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml

from distill_ray.config import apply_overrides, config_from_dict

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[1]
# One row x two seeds keeps this test short (each Ray Train run costs ~10 s before its first step):
# every row's setup (slicing, extending, config) is checked without training in
# test_row_setups_pick_and_extend_the_cached_teachers, and the scratch row's config is the baseline
# that tests/test_run_e2e.py trains.
ROWS = ("learned+broken_teacher",)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, tiny_prepared):
    root = tiny_prepared(tmp_path_factory.mktemp("ablation"))  # the session's teachers and cache, reused here
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    return config_from_dict(apply_overrides(raw, [
        ("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache")),
        ("teachers.0.path", str(root / "teachers/mlp_a")), ("teachers.1.path", str(root / "teachers/cnn_b"))]))


def test_row_setups_pick_and_extend_the_cached_teachers(ray_local, tiny_cfg):
    from distill_ray.evaluation.classifier_ablation import BROKEN, ROWS as ALL_ROWS, prepare, row_setup
    from distill_ray.pipeline import training_inputs
    from distill_ray.kd.objectives import teacher_signal

    prep = prepare(tiny_cfg)
    assert prep.best_teacher in tiny_cfg.teacher_names() and set(prep.teacher_val) == set(tiny_cfg.teacher_names())
    assert all(0.5 < a <= 1 for a in prep.teacher_test.values())
    from distill_ray.kd.objectives import planned_steps

    rows = prep.info.counts["train"]
    steps = planned_steps(row_setup("learned", prep, seed=7)[0], rows, 1)
    for row in ALL_ROWS:
        cfg, stage, use_teachers, labeled_only = row_setup(row, prep, seed=7)
        wide = row.endswith("+wide")
        assert cfg.train.seed == 7 and cfg.data == tiny_cfg.data
        assert cfg.student.options["hidden"] == [2 * h for h in tiny_cfg.student.options["hidden"]] if wide else \
            cfg.student == tiny_cfg.student
        assert use_teachers == (not row.startswith("scratch")) and (stage is not None) == (row == "learned+broken_teacher")
        assert labeled_only == (row in ("scratch", "scratch+wide", "kd_labeled_only"))
        # Every row gets (at least, by less than one epoch) the optimizer steps of the learned row:
        # a curriculum that holds data back trains more epochs.
        mine = planned_steps(cfg, rows, 1)
        assert steps <= mine < steps + rows // cfg.train.batch_size + 1, row
        expected = {"learned+multi_stage": "multi_stage", "learned+linear_ramp": "linear_ramp",
                    "learned+confidence": "confidence"}.get(row, "none")
        assert cfg.curriculum.scheduler == expected, row
        if expected != "multi_stage":  # no stages: a constant temperature, not stage 0's
            assert cfg.curriculum.temperature_schedule != "stage", row

    def targets(cfg, stage):
        inputs = training_inputs(cfg, prep.cache, prep.info, stage=stage)
        batch = inputs.train.take_batch(2000, batch_format="numpy")
        cols = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
        order = torch.argsort(cols["id"])
        return teacher_signal({k: v[order] for k, v in cols.items()}, cfg.teacher_names(), 10, None, False, "cpu").logits

    full = targets(tiny_cfg, None)
    cfg, stage, *_ = row_setup("kd_best_teacher", prep, seed=0)
    best = tiny_cfg.teacher_names().index(prep.best_teacher)
    assert cfg.teacher_names() == (prep.best_teacher,)
    torch.testing.assert_close(targets(cfg, stage)[0], full[best])
    cfg, stage, *_ = row_setup("learned+broken_teacher", prep, seed=0)
    assert cfg.teacher_names() == (*tiny_cfg.teacher_names(), BROKEN) and cfg.blend.kind == "learned_global"
    extended = targets(cfg, stage)
    torch.testing.assert_close(extended[:2], full)
    noise, real = extended[2], full
    assert abs(noise.std() - real.std()) < 0.15 * real.std()  # same scale as the real logits
    agree = (noise.argmax(-1) == full[best].argmax(-1)).float().mean()
    assert agree < 0.25  # random: agrees with a real teacher about 1 time in 10
    torch.testing.assert_close(targets(cfg, stage)[2], noise)  # seeded per row


def test_tiny_ablation_table(ray_local, tiny_cfg, tmp_path):
    from dataclasses import replace

    from distill_ray.evaluation.ablation import run_ablation
    from distill_ray.evaluation.classifier_ablation import BROKEN

    out = tmp_path / "ablation"
    # One epoch per run (2 runs): the table's shape and numbers are under test, not long training. The
    # learned weights are fit on validation before the first step, so the broken teacher's is unchanged.
    one_epoch = replace(tiny_cfg, train=replace(tiny_cfg.train, epochs=1))
    table = run_ablation(one_epoch, seeds=2, out_dir=out, rows=ROWS, command="pytest tiny ablation")

    assert list(table["rows"]) == list(ROWS)
    for row, entry in table["rows"].items():
        assert entry["n"] == 2 and len(entry["per_seed"]) == 2, row
        assert math.isfinite(entry["mean"]) and math.isfinite(entry["std"]), row
        assert 0.3 < entry["mean"] <= 1.0, f"{row} learned nothing: {entry['mean']}"
    entry = table["rows"]["learned+broken_teacher"]
    assert entry["per_seed"] == {r["seed"]: r["test_accuracy"] for r in table["runs"]}
    assert entry["mean"] == pytest.approx(np.mean(list(entry["per_seed"].values())))
    assert entry["gap_recovered"] is None  # no scratch row to measure the gap from
    assert entry["student_params"] == 784 * 16 + 16 + 16 * 10 + 10  # mlp, hidden [16]
    # The learned blend turns the random-logit teacher down, with the numbers of this very run.
    broken = table["broken_teacher"]
    weights = [r["teacher_weights"][BROKEN] for r in table["runs"] if r["row"] == "learned+broken_teacher"]
    assert len(weights) == 2 and broken["per_seed_weight"] == weights
    assert max(weights) < 0.2, f"broken teacher kept weight {weights}"
    real = table["rows"]["learned+broken_teacher"]["teacher_weights"]
    assert set(real) == {*tiny_cfg.teacher_names(), BROKEN} and abs(sum(real.values()) - 1) < 1e-5
    assert broken["final_weight_max"] == max(weights)

    on_disk = json.loads((out / "ablation.json").read_text())
    assert list(on_disk["rows"]) == list(ROWS) and on_disk["command"] == "pytest tiny ablation"
    assert on_disk["machine"]["cpu_cores"] >= 1 and on_disk["machine"]["ray"]
    text = (out / "ablation.md").read_text()
    for row in ROWS:
        assert f"| {row} |" in text
    assert "Broken teacher" in text and "pytest tiny ablation" in text


# --- causal language models -----------------------------------------------------------------------

# The references' cache and the one with the teachers' responses; POCL's ranking is tested end to end
# in tests/test_pocl.py (here it would add a reference model's training and generation).
LM_ROWS = ("scratch", "token+seq_kd")


def test_tiny_instruct_ablation_table_and_resume(ray_local, tmp_path, capsys):
    """tiny_instruct at a fraction of its rows, two untrained teachers (what they write does not matter
    here), one seed: the scratch row and sequence + token KD train, the table has perplexity
    and ROUGE-L per row and the teachers' and blend's once; a second run into the same directory
    reuses the finished runs instead of training them again."""
    from distill_ray.evaluation.ablation import run_ablation
    from distill_ray.models import causal_lm_model

    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        causal_lm_model(30522, {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 32}).save_pretrained(tmp_path / name)
    raw = yaml.safe_load((REPO / "jobs/configs/tiny_instruct.yaml").read_text())
    teachers = [{"name": n, "source": "hf_dir", "path": str(tmp_path / n), "num_cpus": 0.25} for n in ("a", "b")]
    cfg = config_from_dict(apply_overrides(raw, [
        ("run_dir", str(tmp_path / "runs")), ("cache.dir", str(tmp_path / "cache")), ("teachers", teachers),
        # 32 samples leave 23 reference rows (and 23 responses): one optimizer step per epoch at batch 16,
        # enough for every figure asserted below (60 gave 47 rows and 4-5 steps a row, ~1/3 more time).
        ("data.max_train_samples", 32), ("data.max_eval_samples", 20),
        ("sequence_kd.max_new_tokens", 8), ("curriculum.reference_max_new_tokens", 8), ("train.batch_size", 16)]))
    out = tmp_path / "ablation"
    table = run_ablation(cfg, seeds=1, out_dir=out, rows=LM_ROWS, command="pytest tiny_instruct ablation")

    assert table["task"] == "causal_lm" and list(table["rows"]) == list(LM_ROWS)
    for row, entry in table["rows"].items():
        assert entry["n"] == 1 and entry["perplexity"]["std"] == 0.0, row
        assert 1 < entry["perplexity"]["mean"] < 1e6 and 0 <= entry["rouge_l"]["mean"] <= 1, row
        assert entry["parses"] is None  # WordPiece does not round-trip code's whitespace
    scratch, kd = table["rows"]["scratch"], table["rows"]["token+seq_kd"]
    assert kd["train_rows"] > scratch["train_rows"] == table["counts"]["reference"]  # references + responses
    assert kd["train_rows"] == table["counts"]["reference"] + table["counts"]["teacher"]
    assert scratch["steps"] <= kd["steps"] and scratch["teacher_weights"] == {}
    assert set(kd["teacher_weights"]) == {"a", "b"}
    assert set(table["teachers"]) == {"a", "b"} and all(t["perplexity"] > 1 for t in table["teachers"].values())
    assert table["blend"]["weights_from"] == "token+seq_kd" and 0 <= table["blend"]["rouge_l"] <= 1
    assert table["blend"]["weights"] == pytest.approx(kd["teacher_weights"])
    on_disk = json.loads((out / "ablation.json").read_text())
    assert on_disk["command"] == "pytest tiny_instruct ablation" and on_disk["wall_seconds"] > 0
    text = (out / "ablation.md").read_text()
    assert all(f"| {row} |" in text for row in LM_ROWS) and "| blend (" in text

    capsys.readouterr()
    again = run_ablation(cfg, seeds=1, out_dir=out, rows=LM_ROWS, command="pytest tiny_instruct ablation")
    assert capsys.readouterr().out.count("reused from runs.json") == 2
    assert again["runs"] == table["runs"]
