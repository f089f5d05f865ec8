"""Step budgets: the baseline and the curriculum rows of the ablation train as many optimizer steps
as the student, however few rows they read or hold back."""

from pathlib import Path

from distill_ray.config import apply_overrides, config_from_dict, config_to_dict, load_config
from distill_ray.kd.objectives import planned_steps
from distill_ray.train.inputs import baseline_config, epochs_for_steps

REPO = Path(__file__).resolve().parents[1]


def test_the_baseline_gets_the_students_steps_on_its_labeled_rows_without_curriculum():
    cfg = load_config(REPO / "jobs/configs/quickstart.yaml")
    student = planned_steps(cfg, 54_000, 1)
    assert student == 40 * (54_000 // 256)
    base = baseline_config(cfg, 54_000, 4_980)
    steps = planned_steps(base, 4_980, 1)
    assert student <= steps < student + 4_980 // 256  # within one of its own epochs
    assert base.train.epochs == 443 and base.curriculum.scheduler == "none"
    # It validates about as often as the student (40 times), not 444 times.
    assert base.train.eval_every_epochs == 11 and 38 <= base.train.epochs / base.train.eval_every_epochs <= 42
    assert (base.train.lr_schedule, base.train.lr, base.student) == (cfg.train.lr_schedule, cfg.train.lr, cfg.student)
    fixed = baseline_config(config_from_dict(apply_overrides(config_to_dict(cfg), [("train.baseline_epochs", 7)])),
                            54_000, 4_980)
    assert fixed.train.epochs == 7


def test_a_curriculum_that_holds_data_back_gets_more_epochs_for_equal_steps():
    cfg = config_from_dict(apply_overrides(config_to_dict(load_config(REPO / "jobs/configs/quickstart.yaml")),
                                           [("curriculum.scheduler", "multi_stage"), ("train.epochs", 8)]))
    # Four stages spread over the run open 1/4, 1/2, 3/4, then all of the data.
    assert planned_steps(cfg, 10_000, 1) == 2 * (2_500 // 256 + 5_000 // 256 + 7_500 // 256 + 10_000 // 256)
    target = 8 * (10_000 // 256)
    epochs = epochs_for_steps(cfg, 10_000, target)
    assert epochs > 8
    longer = config_from_dict(apply_overrides(config_to_dict(cfg), [("train.epochs", epochs)]))
    shorter = config_from_dict(apply_overrides(config_to_dict(cfg), [("train.epochs", epochs - 1)]))
    assert planned_steps(longer, 10_000, 1) >= target > planned_steps(shorter, 10_000, 1)


def test_per_stage_temperatures_apply_only_where_there_are_stages():
    from distill_ray.kd.objectives import temperature_and_alpha

    cfg = load_config(REPO / "jobs/configs/fortunes_text.yaml")  # scheduler none, stage temperatures 1 -> 2
    assert (cfg.curriculum.scheduler, cfg.curriculum.temperature_schedule) == ("none", "stage")
    assert temperature_and_alpha(cfg, 0, 100, stage=0) == (cfg.loss.temperature, cfg.loss.alpha)
    pocl = config_from_dict(apply_overrides(config_to_dict(cfg), [("curriculum.scheduler", "multi_stage")]))
    assert [temperature_and_alpha(pocl, 0, 100, stage=s)[0] for s in range(4)] == [1.0, 1.33, 1.67, 2.0]
