"""Self-distillation: the KD warm-up, the moving-average (self_ema) teacher and born-again generations.

Pure tests first (schedule, EMA math against a float64 reference, config refusals, the generation loop
with the training stubbed out); one short Ray run at the end: a self_ema run warms up, distils from
its own average and, killed after a checkpoint, resumes the average where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from distill_ray.config import ConfigError, apply_overrides, config_from_dict
from distill_ray.kd.schedules import kd_active
from distill_ray.kd.self_ema import ema_copy, ema_update

REPO = Path(__file__).resolve().parents[1]


def _tiny(*overrides, teachers=None) -> dict:
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    if teachers is not None:
        raw["teachers"] = teachers
    return apply_overrides(raw, list(overrides))


EMA = [{"name": "ema", "source": "self_ema", "ema_decay": 0.9}]
BORN_AGAIN = [{"name": "previous", "source": "previous_generation"}]


# --- the KD warm-up --------------------------------------------------------------------------------

def test_kd_is_off_for_the_warmup_epochs_and_on_after():
    assert [kd_active(e, 2) for e in range(5)] == [False, False, True, True, True]
    with pytest.raises(ValueError, match="kd_warmup_epochs"):
        kd_active(0, -1)


def test_no_warmup_leaves_the_loss_bit_for_bit_as_it_was():
    """With kd_warmup_epochs=0 the loop passes the teachers' signal and alpha on untouched in every
    epoch, so each step's loss is the very same tensor as without the key."""
    from distill_ray.kd.blending import TeacherBlend
    from distill_ray.kd.objectives import DenseLogits, batch_loss

    cfg = config_from_dict(_tiny())
    assert cfg.loss.kd_warmup_epochs == 0
    g = torch.Generator().manual_seed(0)
    logits, teachers = torch.randn(8, 10, generator=g), torch.randn(2, 8, 10, generator=g)
    x, y = torch.randn(8, 4, generator=g), torch.tensor([0, 1, 2, 3, -1, 5, 6, 7])
    blend = TeacherBlend("uniform", 2, num_classes=10)
    before = batch_loss(cfg, blend, logits, DenseLogits(teachers), x, y, temperature=2.0, alpha=0.7, causal=False)
    for epoch in range(10):
        kd_on = kd_active(epoch, cfg.loss.kd_warmup_epochs)
        after = batch_loss(cfg, blend, logits, DenseLogits(teachers) if kd_on else None, x, y, temperature=2.0,
                           alpha=0.7 if kd_on else 0.0, causal=False)
        assert torch.equal(after.total, before.total)


# --- the moving average --------------------------------------------------------------------------

def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_ema_update_equals_a_float64_reference_over_several_steps():
    model, decay = _net(), 0.9
    ema = ema_copy(model)
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    reference = {k: v.double().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        loss = model(torch.randn(16, 4, generator=g)).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(ema, model, decay)
        for k, p in model.named_parameters():
            reference[k] = decay * reference[k] + (1 - decay) * p.detach().double()
    for k, p in ema.named_parameters():
        torch.testing.assert_close(p.double(), reference[k], rtol=0, atol=1e-6)
    assert not torch.allclose(ema[0].weight, model[0].weight, atol=1e-4)  # an average, not a copy
    # Batch-norm statistics are the student's own, copied.
    assert torch.equal(ema[1].running_mean, model[1].running_mean)
    assert int(ema[1].num_batches_tracked) == 5


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_ema_update_refuses_a_decay_outside_zero_one(decay):
    with pytest.raises(ValueError, match="decay"):
        ema_update(ema_copy(_net()), _net(), decay)


def test_the_average_is_checkpointed_with_the_student_and_restored():
    from distill_ray.kd.blending import TeacherBlend
    from distill_ray.train.state import TrainState

    model = _net()
    saved = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), TeacherBlend("uniform", 1, num_classes=3),
                       ema=ema_copy(model))
    with torch.no_grad():
        for p in saved.ema.parameters():
            p.add_(1.0)
    state = saved.state_dict()
    fresh_model = _net()
    fresh = TrainState(fresh_model, torch.optim.SGD(fresh_model.parameters(), lr=0.1),
                       TeacherBlend("uniform", 1, num_classes=3), ema=ema_copy(fresh_model))
    fresh.load_state_dict(state)
    for a, b in zip(fresh.ema.parameters(), saved.ema.parameters()):
        assert torch.equal(a, b)


# --- config --------------------------------------------------------------------------------------

def test_self_distillation_keys_load_with_their_defaults():
    cfg = config_from_dict(_tiny(("curriculum.scheduler", "none"), teachers=[{"name": "ema", "source": "self_ema"}]))
    assert cfg.teachers[0].ema_decay == 0.999 and cfg.train.generations == 1 and cfg.loss.kd_warmup_epochs == 0


@pytest.mark.parametrize("teachers,overrides,key", [
    ([{"name": "ema", "source": "self_ema", "ema_decay": 1.0}], [("curriculum.scheduler", "none")],
     "teachers[0].ema_decay"),
    ([{"name": "ema", "source": "self_ema", "ema_decay": 0.0}], [("curriculum.scheduler", "none")],
     "teachers[0].ema_decay"),
    (EMA + [{"name": "mlp", "source": "recipe", "recipe": "mlp"}], [("curriculum.scheduler", "none")],
     "teachers[0].source"),
    (EMA, [("curriculum.scheduler", "none"), ("train.mode", "online")], "train.mode"),
    (EMA, [("curriculum.scheduler", "none"), ("loss.topk", 3)], "loss.topk"),
    (EMA, [], "curriculum.scheduler"),
    (BORN_AGAIN, [], "train.generations"),
    (None, [("train.generations", 3)], "train.generations"),
    (BORN_AGAIN + BORN_AGAIN[:1], [("train.generations", 2)], "teachers[1]"),
    (None, [("loss.kd_warmup_epochs", 2)], "loss.kd_warmup_epochs"),
])
def test_self_distillation_configs_that_cannot_run_are_refused_by_key(teachers, overrides, key):
    if teachers is not None and len(teachers) == 2 and teachers[0] == teachers[1]:
        teachers = [teachers[0], {**teachers[1], "name": "other"}]
    with pytest.raises(ConfigError) as err:
        config_from_dict(_tiny(*overrides, teachers=teachers))
    assert str(err.value).startswith(key)


def test_the_shipped_self_distillation_config_loads():
    from distill_ray.config import load_config

    cfg = load_config(REPO / "jobs/configs/self_distill.yaml")
    assert cfg.teachers[0].source == "self_ema" and cfg.loss.kd_warmup_epochs > 0
    born = load_config(REPO / "jobs/configs/self_distill.yaml", ["teachers.0.source=previous_generation",
                                                                 "train.generations=3", "loss.kd_warmup_epochs=0"])
    assert born.train.generations == 3


# --- born-again generations ----------------------------------------------------------------------

def test_each_generation_learns_from_the_one_before(tmp_path):
    from distill_ray.pipeline import generation_config, outside_teachers

    cfg = config_from_dict(_tiny(("run_dir", str(tmp_path)), ("train.generations", 3), ("train.baseline", True),
                                 teachers=BORN_AGAIN))
    assert outside_teachers(cfg).teachers == ()
    first, second, third = (generation_config(cfg, k) for k in (1, 2, 3))
    assert first.teachers == () and not first.train.baseline  # from labels: the scratch baseline itself
    assert first.run_path() == tmp_path / "tiny" / "gen1"
    assert [(t.name, t.source, t.path) for t in second.teachers] == [
        ("previous", "torch_checkpoint", str(tmp_path / "tiny" / "gen1" / "student"))]
    assert third.teachers[0].path == str(tmp_path / "tiny" / "gen2" / "student")
    assert not second.train.baseline and third.train.baseline  # the last generation trains the baseline once
    assert {c.train.generations for c in (first, second, third)} == {1}


def test_the_generation_loop_runs_each_generation_once_and_resumes(tmp_path):
    from distill_ray.pipeline import run_generations

    cfg = config_from_dict(_tiny(("run_dir", str(tmp_path)), ("train.generations", 3), teachers=BORN_AGAIN))
    ran = []

    def train(gen_cfg):  # a generation's run, stubbed: writes its metrics.json as run_experiment does
        ran.append(gen_cfg.name)
        if gen_cfg.name == "gen2" and len(ran) == 2:
            raise RuntimeError("stopped in generation 2")
        metrics = {"metric": "accuracy", "student": 0.7 + 0.01 * len(gen_cfg.name), "baseline": None}
        gen_cfg.run_path().mkdir(parents=True, exist_ok=True)
        (gen_cfg.run_path() / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    with pytest.raises(RuntimeError, match="generation 2"):
        run_generations(cfg, train)
    out = run_generations(cfg, train)  # generation 1 is done: not trained again
    assert ran == ["gen1", "gen2", "gen2", "gen3"]
    assert [g["generation"] for g in out["generations"]] == [1, 2, 3]
    assert [g["teachers"] for g in out["generations"]] == [[], ["previous"], ["previous"]]
    on_disk = json.loads((tmp_path / "tiny" / "generations.json").read_text())
    assert on_disk == out["generations"]
    report = (tmp_path / "tiny" / "report.md").read_text().splitlines()
    assert report[4].startswith("| 1 | labels alone | 0.7400 (accuracy) |")
    assert report[6].startswith("| 3 | previous | 0.7400 (accuracy) |")
    assert json.loads((tmp_path / "tiny" / "metrics.json").read_text())["generations"] == on_disk


# --- one short Ray run -----------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_self_ema_run_warms_up_distils_from_its_average_and_resumes_it(tiny_prepared, small_fashion_mnist, tmp_path):
    """Epoch 0 is the warm-up (no KD term, no teacher weight logged), epoch 1 distils from the average
    (weight 1). Killed at step 25, the run resumes from its last checkpoint with the average it had:
    the first step after the restart still has a KD term. (An average started afresh from the restored
    student would be that student, a dropout-free MLP, and give a KD term of exactly 0 there.)"""
    from distill_ray.pipeline import load_data, outside_teachers, training_inputs
    from distill_ray.cache.build import build_cache
    from distill_ray.train.loop import run_training
    from distill_ray.train.state import STATE_FILE

    root = tiny_prepared(tmp_path)
    paths = [("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache"))]
    tiny = config_from_dict(_tiny(*paths, ("teachers.0.path", str(root / "teachers/mlp_a")),
                                  ("teachers.1.path", str(root / "teachers/cnn_b"))))
    cfg = config_from_dict(_tiny(*paths, ("curriculum.scheduler", "none"), ("loss.kd_warmup_epochs", 1),
                                 ("train.data_mode", "memory"), ("tracking.log_every_steps", 1), teachers=EMA))
    assert outside_teachers(cfg).teachers == ()
    data = load_data(cfg)
    # The session's cache of the tiny config (reused, not built): its teachers' columns go unread here.
    cache = build_cache(tiny, data, {t.name: Path(t.path) for t in tiny.teachers})
    inputs = training_inputs(cfg, cache, data.info)
    assert inputs.teacher_names == ("ema",)
    assert not any(c.startswith(("mlp_a/", "cnn_b/")) for c in inputs.train.schema().names)
    marker, trace = tmp_path / "failed", tmp_path / "trace.txt"
    result = run_training(cfg, inputs, str(tmp_path / "ray"), "student", trace_file=str(trace),
                          fail_once_at_step={"step": 25, "marker": str(marker)})
    assert marker.exists(), "the injected failure did not fire"
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, weights_only=True)
        history = json.loads((Path(d) / "history.json").read_text())

    steps = {r["step"]: r for r in history if r.get("kind") != "epoch" and "loss" in r}
    warm = [r for r in steps.values() if r["epoch"] == 0]
    distilled = [r for r in steps.values() if r["epoch"] == 1]
    assert warm and all(r["kd_loss"] == 0 and r["alpha"] == 0 and "teacher_weight/ema" not in r for r in warm)
    assert distilled and all(r["kd_loss"] > 0 and r["alpha"] == 0.7 and r["teacher_weight/ema"] == 1
                             for r in distilled)
    assert [r["epoch"] for r in history if r.get("kind") == "epoch"] == [0, 1] and history[-1]["val_accuracy"] > 0.5
    # The steps trained twice are the ones after the checkpoint the run resumed from.
    seen = [int(line.split()[2]) for line in trace.read_text().splitlines()]
    replayed = sorted({s for s in seen if seen.count(s) == 2})
    assert replayed and replayed[-1] == 25 and steps[replayed[0]]["epoch"] == 1
    assert steps[replayed[0]]["kd_loss"] > 1e-4  # the average went on; a fresh copy would give exactly 0
    assert state["ema"] is not None and not all(torch.equal(state["ema"][k], v) for k, v in state["student"].items())


def test_paths_other_than_run_refuse_a_teacher_made_from_the_student():
    """--search, sweeps and ablations prepare every teacher of the config: one made from the student is
    refused by key before any work, not a crash on its missing path."""
    from distill_ray.teachers.setup import prepare_teachers

    cfg = config_from_dict(_tiny(("curriculum.scheduler", "none"), teachers=EMA))
    with pytest.raises(ValueError, match=r"teachers\[0\].source='self_ema'.*distill-ray run"):
        prepare_teachers(cfg, data=None)
