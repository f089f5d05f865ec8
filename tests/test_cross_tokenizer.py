"""Teachers with another tokenizer, in the product: the config keys, the teacher's answer for the
student's positions, the loss masking what did not align, and one tiny run on a real local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill_ray.config import ConfigError, apply_overrides, config_from_dict

REPO = Path(__file__).resolve().parents[1]


def _tiny_lm_raw() -> dict:
    import yaml

    return yaml.safe_load((REPO / "jobs/configs/tiny_lm.yaml").read_text())


def _cross_raw(teacher_path: str = "/nonexistent/teacher", **loss) -> dict:
    raw = _tiny_lm_raw()
    raw["teachers"] = [{"name": "wp_teacher", "source": "torch_checkpoint", "path": teacher_path,
                        "tokenizer": "minilm", "num_cpus": 0.5}]
    raw["data"] = {**raw["data"], "tokenizer": "smollm2"}
    raw["loss"] = {**raw["loss"], **loss}
    return raw


@pytest.mark.parametrize("edit, key, words", [
    (lambda r: r["loss"].update(cross_tokenizer="sorted"), "loss.cross_tokenizer", "map, uld"),
    (lambda r: r["loss"].update(cross_tokenizer="uld"), "blend.kind", "uniform"),
    (lambda r: r.update(data={"format": "fortunes", "tokenizer": "minilm"}, student={"arch": "mlp"},
                        loss={"topk": None}, blend={"kind": "uniform"}, curriculum={"scheduler": "none"}),
     "teachers[0].tokenizer", "causal_lm"),
])
def test_cross_tokenizer_config_errors_name_the_key_and_the_choices(edit, key, words):
    raw = _cross_raw()
    edit(raw)
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert key in str(err.value) and words in str(err.value)
    ok = config_from_dict(apply_overrides(_cross_raw(cross_tokenizer="uld"), [
        ("blend.kind", "uniform"), ("curriculum.scheduler", "none")]))
    assert ok.teachers[0].tokenizer == "minilm" and ok.loss.cross_tokenizer == "uld"


def test_a_recipe_teacher_may_have_a_tokenizer_of_its_own():
    """It trains on the data tokenized its way (teacher_setup.teacher_data), so the config takes it."""
    raw = _cross_raw()
    raw["teachers"][0].update(source="recipe", recipe="hf_causal_lm", path=None)
    cfg = config_from_dict(raw)
    assert (cfg.teachers[0].source, cfg.teachers[0].tokenizer, cfg.data.tokenizer) == ("recipe", "minilm", "smollm2")


def _tiny_llama(vocab: int, seed: int = 0):
    from distill_ray.models import causal_lm_model

    torch.manual_seed(seed)
    return causal_lm_model(vocab, {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "intermediate_size": 32}).eval()


def test_a_teacher_on_the_students_own_tokenizer_through_the_cross_path_answers_as_it_does_directly():
    """Same tokenizer on both sides: the cross-tokenizer answer is the teacher's own per-token top-k at
    every position but the last, which (without its label) has no next token to align."""
    import textwrap

    from distill_ray.teachers.cross_tokenizer import CrossTokenizerTeacher
    from distill_ray.data.bundled import DataUnavailable, resolve_tokenizer
    from distill_ray.kd.losses import teacher_topk

    try:
        minilm = str(resolve_tokenizer("minilm"))
    except DataUnavailable as err:
        pytest.skip(str(err))
    cross = CrossTokenizerTeacher(minilm, minilm, "map", k=8)
    rows = [cross.student_tok(textwrap.dedent(f.__doc__), add_special_tokens=False)["input_ids"][:24]
            for f in (textwrap.dedent, textwrap.indent, str.split)]
    x = np.array(rows)
    model = _tiny_llama(cross.student.vocab_size)
    out = cross.answer(model, x, None, torch.device("cpu"))
    with torch.no_grad():
        logp, idx = teacher_topk(model(torch.as_tensor(x)).logits, 8)
    assert np.isnan(out["topk_logprobs"][:, -1]).all() and not np.isnan(out["topk_logprobs"][:, :-1]).any()
    assert np.array_equal(out["topk_indices"][:, :-1], idx[:, :-1].numpy())
    # float16, as every teacher's top-k travels: within one step (1/128 near -10) of the float32 numbers
    assert np.allclose(out["topk_logprobs"][:, :-1], logp[:, :-1].numpy(), atol=8e-3)
    # With the labels, the last position's next token is known: everything aligns.
    labels = np.concatenate([x[:, 1:], x[:, :1]], axis=1)
    out = cross.answer(model, x, labels, torch.device("cpu"))
    assert not np.isnan(out["topk_logprobs"]).any() and cross.aligned == cross.positions == x.size


def test_unaligned_positions_are_masked_out_of_the_token_kd_loss_and_give_no_nan_gradient():
    from distill_ray.kd.blending import TeacherBlend
    from distill_ray.kd.losses import teacher_topk
    from distill_ray.kd.objectives import TokenTopK, token_kd_loss

    torch.manual_seed(0)
    V, B, L = 40, 2, 6
    cfg = config_from_dict(apply_overrides(_cross_raw(), [("loss.topk", 8), ("blend.kind", "uniform")]))
    labels = torch.randint(0, V, (B, L))
    logp, idx = teacher_topk(torch.randn(1, B, L, V), 8)
    unaligned = torch.zeros(B, L, dtype=torch.bool)
    unaligned[0, 2] = unaligned[1, 5] = True
    holed = logp.masked_fill(unaligned.view(1, B, L, 1), float("nan"))
    student = torch.randn(B, L, V, requires_grad=True)
    kd = token_kd_loss(cfg, TeacherBlend("uniform", 1), student, TokenTopK(holed, idx), labels, 1.0)
    (grad,) = torch.autograd.grad(kd, student)
    assert torch.isfinite(grad).all() and grad[unaligned].abs().max() == 0
    masked_labels = labels.masked_fill(unaligned, -100)
    expected = token_kd_loss(cfg, TeacherBlend("uniform", 1), student, TokenTopK(logp, idx), masked_labels, 1.0)
    assert kd.item() == pytest.approx(expected.item(), rel=1e-6)
    assert TokenTopK(holed, idx).aligned_share(labels) == pytest.approx(10 / 12)
    # ULD for the same teacher: finite, masked alike.
    uld_cfg = config_from_dict(apply_overrides(_cross_raw(), [("loss.topk", 8), ("blend.kind", "uniform"),
                                                              ("loss.cross_tokenizer", "uld"),
                                                              ("curriculum.scheduler", "none")]))
    uld = token_kd_loss(uld_cfg, TeacherBlend("uniform", 1), student, TokenTopK(holed, idx), labels, 1.0)
    (grad,) = torch.autograd.grad(uld, student)
    assert uld.item() > 0 and torch.isfinite(grad).all() and grad[unaligned].abs().max() == 0


# --- one tiny run on a real local Ray -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_a_wordpiece_teacher_teaches_a_smollm2_student_through_the_cache(ray_local, tmp_path, mode="map"):
    """A tiny Llama recipe teacher with MiniLM's WordPiece tokenizer of its own, trained here on the
    data's train windows tokenized its way, teaches a tiny Llama student that reads SmolLM2's byte-level
    BPE: the recipe has the WordPiece vocabulary and tokenizer, the cache holds its targets on the
    student's positions and vocabulary, most labeled positions align, the carried top-1 is often the
    student's true next token (map), and the student's KD loss falls. (``uld`` takes the same path to the
    cache; its loss is tested above: one run keeps this test near half a minute.)"""
    import json

    from distill_ray.data.bundled import load_tokenizer
    from distill_ray.pipeline import build_cache, load_data, prepare_teachers
    from distill_ray.train.inputs import training_inputs
    from distill_ray.train.loop import load_trained_student, run_training

    raw = apply_overrides(_cross_raw(cross_tokenizer=mode, topk=8), [
        ("data.max_length", 16), ("data.max_train_samples", 256), ("data.max_eval_samples", 16),
        ("blend.kind", "uniform"), ("curriculum.scheduler", "none"), ("curriculum.measurers", ["sequence_length"]),
        ("train.epochs", 1), ("train.batch_size", 32), ("train.baseline", False), ("tracking.log_every_steps", 1),
        ("run_dir", str(tmp_path / "runs")), ("cache.dir", str(tmp_path / "cache"))])
    raw["teachers"][0].update(source="recipe", recipe="hf_causal_lm", path=str(tmp_path / "teacher"), options={
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "epochs": 2, "lr": 1e-2, "batch_size": 32})
    cfg = config_from_dict(raw)
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data)
    spec = json.loads((tmp_path / "teacher" / "distill_spec.json").read_text())
    wordpiece, bpe = load_tokenizer(str(tmp_path / "teacher")), load_tokenizer(data.info.tokenizer)
    # trained on WordPiece ids: MiniLM's vocabulary (30,522), not the student's (49,152), and its tokenizer
    assert spec["num_classes"] == len(wordpiece) == 30522 and data.info.num_classes == len(bpe) == 49152
    assert wordpiece.tokenize("def add(a, b):") == ["def", "add", "(", "a", ",", "b", ")", ":"]
    cache = build_cache(cfg, data, dirs)
    rows = cache.dataset("train").to_pandas()
    logp = np.stack([np.stack(v) for v in rows["wp_teacher/topk_logprobs"]])
    idx = np.stack([np.stack(v) for v in rows["wp_teacher/topk_indices"]])
    labels = np.stack(rows["label"].to_numpy())
    aligned = ~np.isnan(logp[..., 0])
    share = aligned[labels >= 0].mean()
    assert 0.6 < share < 1.0, share  # python source: "):" and the like have no WordPiece token starting there
    if mode == "map":  # the carried top-1 of this weak teacher (one layer, two epochs) names the student's
        # true next token ~1000x more often than chance (1 / 49152); it was 0.046 when written
        hit = (idx[..., 0] == labels)[aligned & (labels >= 0)].mean()
        assert hit > 0.02, hit
    else:  # sorted: each aligned position's k log-probs descend
        assert (np.diff(logp[aligned], axis=-1) <= 1e-3).all()
    inputs = training_inputs(cfg, cache, data.info)
    result = run_training(cfg, inputs, str(tmp_path / "ray"), mode)
    _, history, _ = load_trained_student(cfg, inputs, result.checkpoint)
    steps = [r for r in history if r.get("kind") != "epoch"]
    # per batch of 32 windows: 0.59-0.65 when written on 400 windows (they align less than the first 64 did)
    assert all(0.5 < r["aligned_share"] < 1.0 for r in steps), [r.get("aligned_share") for r in steps]
    first, last = np.mean([r["kd_loss"] for r in steps[:2]]), np.mean([r["kd_loss"] for r in steps[-2:]])
    assert last < first, (first, last)
