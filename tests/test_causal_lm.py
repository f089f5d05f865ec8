"""Causal-LM distillation: per-token top-k targets, the label log-prob blend, the corpus, the whole run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_ray.kd.blending import TeacherBlend
from distill_ray.config import ConfigError, apply_overrides, config_from_dict
from distill_ray.kd.losses import dense_from_topk, kd_divergence, teacher_topk, topk_label_logprobs

REPO = Path(__file__).resolve().parents[1]
LM_WINDOW = 16  # tokens per window in the Ray runs (tiny_lm.yaml has 32)


def _tiny_lm_raw(root: Path | None = None) -> dict:
    """jobs/configs/tiny_lm.yaml; with ``root``, as the Ray runs below use it: paths under ``root``, and
    16-token windows instead of 32. Every cost of these runs (teacher training, the cache, student and
    baseline steps) goes with tokens x the 30522-word vocabulary; half the tokens per window keeps
    every optimizer step and row count the same."""
    import yaml

    raw = yaml.safe_load((REPO / "jobs/configs/tiny_lm.yaml").read_text())
    if root is not None:
        raw = apply_overrides(raw, [("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache")),
                                    ("teachers.0.path", str(root / "teachers/wide")),
                                    ("teachers.1.path", str(root / "teachers/deep")),
                                    ("data.max_length", LM_WINDOW)])
    return raw


# --- pure tensor functions --------------------------------------------------------------------------

def test_topk_label_logprobs_equal_the_dense_rebuild_inside_and_outside_the_top_k():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50)
    logp, idx = teacher_topk(logits, 8)
    labels = torch.randint(0, 50, (3, 5))
    labels[0, 0] = idx[0, 0, 0]  # certainly inside the top k
    labels[2, 4] = -100  # ignored
    dense = dense_from_topk(logp, idx, 50)
    expected = dense.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).masked_fill(labels < 0, 0.0)
    got = topk_label_logprobs(logp, idx, labels, 50)
    assert torch.allclose(got, expected, atol=1e-5)
    full = topk_label_logprobs(*teacher_topk(logits, 50), labels, 50)
    exact = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(full[labels >= 0], exact[labels >= 0], atol=1e-5)


def test_label_logprob_weight_loss_equals_the_full_logit_weight_loss():
    torch.manual_seed(1)
    teacher_logits = torch.randn(3, 40, 12)
    labels = torch.randint(0, 12, (40,))
    full, sparse = TeacherBlend("learned_global", 3), TeacherBlend("learned_global", 3)
    with torch.no_grad():
        full.global_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
        sparse.global_logits.copy_(full.global_logits)
    label_logp = torch.log_softmax(teacher_logits, -1).gather(-1, labels.view(1, -1, 1).expand(3, -1, 1)).squeeze(-1)
    a, b = full.weight_loss(teacher_logits, labels), sparse.weight_loss_from_label_logprobs(label_logp)
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert torch.allclose(full.global_logits.grad, sparse.global_logits.grad, atol=1e-6)
    with pytest.raises(ValueError, match="uniform or learned_global"):
        TeacherBlend("confidence", 3).weight_loss_from_label_logprobs(label_logp)


def test_token_kd_loss_gradient_equals_forward_kl_to_the_mixture():
    """The weighted sum of per-teacher forward KLs moves the student exactly like KL to the blend."""
    from distill_ray.kd.objectives import TokenTopK, token_kd_loss

    torch.manual_seed(2)
    V, B, L = 30, 2, 4
    teacher_logits = torch.randn(2, B, L, V)
    topk = teacher_topk(teacher_logits, V)
    labels = torch.randint(0, V, (B, L))
    blend = TeacherBlend("learned_global", 2)
    with torch.no_grad():
        blend.global_logits.copy_(torch.tensor([1.0, -0.5]))
    w = torch.softmax(blend.global_logits.detach(), -1)
    cfg = config_from_dict(apply_overrides(_tiny_lm_raw(), [("loss.temperature", 1.0)]))

    student = torch.randn(B, L, V, requires_grad=True)
    kd = token_kd_loss(cfg, blend, student, TokenTopK(*topk), labels, temperature=1.0)
    kd.backward()
    grad_sum = student.grad.clone()

    student.grad = None
    mixture = torch.einsum("k,kblv->blv", w, torch.softmax(teacher_logits, -1))
    kd_divergence(student, torch.log(mixture), kind="forward_kl", temperature=1.0).backward()
    assert torch.allclose(grad_sum, student.grad, atol=1e-6)


def test_token_kd_loss_on_the_trained_positions_only_equals_the_masked_full_computation():
    """Prompt/padding labels (-100) and a teacher's unaligned positions (NaN) are left out before the
    vocabulary-wide math: the loss and the student's gradient are those of each teacher's divergence
    over every position with its mask, and masked positions get exactly zero gradient."""
    from distill_ray.kd.losses import topk_kd_divergence
    from distill_ray.kd.objectives import TokenTopK, token_kd_loss

    torch.manual_seed(3)
    V, B, L, k = 40, 3, 6, 5
    logp, idx = teacher_topk(torch.randn(2, B, L, V), k)
    logp[1, 0, 1:3] = float("nan")  # the second teacher has no answer there (another tokenizer)
    labels = torch.randint(0, V, (B, L))
    labels[:, :2], labels[2, 4:] = -100, -100  # prompt and padding
    blend = TeacherBlend("learned_global", 2)
    with torch.no_grad():
        blend.global_logits.copy_(torch.tensor([0.3, -0.2]))
    w = torch.softmax(blend.global_logits.detach(), -1)
    cfg = config_from_dict(apply_overrides(_tiny_lm_raw(), [("loss.kind", "reverse_kl")]))

    student = torch.randn(B, L, V, requires_grad=True)
    kd = token_kd_loss(cfg, blend, student, TokenTopK(logp, idx), labels, temperature=2.0)
    kd.backward()
    fast = student.grad.clone()
    student.grad = None
    aligned = ~torch.isnan(logp[..., 0])
    reference = sum(w[t] * topk_kd_divergence(student, torch.nan_to_num(logp[t], nan=-math.log(k)), idx[t],
                                              kind="reverse_kl", temperature=2.0, mask=(labels >= 0) & aligned[t])
                    for t in range(2))
    reference.backward()
    assert torch.allclose(kd, reference, atol=1e-6)
    assert torch.allclose(fast, student.grad, atol=1e-7)
    assert fast[labels < 0].abs().max() == 0


# --- data and config --------------------------------------------------------------------------------

def test_python_corpus_windows_are_next_token_pairs_and_splits_are_disjoint():
    from distill_ray.data.bundled import DataUnavailable, load_python_corpus

    try:
        d = load_python_corpus(max_train_samples=200, max_eval_samples=50, max_length=16)
    except DataUnavailable as err:
        pytest.skip(str(err))
    assert d.task == "causal_lm" and d.num_classes == 30522 and d.input_shape == (16,)
    for split in (d.train, d.val, d.test):
        assert split.inputs.shape == split.labels.shape and split.inputs.shape[1] == 16
        assert np.array_equal(split.labels[:, :-1], split.inputs[:, 1:])  # label t is input t + 1
    ids = [set(s.ids.tolist()) for s in (d.train, d.val, d.test)]
    assert len(ids[0]) == 200 and not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    again = load_python_corpus(max_train_samples=200, max_eval_samples=50, max_length=16)
    assert np.array_equal(again.train.inputs, d.train.inputs)


@pytest.mark.parametrize("override, key, words", [
    (("loss.topk", None), "loss.topk", "top-k"),
    (("blend.kind", "confidence"), "blend.kind", "uniform, learned_global"),
    (("loss.kind", "mse_logits"), "loss.kind", "forward_kl"),
    (("curriculum.measurers", ["ensemble_entropy"]), "curriculum.measurers", "teacher_ce"),
    (("curriculum.scheduler", "confidence"), "curriculum.scheduler", "multi_stage"),
    (("student.arch", "mlp"), "student.arch", "hf_causal_lm"),
    (("data.task", "classification"), "data.task", "causal_lm"),
])
def test_causal_lm_config_errors_name_the_key_and_the_choices(override, key, words):
    raw = apply_overrides(_tiny_lm_raw(), [override])
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert key in str(err.value) and words in str(err.value)


# --- the whole run on a real local Ray --------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_teachers_root(tmp_path_factory):
    """Where this module's tiny LM teachers live: trained by the first run, reused by the next."""
    return tmp_path_factory.mktemp("tiny_lm_teachers")


def _with_teachers_in(raw: dict, root: Path) -> dict:
    return apply_overrides(raw, [("teachers.0.path", str(root / "wide")), ("teachers.1.path", str(root / "deep"))])


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_lm_run_distils_and_reports_perplexity(ray_local, tmp_path, lm_teachers_root):
    from distill_ray.data.bundled import DataUnavailable
    from distill_ray.evaluation.metrics import lm_label_logprobs, perplexity
    from distill_ray.models import build_model, load_model, num_params
    from distill_ray.pipeline import load_data, run_experiment

    # No baseline here: an LM student trained from the labels alone is the ablation's scratch row
    # (tests/test_ablation.py runs it), and it would be a second Ray Train run in this test. The
    # student is cut from llama_deep (its last layer of 3) and trained from there.
    cfg = config_from_dict(apply_overrides(_with_teachers_in(_tiny_lm_raw(tmp_path), lm_teachers_root),
                                           [("train.baseline", False), ("student.init.teacher", "llama_deep"),
                                            ("student.init.layers", [2])]))
    try:
        data = load_data(cfg)
    except DataUnavailable as err:
        pytest.skip(str(err))
    metrics = run_experiment(cfg)
    run_dir = cfg.run_path()
    test = data.test.to_pandas()
    test_x, test_y = np.stack(test["x"].to_numpy()), np.stack(test["label"].to_numpy())

    assert metrics["metric"] == "perplexity" and metrics["num_test"] == len(test)
    for key in ("student", "teachers", "blend", "teacher_weights", "params", "timings", "token_accuracy"):
        assert key in metrics, key
    # Every model is far better than uniform guessing over the 30522-token vocabulary.
    for name, ppl in [("student", metrics["student"]), *metrics["teachers"].items()]:
        assert 1.0 < ppl < 5000, (name, ppl)
    # The student trained from the cut it started as (RUN_DIR/student_init), and beats it, recomputed here.
    cut = metrics["student_init"]
    assert (cut["teacher"], cut["layers"], cut["teacher_layers"]) == ("llama_deep", [2], 3)
    start, _ = load_model(run_dir / "student_init")
    exported, _ = load_model(run_dir / "student")
    assert exported.config.num_hidden_layers == start.config.num_hidden_layers == 1
    assert num_params(exported) == cut["params"] == metrics["params"]["student"] < cut["teacher_params"]
    logp_student, _ = lm_label_logprobs(exported, test_x, test_y)
    assert perplexity(logp_student, test_y) == pytest.approx(metrics["student"], rel=1e-4)
    # Training moved the cut's weights and kept what it knew: a 1-layer student of the config's own
    # arch, untrained, is >10x worse; the cut ends no worse than it started.
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), exported.state_dict().values()))
    logp_start, _ = lm_label_logprobs(start, test_x, test_y)
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.student.arch, data.info.input_shape, data.info.num_classes, cfg.student.options)
    logp_untrained, _ = lm_label_logprobs(untrained, test_x, test_y)
    assert metrics["student"] < perplexity(logp_untrained, test_y) / 10
    assert metrics["student"] <= 1.02 * perplexity(logp_start, test_y)
    assert "Student cut from llama_deep: layers [2] of its 3" in (run_dir / "report.md").read_text()
    # The learned blend puts more weight on the teacher with the lower test perplexity.
    better = min(metrics["teachers"], key=metrics["teachers"].get)
    assert metrics["teacher_weights"][better] > 0.5
    # Per-epoch validation perplexity falls, and the report names the metric.
    history = json.loads((run_dir / "history.json").read_text())
    val = [r["val_perplexity"] for r in history if r.get("kind") == "epoch"]
    assert len(val) == cfg.train.epochs and val[-1] < val[0]
    assert "perplexity" in (run_dir / "report.md").read_text()
    # `distill-ray eval` scores the exported student to the same perplexity.
    import contextlib
    import io

    from distill_ray.cli import main

    config_path = tmp_path / "config.yaml"
    config_path.write_text((run_dir / "config.yaml").read_text())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(run_dir), "--data", str(config_path)]) == 0
    assert json.loads(out.getvalue())["perplexity"] == pytest.approx(metrics["student"], rel=1e-4)
    assert (run_dir / "student" / "config.json").is_file() and (run_dir / "student" / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_lm_online_mode_streams_through_the_teacher_stages(ray_local, tmp_path, lm_teachers_root):
    from distill_ray.data.bundled import DataUnavailable
    from distill_ray.pipeline import load_data, prepare_teachers, training_inputs
    from distill_ray.train.inputs import online_teachers
    from distill_ray.lm.cut import student_from_teacher
    from distill_ray.models import num_params
    from distill_ray.train.loop import load_trained_student, run_training

    # The student is cut from llama_deep (layers 0 and 2 of its 3): the cut is what the worker trains.
    raw = apply_overrides(_with_teachers_in(_tiny_lm_raw(tmp_path), lm_teachers_root), [
        ("train.mode", "online"), ("train.epochs", 1), ("data.max_train_samples", 192),
        ("student.init.teacher", "llama_deep"), ("student.init.keep_every", 2)])
    cfg = config_from_dict(raw)
    try:
        data = load_data(cfg)
    except DataUnavailable as err:
        pytest.skip(str(err))
    dirs = prepare_teachers(cfg, data)
    with pytest.raises(ValueError, match="student.init"):  # a config that skipped the cut is refused
        run_training(cfg, None, str(tmp_path / "ray"), "uncut")
    cfg, cut = student_from_teacher(cfg, dirs, tmp_path / "student_init")
    assert cut["layers"] == [0, 2] and cut["teacher_layers"] == 3 and cut["params"] < cut["teacher_params"]
    answered = tmp_path / "answered.txt"
    with online_teachers(cfg, dirs, data.info.task, trace_file=str(answered)) as services:
        inputs = training_inputs(cfg, data, data.info, services=services)  # online: no cache needed
        assert inputs.online_teachers and not inputs.keep_shard
        result = run_training(cfg, inputs, str(tmp_path / "ray"), "online")
    student, history, state = load_trained_student(cfg, inputs, result.checkpoint)
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 64  # llama_deep's width
    assert num_params(student) == cut["params"]
    # Each teacher was loaded once, by its service, for the training and the validation streams.
    loads = Path(f"{answered}.loads").read_text().split()[::2]
    assert sorted(loads) == sorted(cfg.teacher_names())
    train_ids = set(data.train.select_columns(["id"]).to_pandas()["id"].tolist())
    served: dict[str, list[int]] = {}
    for line in answered.read_text().splitlines():
        name, ids, _pid = line.split(" ")
        served.setdefault(name, []).extend(i for i in map(int, ids.split(",")) if i in train_ids)
    # Stage 0 of 2 opens half the windows: each teacher answered every open window once, per token.
    n = data.info.counts["train"]
    assert {name: sorted(set(ids)) == sorted(ids) and len(ids) for name, ids in served.items()} == \
        {name: -(-n // 2) for name in cfg.teacher_names()}
    assert state["step"] == n // 2 // cfg.train.batch_size
    epoch_row = [r for r in history if r.get("kind") == "epoch"][-1]
    assert np.isfinite(epoch_row["val_perplexity"]) and 0 < epoch_row["val_accuracy"] < 1
    steps = [r for r in history if r.get("kind") != "epoch"]
    assert steps and all(r["kd_loss"] > 0 and "teacher_weight/llama_deep" in r for r in steps)
    # Without a cache, validation streams through the teacher stages too: agreement is measured.
    assert all(0 < epoch_row[f"agreement/{name}"] <= 1 for name in cfg.teacher_names())


def test_the_cache_stage_reads_a_teachers_columns_handed_over_as_per_row_arrays():
    """Ray Data hands a tensor column over as an object array of per-row arrays when it concatenated
    blocks of different tensor types (seen with sequence KD and a teacher with its own tokenizer: the
    first teacher's top-k came through the second's stage that way, and the cache build failed). The
    cache stage stores the same numbers as from one dense array."""
    from distill_ray.cache.build import finish_rows

    rng = np.random.default_rng(0)
    n, length, k, vocab = 3, 6, 4, 50
    logp = np.log(rng.dirichlet(np.ones(k + 1), size=(n, length))[..., :k]).astype(np.float16)
    idx = np.stack([np.stack([rng.choice(vocab, k, replace=False) for _ in range(length)]) for _ in range(n)])
    labels = np.where(np.arange(length) < 2, -1, rng.integers(0, vocab, (n, length)))

    def per_row(a):
        out = np.empty(len(a), dtype=object)
        for i, row in enumerate(a):
            out[i] = row
        return out

    x = rng.integers(1, vocab, (n, length))

    def batch(wrap):
        return {"x": x.copy(), "label": labels.copy(), "t/topk_logprobs": wrap(logp.copy()), "t/topk_indices": wrap(idx.astype(np.int32))}

    dense = finish_rows(batch(lambda a: a), ("t",), "float16", k, vocab, True, 0)
    rows = finish_rows(batch(per_row), ("t",), "float16", k, vocab, True, 0)
    assert dense.keys() == rows.keys()
    for key in dense:
        np.testing.assert_array_equal(np.asarray(rows[key]), np.asarray(dense[key]), err_msg=key)
