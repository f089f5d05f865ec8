"""POCL for language models (issue 14 item 5): the reference_rouge_loss measurer's config rules, its
reference model's per-row measures, and (integration) a tiny instruction run whose cache ranks every
train row by the reciprocal-rank fusion of a scratch reference's ROUGE-L and loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill_ray.config import ConfigError, apply_overrides, config_from_dict

REPO = Path(__file__).resolve().parents[1]


def _tiny_instruct(*overrides):
    raw = yaml.safe_load((REPO / "jobs/configs/tiny_instruct.yaml").read_text())
    return config_from_dict(apply_overrides(raw, list(overrides)))


def test_pocl_defaults_are_the_papers_layout():
    c = _tiny_instruct("curriculum.scheduler=multi_stage", "curriculum.measurers=[reference_rouge_loss]").curriculum
    assert c.num_stages == 4 and c.stage_length is None  # 4 stages sharing the run's epochs evenly
    assert c.stage_temperatures[0] == 1.0 and c.stage_temperatures[-1] == 2.0 and c.temperature_schedule == "stage"
    assert c.rrf_k == 60 and c.reference == "scratch"


def test_reference_measurer_refused_for_classification():
    raw = {"name": "t", "teachers": [{"name": "a", "recipe": "mlp"}],
           "curriculum": {"measurers": ["reference_rouge_loss"]}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    for part in ["curriculum.measurers", "reference_rouge_loss", "data.task=causal_lm", "teacher_ce"]:
        assert part in str(err.value), f"{part!r} not in {err.value}"


@pytest.mark.parametrize("overrides,must_contain", [
    # causal LM windows, no prompts or reference responses
    (("data.format=python_stdlib",), ["curriculum.measurers", "instruction data", "data.prompt_field",
                                      "choose from: teacher_ce, sequence_length"]),
    (("curriculum.reference=llama_tall",), ["curriculum.reference", "'llama_tall'", "scratch, llama_wide, llama_deep"]),
])
def test_reference_measurer_errors_name_the_key_and_the_choices(overrides, must_contain):
    with pytest.raises(ConfigError) as err:
        _tiny_instruct("curriculum.scheduler=multi_stage", "curriculum.measurers=[reference_rouge_loss]", *overrides)
    for part in must_contain:
        assert part in str(err.value), f"{part!r} not in {err.value}"


def test_a_teacher_may_be_the_reference():
    cfg = _tiny_instruct("curriculum.measurers=[reference_rouge_loss]", "curriculum.reference=llama_deep")
    assert cfg.curriculum.reference == "llama_deep"
