"""Text classification: Debian fortunes loading, token-id models (masking, hf_dir, hf_config), and one
small fortunes run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill_ray.data.bundled import FORTUNES_CATEGORIES, DataUnavailable, load_fortunes
from distill_ray.models import (batched_logits, build_model, forward_logits, load_model, num_params, save_model,
                                save_tokenizer)

MAX_LENGTH = 32


def _fortunes(**kwargs):
    try:
        return load_fortunes(**kwargs)
    except DataUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def small_fortunes():
    """A small, fixed, real subset of fortunes (skips with the reason if data or tokenizer is missing)."""
    return _fortunes(max_train_samples=240, max_eval_samples=60, max_length=MAX_LENGTH, split_seed=0)


def _minilm_dir():
    from distill_ray.data.bundled import minilm_path

    try:
        return minilm_path()
    except DataUnavailable as err:
        pytest.skip(str(err))


def _tiny_bert(num_labels: int = 3, vocab: int = 100, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0)
    return BertForSequenceClassification(config).eval()


# --- data -----------------------------------------------------------------------------------------

def test_the_transfer_set_is_every_other_fortune_unlabeled_and_leaves_the_labeled_splits_alone(small_fortunes):
    with_transfer = _fortunes(max_train_samples=240, max_eval_samples=60, max_length=MAX_LENGTH, split_seed=0,
                              transfer_set=True)
    base, d = small_fortunes, with_transfer
    for name in ("val", "test"):
        assert getattr(d, name).ids.tolist() == getattr(base, name).ids.tolist()
    labeled = d.train.labels >= 0
    assert sorted(d.train.ids[labeled].tolist()) == sorted(base.train.ids.tolist())
    assert 9000 < int((~labeled).sum()) < 11000 and (d.train.labels[~labeled] == -1).all()
    assert len(set(d.train.ids.tolist())) == len(d.train)
    # No transfer text is a text of the 12 categories (whichever split it sits in), nor a repeat.
    full = _fortunes(max_length=MAX_LENGTH, split_seed=0)
    categorised = {" ".join(str(t).split()) for s in (full.train, full.val, full.test) for t in s.texts}
    transfer = [" ".join(str(t).split()) for t in d.train.texts[~labeled]]
    assert not categorised & set(transfer) and len(set(transfer)) == len(transfer)


def test_fortunes_has_the_12_classes_and_disjoint_splits(small_fortunes):
    d = small_fortunes
    assert d.num_classes == 12 and d.class_names == FORTUNES_CATEGORIES
    assert set(d.train.labels.tolist()) == set(range(12))  # stratified subset keeps every class
    assert len(set(d.train.labels[:60].tolist())) >= 6  # rows are in id (hash) order, not grouped by class
    assert (len(d.train), len(d.val), len(d.test)) == (240, 60, 60)
    ids = [set(s.ids.tolist()) for s in (d.train, d.val, d.test)]
    assert all(len(i) == len(s) for i, s in zip(ids, (d.train, d.val, d.test)))
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    for s in (d.train, d.val, d.test):
        assert s.texts is not None and len(s.texts) == len(s) and all(isinstance(t, str) and t for t in s.texts)


def test_fortunes_splits_are_fixed_by_seed_and_ids_are_stable(small_fortunes):
    from distill_ray.data.bundled import text_id

    again = _fortunes(max_train_samples=240, max_eval_samples=60, max_length=MAX_LENGTH, split_seed=0)
    for a, b in zip((small_fortunes.train, small_fortunes.val, small_fortunes.test), (again.train, again.val, again.test)):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.inputs, b.inputs)
    other = _fortunes(max_train_samples=240, max_eval_samples=60, max_length=MAX_LENGTH, split_seed=1)
    assert set(other.test.ids.tolist()) != set(small_fortunes.test.ids.tolist())
    # An id is a hash of (category, text): the same sample keeps its id whatever subset or length is taken.
    s = small_fortunes.train
    for i in range(0, len(s), 40):
        assert s.ids[i] == text_id(FORTUNES_CATEGORIES[s.labels[i]], s.texts[i])
    full = _fortunes(max_length=16, split_seed=0)
    assert set(s.ids.tolist()) <= set(full.train.ids.tolist())
    assert len(full.train) + len(full.val) + len(full.test) > 5000
    assert len(set(full.train.texts) | set(full.val.texts) | set(full.test.texts)) == \
        len(full.train) + len(full.val) + len(full.test)  # deduplicated


def test_fortunes_token_ids_are_int64_right_padded_with_pad_id(small_fortunes):
    d = small_fortunes
    assert d.input_shape == (MAX_LENGTH,) and d.pad_id == 0 and d.tokenizer
    for s in (d.train, d.val, d.test):
        x = s.inputs
        assert x.dtype == np.int64 and x.shape == (len(s), MAX_LENGTH)
        assert (x[:, 0] == 101).all()  # [CLS]
        real = x != d.pad_id
        lengths = real.sum(1)
        assert (real == (np.arange(MAX_LENGTH)[None, :] < lengths[:, None])).all()  # no pad before a token
        assert (x[np.arange(len(x)), lengths - 1] == 102).all()  # [SEP] ends every (truncated) text
    assert (d.train.inputs == 0).any()  # some texts are shorter than MAX_LENGTH


# --- models ---------------------------------------------------------------------------------------

def test_forward_logits_masks_padding_like_an_unpadded_forward():
    model = _tiny_bert()
    lengths = [5, 9, 3, 7]
    rows = [torch.randint(1, 100, (n,)) for n in lengths]
    padded = torch.zeros(len(rows), 16, dtype=torch.long)  # wider than any row: trailing pad columns too
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    with torch.no_grad():
        batch = forward_logits(model, padded)
        alone = torch.cat([model(input_ids=r[None]).logits for r in rows])
        sorted_batches = batched_logits(model, padded, batch_size=2)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sorted_batches, alone, atol=1e-5, rtol=1e-5)


def test_text_cnn_ignores_padding():
    torch.manual_seed(0)
    model = build_model("text_cnn", (16,), 4, {"vocab_size": 100, "embed_dim": 8, "filters": 4}).eval()
    x = torch.randint(1, 100, (3, 6))
    wide = torch.cat([x, torch.zeros(3, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, wide), forward_logits(model, x))


def test_load_model_reads_a_plain_hf_directory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _tiny_bert(num_labels=5)
    model.save_pretrained(tmp_path / "cls")
    assert not (tmp_path / "cls" / "distill_spec.json").exists()
    loaded, spec = load_model(tmp_path / "cls")
    assert type(loaded).__name__ == "BertForSequenceClassification" and not loaded.training
    assert spec["source"] == "hf_dir" and spec["num_classes"] == 5
    x = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(model, x))

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "lm")
    lm, spec = load_model(tmp_path / "lm")
    assert type(lm).__name__ == "GPT2LMHeadModel" and spec["task"] == "causal_lm"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "nothing")


def test_hf_config_student_round_trips_through_from_pretrained(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    options = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": MAX_LENGTH}
    torch.manual_seed(0)
    student = build_model("hf_config", (MAX_LENGTH,), 12, options).eval()
    assert student.config.vocab_size == 30522 and student.config.num_labels == 12
    save_model(student, tmp_path, {"arch": "hf_config", "input_shape": [MAX_LENGTH], "num_classes": 12,
                                   "options": options})
    assert {"config.json", "model.safetensors", "distill_spec.json"} <= {p.name for p in tmp_path.iterdir()}
    x = torch.randint(1, 30522, (3, MAX_LENGTH))
    x[0, 10:] = 0
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ours, spec = load_model(tmp_path)
    with torch.no_grad():
        expected = forward_logits(student, x)
        torch.testing.assert_close(forward_logits(hf, x), expected, atol=0, rtol=0)
        torch.testing.assert_close(forward_logits(ours, x), expected, atol=0, rtol=0)
    assert spec["family"] == "transformers"

    save_tokenizer(_minilm_dir(), tmp_path, max_length=MAX_LENGTH)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tok.model_max_length == MAX_LENGTH and tok.pad_token_id == 0
    assert len(tok("word " * 100, truncation=True)["input_ids"]) == MAX_LENGTH


def test_fortunes_example_student_is_under_a_tenth_of_minilm():
    import yaml
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs/configs/fortunes_text.yaml").read_text())
    student = build_model(raw["student"]["arch"], (raw["data"]["max_length"],), 12, raw["student"]["options"])
    minilm_params = 22_717_836  # all-MiniLM-L6-v2 with a 12-way head
    assert num_params(student) * 10 <= minilm_params


def test_hf_config_init_embeddings_from_minilm_pca():
    from distill_ray.models import minilm_embeddings_pca

    _minilm_dir()
    options = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
               "init_embeddings": "minilm"}
    model = build_model("hf_config", (MAX_LENGTH,), 12, options)
    pca = minilm_embeddings_pca(16)
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), pca)
    assert pca.shape == (30522, 16) and pca.std() > 0
    with pytest.raises(ValueError, match="only 'minilm'"):
        build_model("hf_config", (MAX_LENGTH,), 12, {**options, "init_embeddings": "glove"})


def test_encoder_param_groups_freeze_all_but_the_top_layers():
    from distill_ray.teachers.recipes import encoder_param_groups

    model = _tiny_bert()
    groups = encoder_param_groups(model, 5e-5, head_lr=1e-3, train_top_layers=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("bert.embeddings", "bert.encoder.layer.0.")) for n in frozen)
    assert [g["lr"] for g in groups] == [5e-5, 1e-3]
    head = {id(p) for p in groups[1]["params"]}
    assert id(model.classifier.weight) in head and id(model.bert.pooler.dense.weight) in head


# --- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_fortunes_run_end_to_end(ray_local, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill_ray.config import config_from_dict
    from distill_ray.pipeline import load_data, run_experiment

    tiny_bert = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "max_position_embeddings": MAX_LENGTH}
    cfg = config_from_dict({
        "name": "fortunes_tiny", "run_dir": str(tmp_path / "runs"),
        "data": {"format": "fortunes", "max_length": MAX_LENGTH, "max_train_samples": 300, "max_eval_samples": 96,
                 "transfer": "none"},
        "teachers": [
            {"name": "bert", "source": "recipe", "recipe": "hf_config", "path": str(tmp_path / "t/bert"),
             "options": {**tiny_bert, "epochs": 3, "lr": 2e-3, "batch_size": 32}, "num_cpus": 0.25},
            {"name": "cnn", "source": "recipe", "recipe": "text_cnn", "path": str(tmp_path / "t/cnn"),
             "options": {"minilm_embeddings": True, "freeze_embeddings": True, "filters": 16, "epochs": 4,
                         "batch_size": 32}, "num_cpus": 0.25}],
        "student": {"arch": "hf_config", "options": {"hidden_size": 16, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "intermediate_size": 32,
                                                     "max_position_embeddings": MAX_LENGTH}},
        "loss": {"kind": "forward_kl", "temperature": 2.0, "alpha": 0.7},
        "blend": {"kind": "learned_global"},
        "curriculum": {"scheduler": "multi_stage", "num_stages": 2, "stage_temperatures": [1.0, 2.0]},
        "train": {"epochs": 4, "batch_size": 32, "lr": 5e-3, "checkpoint_every_steps": 50, "baseline": False},
        "cache": {"dir": str(tmp_path / "cache")},
        "tracking": {"log_every_steps": 5},
    })
    metrics = run_experiment(cfg)
    run_dir = cfg.run_path()
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert set(on_disk["teachers"]) == {"bert", "cnn"}
    assert on_disk["student"] > 1 / 12 and on_disk["teachers"]["cnn"] > 1 / 12
    student_dir = run_dir / "student"
    assert (student_dir / "distill_spec.json").is_file() and (student_dir / "tokenizer_config.json").is_file()
    hf = AutoModelForSequenceClassification.from_pretrained(str(student_dir), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(student_dir), local_files_only=True)
    test = load_data(cfg).test.to_pandas().sort_values("id")
    test_x, test_y = np.stack(test["x"].to_numpy()), test["label"].to_numpy()
    with torch.no_grad():
        predicted = batched_logits(hf, torch.as_tensor(test_x)).argmax(-1).numpy()
    assert np.mean(predicted == test_y) == pytest.approx(metrics["student"], abs=1e-6)
    # The saved tokenizer turns raw text into the same ids the run trained on.
    from distill_ray.data.bundled import load_fortunes

    ref = load_fortunes(max_length=MAX_LENGTH, max_train_samples=300, max_eval_samples=96).test
    order = np.argsort(ref.ids)[:4]
    enc = tok(list(ref.texts[order]), padding="max_length", truncation=True)
    np.testing.assert_array_equal(np.asarray(enc["input_ids"]), test_x[:4])
