"""POCL for language models (issue 14 item 5): the reference_rouge_loss measurer's config rules, its
reference model's per-row measures, and (integration) a tiny instruction run whose cache ranks every
train row by the reciprocal-rank fusion of a scratch reference's ROUGE-L and loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill_ray.config import ConfigError, apply_overrides, config_from_dict

REPO = Path(__file__).resolve().parents[1]


def _tiny_instruct(*overrides, teachers: tuple[str, ...] | None = None):
    raw = yaml.safe_load((REPO / "jobs/configs/tiny_instruct.yaml").read_text())
    if teachers is not None:
        raw["teachers"] = [t for t in raw["teachers"] if t["name"] in teachers]
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


@pytest.mark.parametrize("scheduler, trained", [("none", False), ("multi_stage", True), ("linear_ramp", True)])
def test_the_reference_is_trained_only_for_a_scheduler_that_reads_difficulty(monkeypatch, scheduler, trained):
    """Under none nothing reads the reference's ranking (confidence, which reads none either, is
    refused for language models): no reference is trained or measured and the cache's key says so;
    a sweep that varies the scheduler keeps it (no Ray here)."""
    from distill_ray.lm import reference
    from distill_ray.tune.space import SearchSpace

    calls = []
    monkeypatch.setattr(reference, "prepare_reference", lambda *a: calls.append("train") or Path("ref"))
    monkeypatch.setattr(reference, "measure_train_rows", lambda *a: calls.append("measure") or {})

    class Rows:  # the cache's rows, as Ray Data would get the reference's stage
        def map_batches(self, fn, **kwargs):
            calls.append(fn.__name__)
            return self

    cfg = _tiny_instruct(f"curriculum.scheduler={scheduler}", "curriculum.measurers=[reference_rouge_loss]")
    rows = Rows()
    assert reference.with_reference_difficulty(cfg, None, {}, rows) is rows
    assert calls == (["train", "measure", "add_reference_columns"] if trained else [])
    assert bool(reference.reference_key(cfg, "data")) == trained
    # A sweep over the scheduler builds one cache for all its trials: the reference stays.
    assert SearchSpace((("curriculum.scheduler", "choice", ("none", "multi_stage")),)).sets("curriculum.scheduler")
    assert reference.reference_key(cfg, "data", any_scheduler=True)
    calls.clear()
    reference.with_reference_difficulty(cfg, None, {}, rows, any_scheduler=True)
    assert calls == ["train", "measure", "add_reference_columns"]


def _tiny_lm(seed: int = 0, vocab: int = 40):
    import torch

    from distill_ray.models import build_model

    torch.manual_seed(seed)
    return build_model("hf_causal_lm", (24,), vocab, {"hidden_size": 16, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 32}).eval()


def test_batched_greedy_equals_one_prompt_at_a_time():
    """Left padding with an attention mask must not change what greedy decoding says."""
    import torch

    from distill_ray.lm.generation import batched_responses

    model = _tiny_lm()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40, (int(n),), generator=generator).tolist() for n in (3, 9, 5, 5, 12, 1, 7)]
    budgets = [6, 2, 8, 8, 4, 5, 1]
    eos = 2
    one_by_one = [batched_responses(model, [p], b, eos, 0)[0] for p, b in zip(prompts, budgets)]
    assert batched_responses(model, prompts, budgets, eos, 0, batch_size=3) == one_by_one
    assert batched_responses(model, prompts, budgets, eos, 0, batch_size=32) == one_by_one
    assert all(len(r) <= b for r, b in zip(one_by_one, budgets))

def test_responses_end_before_eos_unless_kept_and_sampling_ignores_the_batching():
    """Evaluation and the reference score a response without its eos; sequence KD keeps it. Seeded
    sampling in length-sorted batches gives what one batch in the given order gives."""
    from distill_ray.lm.generation import batched_responses

    model = _tiny_lm(vocab=6)
    prompts = [[3, 4], [4, 5, 3], [5], [3, 3, 3, 3], [4]]
    seeds = list(range(100, 105))
    kept = batched_responses(model, prompts, 12, 2, 0, temperature=1.0, seeds=seeds, keep_eos=True)
    cut = batched_responses(model, prompts, 12, 2, 0, temperature=1.0, seeds=seeds)
    assert any(r[-1:] == [2] for r in kept)  # a 6-token vocabulary says eos within 12 tokens somewhere
    assert cut == [r[:-1] if r[-1:] == [2] else r for r in kept]
    assert batched_responses(model, prompts, 12, 2, 0, temperature=1.0, seeds=seeds, batch_size=2) == cut



class _WordTokenizer:
    """Token t decodes to the word 'w{t}'; 2 is eos."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{t}" for t in ids if not (skip_special_tokens and t == 2))


def test_row_measures_are_the_references_loss_and_rouge_per_row():
    import numpy as np

    from distill_ray.evaluation.metrics import lm_label_logprobs
    from distill_ray.lm.generation import batched_responses, rouge_l
    from distill_ray.lm.reference import row_measures

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
        response = batched_responses(model, [prompt], len(reference), 2, 0)[0]
        assert rouge[i] == np.float32(rouge_l(_WordTokenizer().decode(response), _WordTokenizer().decode(reference)))
    assert loss[2] == np.inf and rouge[2] == 0.0
    # The generation budget is each row's reference length, capped by max_new_tokens.
    capped, _ = row_measures(model, _WordTokenizer(), x, y, max_new_tokens=1, pad_id=0)
    assert capped[0] <= 2 * 1 / (1 + 2) + 1e-6  # one word against two: ROUGE-L F1 at most 2/3


@pytest.mark.slow
@pytest.mark.ray
def test_pocl_ranks_every_train_row_by_rrf_and_stage_0_opens_the_easiest(ray_local, tmp_path):
    """Tiny instruction data end to end: a scratch reference measures every train row at cache-build
    time; the cached difficulty is the RRF (k = 60) of the recorded ROUGE-L and loss; the multi-stage
    run trains epoch 0 (stage 0 of 4) on the easiest quarter only, epoch 1 (stage 2) on the easiest 3/4."""
    import math

    import numpy as np
    import torch

    from distill_ray.kd import curriculum as cur
    from distill_ray.pipeline import build_cache, load_data, prepare_teachers
    from distill_ray.lm.reference import COLUMN, LOSS_COLUMN, ROUGE_COLUMN
    from distill_ray.train.inputs import training_inputs
    from distill_ray.train.loop import run_training

    cfg = _tiny_instruct(
        "data.max_train_samples=96", "data.max_eval_samples=24", "curriculum.scheduler=multi_stage",
        "curriculum.measurers=[reference_rouge_loss]", "curriculum.reference_max_new_tokens=16",
        "train.epochs=2", "train.batch_size=8", "train.baseline=false",
        f"cache.dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'runs'}", teachers=("llama_deep",))
    data = load_data(cfg)
    cache = build_cache(cfg, data, prepare_teachers(cfg, data))
    train = cache.dataset("train", ["id", ROUGE_COLUMN, LOSS_COLUMN, COLUMN]).to_pandas().sort_values("id")
    assert len(train) == data.info.counts["train"] == cache.rows("train") > 60
    rouge, loss = np.array(train[ROUGE_COLUMN], np.float32), np.array(train[LOSS_COLUMN], np.float32)
    difficulty = np.array(train[COLUMN], np.float64)
    assert difficulty.dtype == np.float64 and np.isfinite(difficulty).all() and np.isfinite(loss).all()
    assert ((0 <= rouge) & (rouge <= 1)).all() and len(np.unique(rouge)) > 3  # ROUGE-L varies across rows
    np.testing.assert_array_equal(
        difficulty, cur.reference_rouge_loss(torch.from_numpy(rouge), torch.from_numpy(loss), k=60).numpy())
    assert np.isnan(cache.dataset("val", [COLUMN]).to_pandas()[COLUMN].to_numpy(np.float64)).all()  # train only

    trace = tmp_path / "trace.txt"
    run_training(cfg, training_inputs(cfg, cache, data.info), str(tmp_path / "ray"), "pocl", trace_file=str(trace))
    ids = train["id"].to_numpy()
    easy_to_hard = ids[np.argsort(difficulty, kind="stable")]  # ties by id, as the loop's id-sorted shard
    trained = {0: set(), 1: set()}
    for line in trace.read_text().splitlines():
        _, epoch, _, row_ids = line.split()
        trained[int(epoch)].update(int(i) for i in row_ids.split(","))
    for epoch, fraction in ((0, 1 / 4), (1, 3 / 4)):
        opened = set(easy_to_hard[:math.ceil(fraction * len(ids))].tolist())
        assert trained[epoch] <= opened
        assert len(opened) - len(trained[epoch]) < cfg.train.batch_size  # only a last partial batch is left out
