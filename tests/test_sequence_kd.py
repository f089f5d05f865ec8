"""Sequence-level KD: teacher rows built like references (labels on the response only, unique ids),
seeded sampling that no batching changes, the config's checks, the responses cache's verification,
and (Ray) responses generated once and reused without a single ``generate`` call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from distill_ray.config import ConfigError, apply_overrides, config_from_dict
from distill_ray.lm.sequence_kd import (REFERENCE, TEACHER, Decoding, generate_responses, pack_row, prompt_of,
                                     reference_columns, row_seed, rows_from, teacher_rows, window_budget)
from distill_ray.data.rows import IGNORE_LABEL

REPO = Path(__file__).resolve().parents[1]


def _instruct_raw(*overrides) -> dict:
    raw = yaml.safe_load((REPO / "jobs/configs/tiny_instruct.yaml").read_text())
    return apply_overrides(raw, overrides)


def _tiny_lm(vocab: int = 50, seed: int = 0):
    from distill_ray.models import causal_lm_model, freeze

    torch.manual_seed(seed)
    return freeze(causal_lm_model(vocab, {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "intermediate_size": 64}))


def _prompts(n: int = 7, vocab: int = 50) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (n,), generator=g)]


# --- rows -------------------------------------------------------------------------------------------

def test_a_reference_repacked_from_its_prompt_and_response_is_the_same_row(tmp_path):
    """pack_row has preprocess.instruction_rows' layout: split an instruction row into prompt and reference
    and pack them again, and the row comes back bit for bit (long ones cut alike)."""
    from transformers import AutoTokenizer

    from distill_ray.data.bundled import resolve_tokenizer
    from distill_ray.lm.generation import prompts_and_references
    from distill_ray.data.preprocess import instruction_rows

    tok = AutoTokenizer.from_pretrained(resolve_tokenizer("minilm"), local_files_only=True)
    tok.eos_token = "[SEP]"
    tok.save_pretrained(tmp_path / "tok")
    prompts = ["def add(a, b):", "def sub(a, b):\n    '''Subtract.'''", "def f(x): " + "long " * 30]
    responses = ["return a + b", "return a - b", "return x"]
    batch = {"id": np.arange(3), "split": np.array(["train"] * 3, dtype=object),
             "prompt": np.array(prompts, dtype=object), "response": np.array(responses, dtype=object)}
    out = instruction_rows(batch, ("prompt", "response"), str(tmp_path / "tok"), max_length=24, pad_id=0)
    for x, y, (prompt, reference) in zip(out["x"], out["label"], prompts_and_references(out["x"], out["label"])):
        x2, y2, _ = pack_row(prompt, reference, 24, 0)
        assert x2.tolist() == x.tolist() and y2.tolist() == y.tolist()
        assert prompt_of(x, y) == prompt


def test_teacher_rows_label_exactly_the_response_and_get_ids_of_their_own():
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]]
    responses = [[20, 21, 2], [22, 23, 24, 25], [26, 27, 28]]
    batch = {"id": np.array([101, 102, 103], np.int64)}
    rows = {t: teacher_rows(batch, t, responses, prompts, max_length=8, pad_id=0) for t in ("a", "b")}
    for row, prompt, response in zip(range(3), prompts, responses):
        x, y = rows["a"]["x"][row], rows["a"]["label"][row]
        seq = (prompt + response)[:9]
        assert x[:len(seq) - 1].tolist() == seq[:-1] and (x[len(seq) - 1:] == 0).all()
        # Prompt positions but the last teach nothing; from there on, the response's tokens and then padding.
        assert (y[:len(prompt) - 1] == IGNORE_LABEL).all()
        assert y[len(prompt) - 1:len(seq) - 1].tolist() == seq[len(prompt):]
        assert (y[len(seq) - 1:] == IGNORE_LABEL).all()
    assert rows["a"]["source"].tolist() == [TEACHER] * 3 and rows["b"]["generated_by"].tolist() == ["b"] * 3
    assert rows["a"]["prompt_id"].tolist() == [101, 102, 103]
    ids = np.concatenate([batch["id"], rows["a"]["id"], rows["b"]["id"]])
    assert len(np.unique(ids)) == 9 and (ids >= 0).all()
    # The same row and teacher: the same id in every run, whatever batch it arrives in.
    again = teacher_rows({k: v[::-1] for k, v in batch.items()}, "a", responses[::-1], prompts[::-1], 8, 0)
    assert again["id"][::-1].tolist() == rows["a"]["id"].tolist()
    refs = reference_columns(dict(batch))
    assert refs["source"].tolist() == [REFERENCE] * 3 and refs["prompt_id"].tolist() == [101, 102, 103]
    mixed = {k: np.concatenate([refs[k], rows["a"][k]]) for k in ("id", "source")}
    assert rows_from(mixed, TEACHER)["id"].tolist() == rows["a"]["id"].tolist() and "source" not in rows_from(mixed, TEACHER)


def test_an_empty_response_or_a_full_window_leaves_no_row():
    batch = {"id": np.array([1, 2])}
    out = teacher_rows(batch, "a", [[], [3, 4]], [[5, 6], [7] * 9], max_length=8, pad_id=0)
    assert len(out["id"]) == 0
    assert window_budget([[1] * 3, [1] * 9, [1]], max_length=8, max_new_tokens=4) == [4, 0, 4]


# --- generating -------------------------------------------------------------------------------------

def test_batched_left_padded_greedy_equals_one_prompt_at_a_time():
    model, prompts = _tiny_lm(), _prompts()
    greedy = Decoding.of("greedy", 10, 1.0, 1.0, 0)
    batched = generate_responses(model, prompts, greedy, eos_id=None, pad_id=0)
    assert batched == [generate_responses(model, [p], greedy, None, 0)[0] for p in prompts]
    assert all(len(r) == 10 for r in batched)


def test_seeded_sampling_is_the_same_in_any_batch_and_differs_by_seed():
    model, prompts = _tiny_lm(), _prompts()
    sample = Decoding.of("sample", 10, 1.5, 0.95, 3)
    seeds = [row_seed(3, 1000 + i, "t") for i in range(len(prompts))]
    batched = generate_responses(model, prompts, sample, None, 0, seeds)
    assert batched == [generate_responses(model, [p], sample, None, 0, [s])[0] for p, s in zip(prompts, seeds)]
    assert batched == generate_responses(model, prompts[::-1], sample, None, 0, seeds[::-1])[::-1]
    assert batched[:3] == generate_responses(model, prompts[:3], sample, None, 0, seeds[:3])
    other = [row_seed(4, 1000 + i, "t") for i in range(len(prompts))]
    assert generate_responses(model, prompts, sample, None, 0, other) != batched
    # Sampling is not greedy at temperature 1.5; a nucleus that holds only the top token is.
    greedy = generate_responses(model, prompts, Decoding.of("greedy", 10, 1.0, 1.0, 0), None, 0)
    assert batched != greedy
    assert generate_responses(model, prompts, Decoding.of("sample", 10, 1.0, 1e-6, 3), None, 0, seeds) == greedy


def test_responses_stop_after_eos_and_at_their_own_budget():
    model, prompts = _tiny_lm(vocab=6), [[3, 4], [4, 5, 3], [5]]
    sample = Decoding.of("sample", 20, 1.0, 1.0, 0)
    seeds = [row_seed(0, i, "t") for i in range(3)]
    out = generate_responses(model, prompts, sample, eos_id=2, pad_id=0, seeds=seeds, max_new_tokens=[20, 3, 20])
    assert len(out[1]) <= 3
    for r in out:
        assert 2 not in r[:-1] and (r[-1] == 2 or len(r) in (3, 20))
    # The model's own generation config (a recipe Llama's eos is 2) does not stop a tokenizer without eos.
    free = generate_responses(model, prompts, sample, eos_id=None, pad_id=0, seeds=seeds)
    assert [len(r) for r in free] == [20, 20, 20]


# --- config -----------------------------------------------------------------------------------------

def test_sequence_kd_is_off_by_default_and_checked_once():
    assert config_from_dict(_instruct_raw()).sequence_kd.mode == "off"
    cfg = config_from_dict(_instruct_raw(("sequence_kd.mode", "mixed"), ("sequence_kd.decoding", "sample"),
                                         ("sequence_kd.temperature", 0.7), ("sequence_kd.teachers", "all")))
    assert (cfg.sequence_kd.mode, cfg.sequence_kd.teachers, cfg.sequence_kd.temperature) == ("mixed", "all", 0.7)
    with pytest.raises(ConfigError, match=r"sequence_kd.mode: 'student' is not valid; choose one of: off, teacher, mixed"):
        config_from_dict(_instruct_raw(("sequence_kd.mode", "student")))
    with pytest.raises(ConfigError, match=r"sequence_kd.decoding: 'beam'.*greedy, sample"):
        config_from_dict(_instruct_raw(("sequence_kd.decoding", "beam")))
    with pytest.raises(ConfigError, match=r"sequence_kd.teachers: 'each'.*best, all"):
        config_from_dict(_instruct_raw(("sequence_kd.teachers", "each")))
    with pytest.raises(ConfigError, match=r"sequence_kd.temperature: 0.7 applies to sampling.*decoding=sample"):
        config_from_dict(_instruct_raw(("sequence_kd.temperature", 0.7)))
    with pytest.raises(ConfigError, match=r"sequence_kd.max_new_tokens"):
        config_from_dict(_instruct_raw(("sequence_kd.max_new_tokens", 0)))
    with pytest.raises(ConfigError, match=r"sequence_kd.mode: 'teacher' needs train.mode=cached"):
        config_from_dict(_instruct_raw(("sequence_kd.mode", "teacher"), ("train.mode", "online")))
    own = (("teachers.llama_deep.tokenizer", "smollm2"), ("teachers.llama_deep.source", "hf_dir"),
           ("teachers.llama_deep.path", "t"))
    with pytest.raises(ConfigError, match=r"sequence_kd.teachers: 'all': teachers \['llama_deep'\] have a tokenizer"
                                          r".*choose 'best'"):
        config_from_dict(_instruct_raw(("sequence_kd.mode", "mixed"), ("sequence_kd.teachers", "all"), *own))
    everyone = [(f"teachers.{t}.{k}", v) for t in ("llama_wide", "llama_deep")
                for k, v in (("tokenizer", "smollm2"), ("source", "hf_dir"), ("path", "t"))]
    with pytest.raises(ConfigError, match=r"sequence_kd.mode: 'mixed': every teacher .* has a tokenizer of its own"):
        config_from_dict(_instruct_raw(("sequence_kd.mode", "mixed"), *everyone))
    lm = yaml.safe_load((REPO / "jobs/configs/tiny_lm.yaml").read_text())
    with pytest.raises(ConfigError, match=r"sequence_kd.mode: 'teacher' needs instruction data"):
        config_from_dict(apply_overrides(lm, [("sequence_kd.mode", "teacher")]))


def test_with_best_only_the_teachers_on_the_datas_tokenizer_compete_to_write():
    """A teacher with a tokenizer of its own still teaches token by token but cannot write the data's
    token ids: it is no candidate, the only one left writes without a validation contest (no Ray), and
    the responses cache's spec does not change with that teacher's weights."""
    from distill_ray.cache.responses import candidates, response_spec, writers

    raw = _instruct_raw(("sequence_kd.mode", "mixed"), ("teachers.llama_deep.tokenizer", "smollm2"),
                        ("teachers.llama_deep.source", "hf_dir"), ("teachers.llama_deep.path", "t"))
    cfg = config_from_dict(raw)
    assert cfg.teacher_names() == ("llama_wide", "llama_deep") and candidates(cfg) == ("llama_wide",)
    assert writers(cfg, data=None, dirs={}) == (("llama_wide",), {})
    spec = response_spec(cfg, "data", {"llama_wide": "w1", "llama_deep": "d1"})
    assert dict(spec.teacher_fingerprints) == {"llama_wide": "w1"}
    assert spec == response_spec(cfg, "data", {"llama_wide": "w1", "llama_deep": "d2"})
    assert spec != response_spec(cfg, "data", {"llama_wide": "w2", "llama_deep": "d1"})


def test_the_baseline_reads_references_and_the_student_what_the_mode_says():
    from distill_ray.cache.responses import train_sources

    def cfg(mode):
        return config_from_dict(_instruct_raw(("sequence_kd.mode", mode)))

    assert train_sources(cfg("teacher"), use_teachers=True) == TEACHER
    assert train_sources(cfg("mixed"), use_teachers=True) is None
    assert train_sources(cfg("mixed"), use_teachers=False) == REFERENCE
    assert train_sources(cfg("off"), use_teachers=True) is None


# --- the cache's checks -------------------------------------------------------------------------------

def _fake_cache(root: Path, spec) -> Path:
    from distill_ray.cache.files import sha256_file
    from distill_ray.cache.responses import MANIFEST

    d = root / spec.key()
    d.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1, 2], "generated_by": ["a", "a"]}), d / "part.parquet")
    (d / MANIFEST).write_text(json.dumps({"format_version": 1, "spec": spec.to_dict(), "generated_by": {"a": 2},
                                          "num_rows": 2, "shards": [{"file": "part.parquet", "rows": 2,
                                                                     "sha256": sha256_file(d / "part.parquet")}]}))
    return d


def test_a_stale_or_damaged_responses_cache_is_refused_naming_what_changed(tmp_path):
    from dataclasses import asdict

    from distill_ray.cache.responses import ResponseSpec, newest_sibling, changes, verify
    from distill_ray.cache.soft_targets import CorruptCacheError, StaleCacheError

    greedy = ResponseSpec({"a": "f" * 64, "b": "e" * 64}, "all", asdict(Decoding.of("greedy", 8, 1, 1, 0)), "data1")
    sample = ResponseSpec({"a": "f" * 64, "b": "e" * 64}, "all", asdict(Decoding.of("sample", 8, 0.7, 1, 5)), "data1")
    retrained = ResponseSpec({"a": "0" * 64, "b": "e" * 64}, "all", asdict(Decoding.of("greedy", 8, 1, 1, 0)), "data1")
    assert greedy == ResponseSpec(**greedy.to_dict()) and greedy.key() != sample.key() != retrained.key()
    # Greedy ignores sampling settings, so they cannot make a greedy cache look stale.
    assert Decoding.of("greedy", 8, 0.3, 0.5, 9) == Decoding.of("greedy", 8, 1.0, 1.0, 0)
    d = _fake_cache(tmp_path, greedy)
    assert verify(d, greedy)["num_rows"] == 2
    with pytest.raises(StaleCacheError, match=r"decoding.decoding: cached greedy vs now sample.*decoding.seed"):
        verify(d, sample)
    assert changes(greedy, retrained) == ["teacher_fingerprints.a: cached ffffffffffff… vs now 000000000000…"]
    assert newest_sibling(tmp_path, sample) == (d, greedy)
    assert newest_sibling(tmp_path, ResponseSpec(greedy.teacher_fingerprints, "all", greedy.decoding, "data2")) is None
    with open(d / "part.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(CorruptCacheError, match=r"part.parquet is corrupt"):
        verify(d, greedy)
    (d / "part.parquet").unlink()
    with pytest.raises(CorruptCacheError, match=r"part.parquet listed in manifest.json is missing"):
        verify(d, greedy)


# --- end to end on Ray ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_responses_are_generated_once_cached_and_reused_without_generate(ray_local, tmp_path, capsys):
    """Two tiny teachers both write (teachers=all, sampled): the responses cache records every teacher's
    fingerprint and the decoding, the soft-target cache holds reference and teacher rows with targets,
    training reads the rows its mode says; a second build calls generate zero times."""
    from distill_ray.cache.build import build_cache
    from distill_ray.pipeline import load_data, prepare_teachers
    from distill_ray.cache.responses import MANIFEST, teacher_fingerprints
    from distill_ray.train.inputs import training_inputs

    for seed, name in enumerate(("a", "b")):  # saved untrained: what they write does not matter here
        _tiny_lm(vocab=30522, seed=seed).save_pretrained(tmp_path / name)
    teachers = [{"name": n, "source": "hf_dir", "path": str(tmp_path / n), "num_cpus": 0.25} for n in ("a", "b")]
    cfg = config_from_dict(_instruct_raw(
        ("run_dir", str(tmp_path / "runs")), ("cache.dir", str(tmp_path / "cache")), ("teachers", teachers),
        ("data.max_train_samples", 40), ("data.max_eval_samples", 20),
        ("sequence_kd.mode", "teacher"), ("sequence_kd.teachers", "all"), ("sequence_kd.decoding", "sample"),
        ("sequence_kd.max_new_tokens", 6), ("sequence_kd.seed", 7)))
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data)
    trace = tmp_path / "generate.trace"
    cache = build_cache(cfg, data, dirs, trace_file=str(trace))
    calls = [line.split() for line in trace.read_text().splitlines()]
    train_rows = data.info.counts["train"]
    assert calls and sorted({c[0] for c in calls}) == ["a", "b"]
    assert sum(int(c[1]) for c in calls) == 2 * train_rows  # every prompt, once per teacher

    (responses,) = (tmp_path / "cache" / "responses").iterdir()
    manifest = json.loads((responses / MANIFEST).read_text())
    assert manifest["spec"]["teacher_fingerprints"] == teacher_fingerprints(cfg, dirs)
    assert manifest["spec"]["decoding"] == {"decoding": "sample", "max_new_tokens": 6, "temperature": 1.0,
                                            "top_p": 1.0, "seed": 7}
    assert manifest["spec"]["data_fingerprint"] == data.info.fingerprint
    assert sum(manifest["generated_by"].values()) == manifest["num_rows"] > train_rows  # a few may fill the window
    table = pq.read_table([responses / s["file"] for s in manifest["shards"]][0])
    assert set(table.column_names) >= {"id", "x", "label", "generated_by", "prompt_id", "source"}

    train = cache.dataset("train", ["id", "label", "source", "generated_by", "a/topk_logprobs"]).to_pandas()
    assert (train["source"] == "reference").sum() == train_rows
    assert (train["source"] == "teacher").sum() == manifest["num_rows"] and train["id"].is_unique
    taught = np.stack(train["label"]) >= 0
    assert (taught[train["source"] == "teacher"].sum(1) <= 6).all()  # at most max_new_tokens response tokens
    student = training_inputs(cfg, cache, data.info)
    baseline = training_inputs(cfg, cache, data.info, use_teachers=False)
    assert (student.train_rows, baseline.train_rows) == (manifest["num_rows"], train_rows)
    assert set(student.train.to_pandas()["id"]) == set(train["id"][train["source"] == "teacher"])

    capsys.readouterr()
    again = build_cache(cfg, data, dirs, trace_file=str(trace))
    assert trace.read_text().splitlines() == [" ".join(c) for c in calls]  # not one generate call more
    assert "responses: reusing verified cache" in capsys.readouterr().out
    assert again.directory == cache.directory
