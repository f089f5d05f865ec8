"""The causal-LM ablation without Ray: which rows a config may ask for, what each row trains (mode,
alpha, curriculum, equal steps), the table's numbers and markdown from given runs, and the blend as a
model that decodes greedily from the teachers' mixture."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill_ray.evaluation.ablation import check_rows, valid_rows
from distill_ray.evaluation.classifier_ablation import ROWS
from distill_ray.evaluation.lm_ablation import LM_ROWS, lm_ablation_markdown, lm_row_setup, summarize_lm
from distill_ray.config import ConfigError, load_config
from distill_ray.kd.objectives import planned_steps

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def instruct():
    return load_config(REPO / "jobs/configs/tiny_instruct.yaml")


def test_rows_follow_the_task_and_the_other_tables_rows_are_refused_by_name(instruct):
    tiny, plain_lm = load_config(REPO / "jobs/configs/tiny.yaml"), load_config(REPO / "jobs/configs/tiny_lm.yaml")
    assert valid_rows(instruct) == LM_ROWS and valid_rows(tiny) == ROWS
    assert valid_rows(plain_lm) == ("scratch", "token_kd")  # no prompts: no responses, no POCL
    check_rows(("scratch", "token_kd+pocl"), instruct)
    check_rows(("scratch", "learned"), tiny)
    with pytest.raises(ValueError) as err:
        check_rows(("token_kd", "learned+multi_stage"), instruct)
    for part in ("['learned+multi_stage']", "data.task=causal_lm", "is a row of the classifier table",
                 "choose from: " + ", ".join(LM_ROWS)):
        assert part in str(err.value), f"{part!r} not in {err.value}"
    with pytest.raises(ValueError, match=r"seq_kd.*causal language model table; choose from: scratch, kd_labeled"):
        check_rows(("seq_kd",), tiny)
    with pytest.raises(ValueError, match=r"need instruction data.*choose from: scratch, token_kd$"):
        check_rows(("token+seq_kd",), plain_lm)
    # A row whose config is invalid is refused by its key before any teacher or cache is built: here
    # no teacher shares the data's tokenizer, so none can write responses (token-level KD still can).
    own = {"tokenizer": "smollm2", "source": "hf_dir", "path": "t"}
    foreign = load_config(REPO / "jobs/configs/tiny_instruct.yaml",
                          [f"teachers.{t}.{k}={v}" for t in ("llama_wide", "llama_deep") for k, v in own.items()])
    check_rows(("scratch", "token_kd", "token_kd+pocl"), foreign)
    with pytest.raises(ConfigError, match=r"sequence_kd.mode: 'mixed': every teacher"):
        check_rows(("token_kd", "seq_kd"), foreign)


def test_each_row_trains_what_it_names_at_the_token_kd_rows_steps(instruct):
    counts = {"reference": 311, "teacher": 305}
    setups = {row: lm_row_setup(row, instruct, 5, counts) for row in LM_ROWS}
    token_kd = setups["token_kd"][0]
    steps = planned_steps(token_kd, 311, 1)
    for row, (cfg, cache, use_teachers) in setups.items():
        assert cfg.train.seed == 5 and not cfg.train.baseline and cfg.student == instruct.student, row
        assert cfg.blend.kind == "learned_global" and use_teachers == (row != "scratch"), row
        mode = {"seq_kd": "teacher", "token+seq_kd": "mixed", "token+seq_kd+pocl": "mixed"}.get(row, "off")
        assert cfg.sequence_kd.mode == mode and cache == ("references" if mode == "off" else "responses"), row
        assert cfg.loss.alpha == (0.0 if row == "seq_kd" else instruct.loss.alpha), row
        pocl = row.endswith("+pocl")
        assert cfg.curriculum.scheduler == ("multi_stage" if pocl else "none"), row
        if pocl:
            assert cfg.curriculum.measurers == ("reference_rouge_loss",)
            assert cfg.curriculum.stage_temperatures == instruct.curriculum.stage_temperatures
        rows = {"off": 311, "teacher": 305, "mixed": 616}[mode]
        mine = planned_steps(cfg, rows, 1)
        assert steps <= mine < steps + rows // cfg.train.batch_size + 1, (row, mine, steps)
    assert setups["token+seq_kd"][0].train.epochs < token_kd.train.epochs  # twice the rows, fewer epochs
    assert setups["token_kd+pocl"][0].train.epochs > token_kd.train.epochs  # data held back, more epochs


def _runs():
    out = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        out += [
            {"row": "scratch", "seed": seed, "test_perplexity": 600.0 + shift, "rouge_l": 0.02, "parses": None,
             "teacher_weights": {}, "epochs": 2, "train_rows": 311, "steps": 18, "student_params": 1000,
             "train_seconds": 10.0},
            {"row": "token_kd", "seed": seed, "test_perplexity": 500.0 + shift, "rouge_l": 0.04 + shift / 100,
             "parses": None, "teacher_weights": {"a": 0.25 + shift / 10, "b": 0.75 - shift / 10}, "epochs": 2,
             "train_rows": 311, "steps": 18, "student_params": 1000, "train_seconds": 12.0},
        ]
    return out


REFERENCE = {"teachers": {"a": {"perplexity": 300.0, "accuracy": 0.2, "rouge_l": 0.1, "params": 50},
                          "b": {"perplexity": 400.0, "accuracy": 0.1, "rouge_l": 0.05, "params": 60}},
             "blend": {"perplexity": 290.0, "accuracy": None, "rouge_l": 0.08, "weights": {"a": 0.35, "b": 0.65},
                       "weights_from": "token_kd"}}


def test_the_lm_table_is_mean_and_std_over_seeds_with_gap_on_perplexity():
    table = summarize_lm(_runs(), ("scratch", "token_kd"), REFERENCE)
    kd = table["rows"]["token_kd"]
    assert kd["perplexity"]["mean"] == 501.0 and math.isclose(kd["perplexity"]["std"], math.sqrt(2))
    assert kd["perplexity"]["per_seed"] == {0: 500.0, 1: 502.0}
    assert math.isclose(kd["rouge_l"]["mean"], 0.05) and kd["parses"] is None  # no run had a parse figure
    assert kd["teacher_weights"] == pytest.approx({"a": 0.35, "b": 0.65})
    assert (kd["epochs"], kd["train_rows"], kd["steps"], kd["n"]) == (2, 311, 18, 2)
    assert table["best_teacher"] == {"name": "a", "test_perplexity": 300.0}
    # (scratch - row) / (scratch - best teacher) on perplexity: (601 - 501) / (601 - 300)
    assert math.isclose(kd["gap_recovered"], 100 / 301)
    assert table["rows"]["scratch"]["gap_recovered"] == 0.0 and table["blend"] == REFERENCE["blend"]


def test_the_lm_markdown_has_the_command_wall_time_teachers_blend_and_every_row():
    result = summarize_lm(_runs(), ("scratch", "token_kd"), REFERENCE)
    result.update({"config_name": "tiny_instruct", "seeds": [0, 1], "num_test": 60, "student": "hf_causal_lm {}",
                   "command": "distill-ray ablation x.yaml --seeds 2", "wall_seconds": 150.0,
                   "machine": {"cpu_cores": 2, "platform": "p", "python": "3.11", "torch": "t", "ray": "2.60"}})
    text = lm_ablation_markdown(result)
    assert "Command: `distill-ray ablation x.yaml --seeds 2`" in text and "Wall time: 2.5 min" in text
    assert "| a | 300.00 | 0.1000 | - | 50 |" in text
    assert "| blend (a 0.350, b 0.650; mean final weights of token_kd) | 290.00 | 0.0800 | - | - |" in text
    assert "| token_kd | token-level KD from the learned blend on the references | 2 | 311 | 18 | 501.00 ± 1.41 | " \
           "500.00, 502.00 | 0.0500 ± 0.0141 | - | 33.2% | a 0.350, b 0.650 |" in text
    assert "| scratch |" in text and "Parses: none of the references parses" in text


def _lm(seed: int, vocab: int = 30):
    from distill_ray.models import build_model

    torch.manual_seed(seed)
    return build_model("hf_causal_lm", (16,), vocab, {"hidden_size": 16, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 32}).eval()


def test_the_blend_decodes_the_teachers_mixture_greedily():
    from distill_ray.lm.generation import BlendedLM, batched_responses

    def one_by_one(model, prompts):
        return [batched_responses(model, [p], 6, 2, 0)[0] for p in prompts]

    a, b = _lm(0), _lm(1)
    x = torch.randint(3, 30, (3, 7), generator=torch.Generator().manual_seed(2))
    mixture = (0.3 * a(input_ids=x).logits.softmax(-1) + 0.7 * b(input_ids=x).logits.softmax(-1)).log()
    torch.testing.assert_close(BlendedLM([a, b], [0.3, 0.7])(x), mixture)
    prompts = [[5, 6, 7], [9], [4, 4, 8, 3, 11]]
    # One teacher at all the weight, or the same teacher twice, is that teacher.
    assert one_by_one(BlendedLM([a, b], [1.0, 0.0]), prompts) == one_by_one(a, prompts)
    assert one_by_one(BlendedLM([b, b], [0.5, 0.5]), prompts) == one_by_one(b, prompts)
    blend = BlendedLM([a, b], [0.3, 0.7])
    assert batched_responses(blend, prompts, 6, 2, 0, batch_size=3) == one_by_one(blend, prompts)  # left padding
    with pytest.raises(ValueError, match="one non-negative weight per model"):
        BlendedLM([a, b], [1.0])
