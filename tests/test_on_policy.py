"""On-policy distillation (``loss.on_policy``): which steps go on-policy, the batch the student's own
responses make, the teachers' scores laid on it, the loss (equal to token KD at beta 0, and to a
float64 full-vocabulary reference at every beta), the facts logged per step, the guard that stops a
collapsing run, the config's refusals, and (Ray) a tiny run where the student gets closer to its
teacher on its own samples and one that collapses and stops with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill_ray.config import ConfigError, apply_overrides, config_from_dict
from distill_ray.data.rows import IGNORE_LABEL
from distill_ray.kd.blending import TeacherBlend
from distill_ray.kd.objectives import TokenTopK, batch_loss
from distill_ray.kd.on_policy import CollapseGuard, Rollout, is_on_policy_step, response_budgets, rollout_batch, \
    rollout_metrics, sampling_seeds, scored_targets

REPO = Path(__file__).resolve().parents[1]
EOS, PAD = 2, 0


def _raw(*overrides) -> dict:
    return apply_overrides(yaml.safe_load((REPO / "jobs/configs/tiny_instruct.yaml").read_text()), overrides)


def _cfg(*overrides):
    return config_from_dict(_raw(("loss.temperature", 1.0), *overrides))


# --- which steps --------------------------------------------------------------------------------------

def test_lmbda_zero_never_goes_on_policy_one_always_and_between_a_seeded_share():
    steps = range(2000)
    assert not any(is_on_policy_step(0.0, 7, s) for s in steps)  # lmbda 0: every step is today's token KD
    assert all(is_on_policy_step(1.0, 7, s) for s in steps)
    drawn = [is_on_policy_step(0.3, 7, s) for s in steps]
    assert 0.26 < np.mean(drawn) < 0.34
    assert drawn == [is_on_policy_step(0.3, 7, s) for s in steps]  # a resumed run decides alike
    assert drawn != [is_on_policy_step(0.3, 8, s) for s in steps]


def test_sampling_seeds_depend_on_seed_step_and_row_alone():
    ids = np.array([5, 9, 2**40 + 3])
    seeds = sampling_seeds(0, 3, ids)
    assert len(set(seeds)) == 3
    assert sampling_seeds(0, 3, ids[1:]) == seeds[1:]  # a row's seed does not depend on its neighbours
    assert sampling_seeds(0, 4, ids) != seeds and sampling_seeds(1, 3, ids) != seeds


# --- the batch and the teachers' scores -----------------------------------------------------------------

def test_a_rollout_labels_the_positions_that_predict_each_response_token():
    prompts, responses = [[5, 6, 7], [8]], [[9, 10, EOS], [11]]
    r = rollout_batch(prompts, responses, [3, 4], PAD, EOS)
    # sequences 5 6 7 9 10 2 and 8 11: inputs less the last token, right-padded
    assert r.x.tolist() == [[5, 6, 7, 9, 10], [8, PAD, PAD, PAD, PAD]]
    n = IGNORE_LABEL
    assert r.labels.tolist() == [[n, n, 9, 10, EOS], [11, n, n, n, n]]
    assert r.positions.tolist() == [[2, 3, 4], [0, -1, -1]]
    assert r.lengths.tolist() == [3, 1] and r.ended.tolist() == [True, False] and r.budgets.tolist() == [3, 4]
    assert response_budgets([[1] * 10, [1] * 3, [1] * 20], max_new_tokens=8, window=12) == [3, 8, 0]


def test_the_teachers_scores_land_on_their_positions_and_the_rest_is_nan():
    positions = torch.tensor([[2, 3, 4], [0, -1, -1]])
    k = 2
    answers = [{"topk_logprobs": np.arange(12, dtype=np.float32).reshape(2, 3, k) * -(t + 1),
                "topk_indices": np.arange(12).reshape(2, 3, k) + 100 * t} for t in range(2)]
    targets = scored_targets(answers, positions, width=5, k=k)
    assert targets.logprobs.shape == (2, 2, 5, k)
    for t in range(2):
        assert torch.equal(targets.logprobs[t, 0, 2:], torch.as_tensor(answers[t]["topk_logprobs"][0]))
        assert torch.equal(targets.indices[t, 1, 0], torch.as_tensor(answers[t]["topk_indices"][1, 0]))
    assert torch.isnan(targets.logprobs[:, 0, :2]).all() and torch.isnan(targets.logprobs[:, 1, 1:]).all()


# --- the loss -----------------------------------------------------------------------------------------------

def _sequences(vocab: int = 11, k: int = 4, teachers: int = 2, seed: int = 0):
    """Student logits [B, L, V], the teachers' full log-probs [K, B, L, V], their top k, response labels."""
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 6
    student = torch.randn(B, L, vocab, generator=g, dtype=torch.float64)
    full = torch.log_softmax(torch.randn(teachers, B, L, vocab, generator=g, dtype=torch.float64) * 2, -1)
    logp, idx = full.topk(k, dim=-1)
    labels = torch.randint(0, vocab, (B, L), generator=g)
    labels[0, :2], labels[1, :4], labels[2, 5] = IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL  # prompt and padding
    return student, full, TokenTopK(logp, idx), labels


def _loss_and_grad(cfg, blend, student, targets, labels, on_policy: bool):
    logits = student.clone().requires_grad_(True)
    parts = batch_loss(cfg, blend, logits, targets, logits, labels, temperature=cfg.loss.temperature, alpha=1.0,
                       causal=True, on_policy=on_policy)
    (grad,) = torch.autograd.grad(parts.total, logits)
    return parts, grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_on_policy_loss_at_beta_0_is_token_kd_forward_kl_in_value_and_gradient(temperature):
    student, _, targets, labels = _sequences()
    blend = TeacherBlend("learned_global", 2)
    with torch.no_grad():
        blend.global_logits.copy_(torch.tensor([0.7, -0.4]))
    token_kd, grad_kd = _loss_and_grad(_cfg(("loss.kind", "forward_kl"), ("loss.temperature", temperature)), blend,
                                       student, targets, labels, on_policy=False)
    on_policy, grad_op = _loss_and_grad(_cfg(("loss.on_policy.beta", 0.0), ("loss.temperature", temperature)),
                                        blend, student, targets, labels, on_policy=True)
    torch.testing.assert_close(on_policy.total, token_kd.total, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_op, grad_kd, rtol=1e-10, atol=1e-14)
    assert on_policy.total > 0 and not on_policy.labeled.any()  # no task term on the student's own tokens


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_on_policy_loss_equals_a_float64_full_vocabulary_gjsd_reference(beta):
    """k = the vocabulary: the buckets are exact, so the product's loss is TRL's generalized JSD blended
    over teachers, meaned over response positions, written out here in float64."""
    vocab = 9
    student, full, targets, labels = _sequences(vocab=vocab, k=vocab)
    blend = TeacherBlend("learned_global", 2)
    with torch.no_grad():
        blend.global_logits.copy_(torch.tensor([0.2, 1.1]))
    parts, _ = _loss_and_grad(_cfg(("loss.on_policy.beta", beta)), blend, student, targets, labels, on_policy=True)

    at = labels >= 0
    logq = torch.log_softmax(student, -1)[at]
    weights = torch.softmax(torch.tensor([0.2, 1.1]), 0).double()  # the blend keeps its weights in float32
    expected = 0.0
    for k in range(2):
        logp = full[k][at]
        p, q = logp.exp(), logq.exp()
        if beta == 0.0:
            per = (p * (logp - logq)).sum(-1)
        elif beta == 1.0:
            per = (q * (logq - logp)).sum(-1)
        else:
            m = beta * p + (1 - beta) * q
            per = beta * (p * (logp - m.log())).sum(-1) + (1 - beta) * (q * (logq - m.log())).sum(-1)
        expected = expected + weights[k] * per.mean()
    torch.testing.assert_close(parts.total, expected, rtol=1e-9, atol=1e-12)


def test_a_step_with_no_response_token_costs_nothing_and_keeps_the_graph():
    student, _, targets, labels = _sequences()
    parts, grad = _loss_and_grad(_cfg(("loss.on_policy.beta", 0.5)), TeacherBlend("uniform", 2), student, targets,
                                 torch.full_like(labels, IGNORE_LABEL), on_policy=True)
    assert parts.total.item() == 0.0 and torch.count_nonzero(grad) == 0


# --- what a user watches, and the guard ----------------------------------------------------------------------

def _rollout(lengths, ended, budgets) -> Rollout:
    n = len(lengths)
    return Rollout(torch.zeros((n, 3), dtype=torch.long), torch.full((n, 3), IGNORE_LABEL), torch.full((n, 1), -1),
                   torch.tensor(lengths), torch.tensor(ended), torch.tensor(budgets))


def test_rollout_metrics_on_a_batch_worked_by_hand():
    r = rollout_batch([[5, 6], [7]], [[3, EOS], [4, 4, 4]], [4, 3], PAD, EOS)  # labels: row 0 at 1,2; row 1 at 0..2
    k, width = 2, r.x.shape[1]
    logp = torch.log(torch.tensor([0.5, 0.25])).expand(1, 2, width, k).clone()
    idx = torch.zeros((1, 2, width, k), dtype=torch.long)
    idx[0, 0, 1] = torch.tensor([3, 9])  # the student wrote 3: the teacher's top token, p 0.5
    idx[0, 0, 2] = torch.tensor([9, EOS])  # wrote eos: the teacher's second, p 0.25
    idx[0, 1, :3] = torch.tensor([9, 8])  # wrote 4 three times: outside the teacher's top 2, p 0
    student_logits = torch.zeros((2, width, 12))
    student_logits[0, 1, 3] = student_logits[0, 2, 9] = student_logits[1, 0, 9] = 1.0  # argmax 3, 9, 9 (others 0)
    facts = rollout_metrics(r, TokenTopK(logp, idx), student_logits)
    assert facts["on_policy/response_len"] == 2.5 and facts["on_policy/eos_share"] == 0.5
    assert facts["on_policy/teacher_token_prob"] == pytest.approx((0.5 + 0.25) / 5)
    assert facts["on_policy/top1_agreement"] == pytest.approx(3 / 5)  # teacher top-1 3, 9, 9 of 3, 9, 0, 0, 0


def test_the_guard_stops_after_n_collapsed_steps_in_a_row_and_says_why():
    guard = CollapseGuard(steps=3, has_eos=True)
    capped, healthy = _rollout([4, 4], [False, False], [4, 4]), _rollout([2, 4], [True, False], [4, 4])
    assert guard.update(capped) is None and guard.update(capped) is None
    assert guard.update(healthy) is None  # a healthy step starts the count again
    assert guard.update(capped) is None and guard.update(capped) is None
    message = guard.update(capped)
    assert "3 on-policy steps in a row" in message and "max_new_tokens" in message and "lmbda" in message
    empty = CollapseGuard(steps=1, has_eos=True)
    assert "empty" in empty.update(_rollout([1, 1], [True, True], [4, 4]))  # eos first, every row
    assert CollapseGuard(1, has_eos=False).update(capped) is None  # no eos to write: full length is no collapse
    assert "no room" in CollapseGuard(1, has_eos=False).update(_rollout([0, 0], [False, False], [0, 0]))


# --- the config ----------------------------------------------------------------------------------------------

def test_on_policy_is_off_by_default_and_refused_where_it_cannot_work():
    assert _cfg().loss.on_policy.lmbda == 0.0
    with pytest.raises(ConfigError, match=r"loss\.on_policy\.lmbda.*data\.task=causal_lm"):
        raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
        config_from_dict(apply_overrides(raw, [("loss.on_policy.lmbda", 0.5)]))
    with pytest.raises(ConfigError, match=r"loss\.on_policy\.lmbda.*'llama_deep'.*another tokenizer"):
        _cfg(("loss.on_policy.lmbda", 0.5), ("teachers.llama_deep.tokenizer", "smollm2"))
    with pytest.raises(ConfigError, match=r"loss\.on_policy\.lmda.*did you mean 'lmbda'"):
        _cfg(("loss.on_policy.lmda", 0.5))


# --- end to end on Ray ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def on_policy_setup(ray_local, tmp_path_factory):
    """The tiny instruction data on SmolLM2's tokenizer (it has an eos to write), one tiny recipe teacher
    trained here, its service, the cache; a tiny student, every step on-policy (reverse KL). Both runs
    below share it. The teacher trains 5 epochs at a high rate (3e-2) so that it has something to say
    (a peaked distribution): against a near-uniform one the top-k + tail buckets carry almost no signal
    (docs/llm.md)."""
    from dataclasses import replace

    from distill_ray.pipeline import build_cache, load_data, prepare_teachers
    from distill_ray.train.inputs import online_teachers

    tmp_path = tmp_path_factory.mktemp("on_policy")
    raw = _raw(("data.tokenizer", "smollm2"), ("data.max_length", 48), ("data.max_train_samples", 160),
               ("data.max_eval_samples", 16), ("loss.topk", 16), ("blend.kind", "uniform"), ("train.epochs", 2),
               ("train.batch_size", 8), ("train.eval_every_epochs", 2), ("train.lr", 0.02),
               ("train.baseline", False), ("train.checkpoint_every_steps", 100), ("tracking.log_every_steps", 1),
               ("loss.on_policy.lmbda", 1.0), ("loss.on_policy.beta", 1.0), ("loss.on_policy.max_new_tokens", 8),
               ("run_dir", str(tmp_path / "runs")), ("cache.dir", str(tmp_path / "cache")))
    raw["teachers"] = [{**raw["teachers"][0], "options": {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "epochs": 5, "lr": 3e-2, "batch_size": 16}}]
    cfg = config_from_dict(raw)
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data)
    with online_teachers(cfg, dirs, data.info.task) as services:
        yield cfg, data, dirs, services, build_cache(cfg, data, dirs, services=services), tmp_path, replace


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_an_on_policy_run_brings_the_student_closer_to_its_teacher_on_its_own_samples(on_policy_setup):
    """Every step: the student samples responses to its batch's prompts in the Train worker, the
    teacher's service scores them, the loss is reverse KL on the response tokens. Afterwards the
    student's per-token reverse KL to the teacher on its own samples of held-out prompts is well below
    the untrained student's (4.60 -> 1.05 nats per token when written), and each step logged what it
    wrote."""
    from distill_ray.data.bundled import load_tokenizer
    from distill_ray.lm.generation import prompts_and_references, reverse_kl_on_own_samples
    from distill_ray.models import build_student, load_model
    from distill_ray.train.inputs import training_inputs
    from distill_ray.train.loop import load_trained_student, run_training

    cfg, data, dirs, services, cache, tmp_path, _ = on_policy_setup
    scored_before = sum(s["rows"] for s in services["llama_wide"].stats())
    inputs = training_inputs(cfg, cache, data.info, services=services)
    result = run_training(cfg, inputs, str(tmp_path / "ray_results"), "on_policy")
    scored = sum(s["rows"] for s in services["llama_wide"].stats()) - scored_before
    student, history, _ = load_trained_student(cfg, inputs, result.checkpoint)
    steps = [r for r in history if r.get("kind") not in ("epoch",)]
    assert len(steps) == 2 * (inputs.train_rows // 8) and all("on_policy/response_len" in r for r in steps)
    assert all(0 < r["on_policy/response_len"] <= 8 and 0 <= r["on_policy/eos_share"] <= 1 for r in steps)
    assert all(0 <= r["on_policy/top1_agreement"] <= 1 and r["kd_loss"] > 0 for r in steps)
    assert scored == 8 * len(steps), scored  # the service scored every response the student wrote

    tokenizer = load_tokenizer(data.info.tokenizer)
    test = cache.dataset("test", ["x", "label"]).take_batch(16, batch_format="numpy")
    prompts = [p for p, _ in prompts_and_references(np.stack(test["x"]), np.stack(test["label"]))]
    teacher, _ = load_model(dirs["llama_wide"])
    torch.manual_seed(cfg.train.seed)
    untrained = build_student(cfg.student, inputs.input_shape, inputs.num_classes)
    before, after = (reverse_kl_on_own_samples(m, teacher, prompts, 8, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                               cfg.data.max_length) for m in (untrained, student))
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_run_whose_responses_collapse_stops_and_says_how_to_change_it(on_policy_setup):
    """An untrained student with two new tokens per response never writes SmolLM2's eos before its
    budget: after collapse_steps such steps the run stops, and run_training raises the guard's reason."""
    from distill_ray.train.inputs import training_inputs
    from distill_ray.train.loop import TrainingStopped, run_training

    cfg, data, _, services, cache, tmp_path, replace = on_policy_setup
    cfg = replace(cfg, loss=replace(cfg.loss, on_policy=replace(cfg.loss.on_policy, max_new_tokens=2,
                                                                      collapse_steps=2)))
    inputs = training_inputs(cfg, cache, data.info, services=services)
    with pytest.raises(TrainingStopped, match=r"for 2 on-policy steps in a row every response ran to "
                                              r"loss\.on_policy\.max_new_tokens.*lmbda"):
        run_training(cfg, inputs, str(tmp_path / "ray_results"), "collapse")
