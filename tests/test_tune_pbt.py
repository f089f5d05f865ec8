"""Population Based Training sweeps: mutations built from a space file, the errors that stop a bad
PBT sweep before Ray starts, and (slow) a real 2-trial PBT sweep whose exploited trial continues the
donor's student instead of starting over."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from distill_ray.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config
from distill_ray.tune.sweep import trial_scheduler, search_algorithm, run_sweep
from distill_ray.tune.pbt import ClampToSpace, checkpoint_history, epoch_rows, evolved_schedule, pbt_mutations, \
    pbt_train_slots
from distill_ray.tune.space import load_space, trial_config
from distill_ray.tune.summary import write_summary

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    return load_config(REPO / "jobs/configs/tiny.yaml", [("tune.scheduler", "pbt"), ("train.epochs", 4)])


def _space(tmp_path: Path, base, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(path, base)


MIXED = """params:
  loss.temperature: {loguniform: [1.0, 8.0]}
  loss.alpha: {uniform: [0.1, 0.9]}
  train.batch_size: {randint: [32, 128]}
  loss.kind: {choice: [forward_kl, reverse_kl, js]}
  blend.kind: {grid: [uniform, learned_global]}
"""


# --- mutations from a space (no Ray started) --------------------------------------------------------

def test_ranges_become_distributions_choices_lists_and_grids_stay_fixed(tmp_path, base):
    from ray.tune.search.sample import Float, Integer

    mutations = pbt_mutations(_space(tmp_path, base, MIXED))
    assert set(mutations) == {"loss.temperature", "loss.alpha", "train.batch_size", "loss.kind"}
    temperature, alpha, batch = mutations["loss.temperature"], mutations["loss.alpha"], mutations["train.batch_size"]
    assert isinstance(temperature, Float) and (temperature.lower, temperature.upper) == (1.0, 8.0)
    assert type(temperature.get_sampler()).__name__ == "_LogUniform"
    assert isinstance(alpha, Float) and (alpha.lower, alpha.upper) == (0.1, 0.9)
    assert isinstance(batch, Integer) and (batch.lower, batch.upper) == (32, 129)  # randint's high is inclusive
    assert mutations["loss.kind"] == ["forward_kl", "reverse_kl", "js"]


def test_perturbed_values_are_put_back_inside_the_space(tmp_path, base):
    clamp = ClampToSpace.of(_space(tmp_path, base, MIXED))
    config = {"loss.temperature": 9.6, "loss.alpha": 0.08, "train.batch_size": 153.6, "loss.kind": "js",
              "blend.kind": "uniform"}
    assert clamp(dict(config)) == {"loss.temperature": 8.0, "loss.alpha": 0.1, "train.batch_size": 128,
                                   "loss.kind": "js", "blend.kind": "uniform"}
    assert clamp({**config, "train.batch_size": 76.8})["train.batch_size"] == 77  # 64 * 1.2, a whole number
    inside = {**config, "loss.temperature": 2.5, "loss.alpha": 0.5, "train.batch_size": 64}
    assert clamp(dict(inside)) == inside


def test_the_scheduler_perturbs_every_interval_and_clones_the_quantile(tmp_path, base):
    from ray.tune.schedulers import PopulationBasedTraining

    cfg = replace(base, tune=replace(base.tune, pbt_interval=2, pbt_quantile=0.5))
    pbt = trial_scheduler(cfg, _space(tmp_path, base, MIXED))
    assert isinstance(pbt, PopulationBasedTraining)
    assert (pbt._time_attr, pbt._perturbation_interval, pbt._quantile_fraction, pbt._synch) == ("epoch", 2, 0.5, True)
    assert pbt._metric is None and pbt._mode is None  # they come from TuneConfig, like ASHA's
    assert pbt._custom_explore_fn({"loss.temperature": 0.5, "loss.alpha": 1.2, "train.batch_size": 64})[
        "loss.alpha"] == 0.9


def test_the_shipped_pbt_space_evolves_temperature_and_alpha_with_constant_schedules(base):
    space = load_space(REPO / "tune_spaces/pbt.yaml", base)
    assert set(pbt_mutations(space)) == {"loss.temperature", "loss.alpha"}
    cfg = trial_config(config_to_dict(base), space, {"loss.temperature": 3.0, "loss.alpha": 0.4})
    # the loop then trains with exactly the (perturbed) values: no curriculum schedule overrides them
    assert (cfg.curriculum.temperature_schedule, cfg.curriculum.alpha_schedule) == ("constant", "constant")
    assert (cfg.loss.temperature, cfg.loss.alpha) == (3.0, 0.4)


# --- errors before any work ---------------------------------------------------------------------------

def test_a_searcher_cannot_drive_pbt(tmp_path, base):
    cfg = replace(base, tune=replace(base.tune, search="optuna"))
    with pytest.raises(ConfigError) as err:
        search_algorithm(cfg, _space(tmp_path, base, "params:\n  loss.alpha: {uniform: [0.1, 0.9]}\n"))
    assert "tune.search=optuna" in str(err.value) and "tune.scheduler=pbt" in str(err.value)
    assert "random, grid" in str(err.value)


def test_an_interval_as_long_as_training_is_refused(tmp_path, base):
    cfg = replace(base, tune=replace(base.tune, pbt_interval=4))
    with pytest.raises(ConfigError, match=r"tune.pbt_interval=4 must be below train.epochs=4"):
        trial_scheduler(cfg, _space(tmp_path, base, "params:\n  loss.alpha: {uniform: [0.1, 0.9]}\n"))


def test_a_space_of_only_grids_has_nothing_to_evolve(tmp_path, base):
    with pytest.raises(ConfigError, match="needs a param to evolve"):
        trial_scheduler(base, _space(tmp_path, base, "params:\n  loss.kind: {grid: [forward_kl, js]}\n"))


@pytest.mark.parametrize("key, value, needle", [
    ("tune.pbt_interval", 0, ">= 1"), ("tune.pbt_quantile", 0.6, "<= 0.5"), ("tune.pbt_quantile", 0.0, "> 0"),
])
def test_pbt_settings_are_range_checked(key, value, needle):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "jobs/configs/tiny.yaml", [(key, value)])
    assert key in str(err.value) and needle in str(err.value)


def test_training_slots_fit_beside_the_whole_population(base):
    cfg = replace(base, tune=replace(base.tune, cpus_per_trial=0.25, max_concurrent=8))
    # 1 CPU of drivers, 1 kept free for the runs' Ray Data tasks, 3 runs of 1.1 CPUs (1-CPU worker + its stage)
    assert pbt_train_slots(cfg, population=4, cluster_cpus=6) == 3
    assert pbt_train_slots(replace(cfg, tune=replace(cfg.tune, max_concurrent=2)), 4, 6) == 2
    assert pbt_train_slots(cfg, population=4, cluster_cpus=4) == 1  # 3 runs would leave no CPU to read data
    with pytest.raises(ConfigError) as err:
        pbt_train_slots(cfg, population=8, cluster_cpus=2)  # drivers alone take both CPUs
    assert "tune.num_samples" in str(err.value) and "2 CPUs" in str(err.value)


# --- results --------------------------------------------------------------------------------------------

HISTORY = [
    {"step": 5, "epoch": 0, "temperature": 2.0, "alpha": 0.5, "loss": 1.0},
    {"step": 9, "epoch": 0, "temperature": 2.0, "alpha": 0.5, "loss": 0.8},
    {"step": 9, "epoch": 0, "kind": "epoch", "val_accuracy": 0.6},
    {"step": 18, "epoch": 1, "temperature": 2.4, "alpha": 0.4, "loss": 0.6},
    {"step": 18, "epoch": 1, "kind": "epoch", "val_accuracy": 0.7},
]


def test_epoch_rows_are_what_the_loop_reported_for_each_epoch():
    rows = epoch_rows(HISTORY)
    assert [(r["epoch"], r["step"], r["temperature"], r["loss"], r["val_accuracy"]) for r in rows] == \
        [(1, 9, 2.0, 0.8, 0.6), (2, 18, 2.4, 0.6, 0.7)]
    assert [r["epoch"] for r in epoch_rows(HISTORY, after_epoch=1)] == [2]


def test_the_summary_shows_the_winners_schedule_per_epoch(tmp_path, base):
    schedule = evolved_schedule(HISTORY, "val_accuracy")
    assert schedule == [{"epoch": 1, "temperature": 2.0, "alpha": 0.5, "val_accuracy": 0.6},
                        {"epoch": 2, "temperature": 2.4, "alpha": 0.4, "val_accuracy": 0.7}]
    space = _space(tmp_path, base, "params:\n  loss.alpha: {uniform: [0.1, 0.9]}\n")
    rows = [{"trial_id": "t1", "params": {"loss.alpha": 0.4}, "metric": 0.7, "epochs": 2, "status": "done"}]
    text = write_summary(base, space, rows, tmp_path, None, tmp_path / "v1", schedule).read_text()
    assert "| 1 | 2 | 0.5 | 0.6 |" in text and "| 2 | 2.4 | 0.4 | 0.7 |" in text
    assert "evolved schedule" in text


# --- a real PBT sweep -------------------------------------------------------------------------------------

EPOCHS = 2
# The smallest population PBT can exploit in: at quantile 0.5 the weaker trial clones the stronger one
# at every perturbation. Each trial trains in EPOCHS one-epoch segments, one TorchTrainer run each.
POPULATION = 2


@pytest.fixture(scope="module")
def pbt_sweep(ray_local, tmp_path_factory, tiny_prepared):
    root = tiny_prepared(tmp_path_factory.mktemp("tune_pbt"))  # the session's teachers and cache, reused here
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    cfg = config_from_dict(apply_overrides(raw, [
        ("name", "pbt"), ("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache")),
        ("teachers.0.path", str(root / "teachers/mlp_a")), ("teachers.1.path", str(root / "teachers/cnn_b")),
        ("tune.sweep_dir", str(root / "sweeps")), ("registry.tracking_uri", f"sqlite:///{root / 'runs' / 'mlflow.db'}"),
        ("tune.scheduler", "pbt"), ("tune.pbt_interval", 1), ("tune.pbt_quantile", 0.5), ("train.epochs", EPOCHS),
        # every epoch sees all the data, so each epoch is the same number of steps
        ("curriculum.scheduler", "none"), ("train.checkpoint_every_steps", 1000), ("tracking.wandb", "disabled")]))
    out = run_sweep(cfg, REPO / "tune_spaces/pbt.yaml", samples=POPULATION, max_concurrent=2)
    rows = {r["trial_id"]: _result_rows(Path(r["path"])) for r in out["trials"]}
    return out, rows


def _result_rows(trial_dir: Path) -> list[dict]:
    """Every result the trial reported, in order, across its pauses and exploits."""
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _exploits(out, rows) -> list[tuple[str, Path, dict]]:
    """(trial id, donor checkpoint, first row after) for every segment that began from another trial's state."""
    dirs = {r["trial_id"]: Path(r["path"]).resolve() for r in out["trials"]}
    found, seen = [], set()
    for tid, trial_rows in rows.items():
        for row in trial_rows:
            start = row.get("resumed_from")
            if start and Path(start).resolve().parent != dirs[tid] and (tid, start) not in seen:
                seen.add((tid, start))
                found.append((tid, Path(start), row))
    return found


@pytest.mark.slow
@pytest.mark.ray
def test_every_trial_of_the_population_reaches_the_last_epoch(pbt_sweep):
    out, rows = pbt_sweep
    assert len(out["trials"]) == POPULATION and all(r["status"] == "done" for r in out["trials"])
    for tid, trial_rows in rows.items():
        assert trial_rows[-1]["epoch"] == EPOCHS, tid
        assert 0.3 < trial_rows[-1]["val_accuracy"] <= 1.0
    assert out["best"]["metric"] == max(r["metric"] for r in out["trials"])


@pytest.mark.slow
@pytest.mark.ray
def test_weak_trials_cloned_strong_ones_and_trained_with_the_perturbed_values(pbt_sweep):
    out, rows = pbt_sweep
    policy = (Path(out["sweep_dir"]) / "trials" / "pbt_global.txt").read_text().splitlines()
    exploits = _exploits(out, rows)
    # synchronous PBT ranks both at each of epochs 1..EPOCHS-1; the bottom half (1 trial) clones the top
    assert len(policy) == len(exploits) == EPOCHS - 1
    for trial_rows in rows.values():
        for row in trial_rows:  # the loop trained with the config Tune held at that time, perturbed or not
            assert row["temperature"] == pytest.approx(row["config"]["loss.temperature"])
            assert row["alpha"] == pytest.approx(row["config"]["loss.alpha"])


@pytest.mark.slow
@pytest.mark.ray
def test_an_exploited_trial_continues_the_donors_student_instead_of_starting_over(pbt_sweep):
    from ray.train import Checkpoint

    out, rows = pbt_sweep
    steps_per_epoch = 1200 // 64
    for trial_rows in rows.values():
        assert all(r["step"] == r["epoch"] * steps_per_epoch for r in trial_rows)
    last_donor = {}
    for tid, donor_checkpoint, first_row in _exploits(out, rows):
        donor_history = checkpoint_history(Checkpoint(str(donor_checkpoint)))
        donor_epoch = epoch_rows(donor_history)[-1]["epoch"]
        # the segment after the exploit picks up at the donor's epoch and step count, not at 0
        assert first_row["epoch"] == donor_epoch + 1 >= 2
        assert first_row["step"] == donor_history[-1]["step"] + steps_per_epoch
        last_donor[tid] = donor_history
    for tid, donor_history in last_donor.items():
        # and its student is the donor's: the trial's final history begins with the (last) donor's, row for row
        final = next(r for r in out["trials"] if r["trial_id"] == tid)["checkpoint_path"]
        assert checkpoint_history(Checkpoint(final))[:len(donor_history)] == donor_history


@pytest.mark.slow
@pytest.mark.ray
def test_the_summary_shows_the_winners_evolved_schedule(pbt_sweep):
    out, _ = pbt_sweep
    schedule = out["schedule"]
    assert [r["epoch"] for r in schedule] == list(range(1, EPOCHS + 1))
    assert all(1.0 <= r["temperature"] <= 8.0 and 0.1 <= r["alpha"] <= 0.9 for r in schedule)
    assert schedule[-1]["val_accuracy"] == pytest.approx(out["best"]["metric"])
    summary = (Path(out["sweep_dir"]) / "sweep_summary.md").read_text()
    assert "evolved schedule" in summary
    assert f"| {EPOCHS} | {schedule[-1]['temperature']:.4g} | {schedule[-1]['alpha']:.4g} |" in summary
