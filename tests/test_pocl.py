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


def _tiny_lm(seed: int = 0, vocab: int = 40):
    import torch

    from distill_ray.models import build_model

    torch.manual_seed(seed)
    return build_model("hf_causal_lm", (24,), vocab, {"hidden_size": 16, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 32}).eval()


def test_batched_greedy_equals_one_prompt_at_a_time():
    """Left padding with an attention mask must not change what greedy decoding says."""
    import torch

    from distill_ray.generation import batched_greedy_responses, greedy_responses

    model = _tiny_lm()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40, (int(n),), generator=generator).tolist() for n in (3, 9, 5, 5, 12, 1, 7)]
    budgets = [6, 2, 8, 8, 4, 5, 1]
    eos = 2
    one_by_one = [greedy_responses(model, [p], b, eos, 0)[0] for p, b in zip(prompts, budgets)]
    assert batched_greedy_responses(model, prompts, budgets, eos, 0, batch_size=3) == one_by_one
    assert batched_greedy_responses(model, prompts, budgets, eos, 0, batch_size=32) == one_by_one
    assert all(len(r) <= b for r, b in zip(one_by_one, budgets))


class _WordTokenizer:
    """Token t decodes to the word 'w{t}'; 2 is eos."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{t}" for t in ids if not (skip_special_tokens and t == 2))


def test_row_measures_are_the_references_loss_and_rouge_per_row():
    import numpy as np
    import torch

    from distill_ray.evaluate import lm_label_logprobs
    from distill_ray.generation import greedy_responses, rouge_l
    from distill_ray.reference import row_measures

    model = _tiny_lm(3)
    x = np.zeros((3, 10), np.int64)
    y = np.full((3, 10), -100, np.int64)
    x[0, :6] = [5, 6, 7, 8, 9, 2]
    y[0, 2:5] = [8, 9, 2]  # prompt 5 6 7, response 8 9 <eos>
    x[1, :4] = [11, 12, 13, 2]
    y[1, 1:3] = [13, 2]
    x[2, :3] = [4, 4, 4]  # no response: nothing to answer
    rouge, loss = row_measures(model, _WordTokenizer(), x, y, max_new_tokens=64, pad_id=0)
    assert rouge.dtype == np.float32 and loss.dtype == np.float32
    logp, _ = lm_label_logprobs(model, x[:2], y[:2])
    np.testing.assert_allclose(loss[:2], [-logp[0, 2:5].mean().item(), -logp[1, 1:3].mean().item()], rtol=1e-5)
    for i, (prompt, reference) in enumerate((([5, 6, 7], [8, 9, 2]), ([11, 12], [13, 2]))):
        response = greedy_responses(model, [prompt], len(reference), 2, 0)[0]
        assert rouge[i] == np.float32(rouge_l(_WordTokenizer().decode(response), _WordTokenizer().decode(reference)))
    assert loss[2] == np.inf and rouge[2] == 0.0
    # The generation budget is each row's reference length, capped by max_new_tokens.
    capped, _ = row_measures(model, _WordTokenizer(), x, y, max_new_tokens=1, pad_id=0)
    assert capped[0] <= 2 * 1 / (1 + 2) + 1e-6  # one word against two: ROUGE-L F1 at most 2/3
