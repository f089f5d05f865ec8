"""Tests for distill_ray.cache.soft_targets: the cache as a dataset written by Ray Data, staleness,
corruption, atomic publication."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distill_ray.cache import soft_targets as st
from distill_ray.cache import topk_encoding as codec
from distill_ray.cache.soft_targets import MANIFEST, CacheSpec, CachedData, CorruptCacheError, StaleCacheError

C = 7
FP_A = "a" * 64
FP_B = "b" * 64


def _spec(**kw) -> CacheSpec:
    base = dict(teacher_fingerprints={"cnn": FP_A, "vit": FP_B}, data_fingerprint="d" * 64, num_classes=C)
    base.update(kw)
    return CacheSpec(**base)


def _rows(n: int = 53) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = rng.permutation(1000)[:n].astype(np.int64) + 5  # non-contiguous, unsorted ids
    return {"id": ids, "x": rng.standard_normal((n, 4)).astype(np.float32),
            "label": rng.integers(-1, C, n).astype(np.int64),
            "cnn/logits": (rng.standard_normal((n, C)) * 3).astype(np.float16),
            "vit/logits": (rng.standard_normal((n, C)) * 3).astype(np.float16),
            "difficulty/ensemble_entropy": rng.random(n).astype(np.float32),
            "split": np.array(["train", "val", "test"] * (n // 3) + ["train"] * (n % 3))}


def _dataset(rows: dict[str, np.ndarray]):
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    table = pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else v for k, v in rows.items()})
    return ray.data.from_arrow(table).repartition(4)


@pytest.fixture(scope="module")
def written(ray_local, tmp_path_factory):
    """A float16 full-logit cache of 53 rows written by Ray Data (several files per split)."""
    rows = _rows()
    d = st.write_cache(tmp_path_factory.mktemp("cache") / "c", _spec(), _dataset(rows))
    return d, rows


@pytest.fixture
def cache_copy(written, tmp_path):
    d, rows = written
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    return copy, _spec(), rows


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


pytestmark = pytest.mark.ray


# ---------------------------------------------------------------------------------------------
# the cache is the dataset


def test_every_split_round_trips_with_inputs_labels_targets_and_difficulty(written):
    d, rows = written
    cache = CachedData.open(d, _spec())
    m = cache.manifest
    assert m["num_rows"] == 53 and m["rows_per_split"] == {"train": 19, "val": 17, "test": 17}
    assert all(s["file"].startswith(f"split={s['split']}/") for s in m["shards"])
    for split in ("train", "val", "test"):
        got = cache.dataset(split).to_pandas().sort_values("id")
        want = np.sort(rows["id"][rows["split"] == split])
        np.testing.assert_array_equal(got["id"].to_numpy(), want)
        assert "split" not in got.columns
        order = np.argsort(rows["id"])
        pick = order[np.isin(rows["id"][order], want)]
        np.testing.assert_array_equal(np.stack(got["cnn/logits"].to_numpy()), rows["cnn/logits"][pick])
        np.testing.assert_array_equal(got["label"].to_numpy(), rows["label"][pick])
        np.testing.assert_allclose(np.stack(got["x"].to_numpy()), rows["x"][pick])
        np.testing.assert_allclose(got["difficulty/ensemble_entropy"].to_numpy(),
                                   rows["difficulty/ensemble_entropy"][pick])
    only = cache.dataset("val", ["id", "vit/logits"]).take_batch(100, batch_format="numpy")
    assert set(only) == {"id", "vit/logits"}


# ---------------------------------------------------------------------------------------------
# stale


def test_stale_teacher_fingerprint_names_field_and_teacher(written):
    d, _ = written
    newer = _spec(teacher_fingerprints={"cnn": "9b2c" + "0" * 60, "vit": FP_B})
    with pytest.raises(StaleCacheError) as e:
        CachedData.open(d, expected=newer)
    msg = str(e.value)
    assert msg.startswith(str(d))
    assert "teacher_fingerprints['cnn']: cached aaaaaaaaaaaa… vs now 9b2c00000000…" in msg
    assert "vit" not in msg.split("\n", 1)[1].split("To fix")[0]  # only the differing teacher
    assert "--rebuild" in msg and "cache.rebuild=true" in msg


def test_stale_topk_and_teacher_order(written):
    d, _ = written
    with pytest.raises(StaleCacheError, match=r"topk: cached None vs now 5") as e:
        st.verify(d, expected=_spec(topk=5))
    assert "teacher_fingerprints" not in str(e.value)
    with pytest.raises(StaleCacheError, match="order"):
        st.verify(d, expected=_spec(teacher_fingerprints={"vit": FP_B, "cnn": FP_A}))
    assert st.verify(d, expected=_spec())["num_rows"] == 53  # an equal spec passes


# ---------------------------------------------------------------------------------------------
# corrupt


def test_flipped_byte_in_a_file_is_corrupt_and_names_it(cache_copy):
    d, spec, _ = cache_copy
    entry = _manifest(d)["shards"][1]
    path = d / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=entry["file"]) as e:
        CachedData.open(d, spec)
    assert str(e.value).startswith(str(d)) and "sha256" in str(e.value)


def test_missing_file_is_corrupt(cache_copy):
    d, spec, _ = cache_copy
    entry = _manifest(d)["shards"][0]
    (d / entry["file"]).unlink()
    with pytest.raises(CorruptCacheError, match=f"{entry['file']}.*missing"):
        st.verify(d, spec)


def test_truncated_or_missing_manifest_is_corrupt(cache_copy, tmp_path):
    d, spec, _ = cache_copy
    text = (d / MANIFEST).read_text()
    (d / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(CorruptCacheError, match="unreadable manifest.json"):
        CachedData.open(d, spec)
    (d / MANIFEST).unlink()
    with pytest.raises(CorruptCacheError, match="no manifest.json"):
        st.verify(d)
    with pytest.raises(CorruptCacheError, match="no such cache directory"):
        st.verify(tmp_path / "never-built")


def test_edited_counts_paths_and_format_version_are_corrupt(cache_copy):
    d, spec, _ = cache_copy
    original = (d / MANIFEST).read_text()

    m = json.loads(original)
    m["num_rows"] = 52
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="num_rows=52.*53 rows"):
        CachedData.open(d, spec)

    m = json.loads(original)  # consistent totals, but one file's count is a lie
    m["shards"][0]["rows"] -= 1
    m["num_rows"] -= 1
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match=f"{m['shards'][0]['file']} holds"):
        st.verify(d)

    m = json.loads(original)
    m["format_version"] = st.FORMAT_VERSION + 1
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="format_version"):
        st.verify(d)

    m = json.loads(original)
    m["shards"][0]["file"] = "../../etc/passwd"
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="malformed"):
        st.verify(d)

    (d / MANIFEST).write_text(original)
    assert st.verify(d, spec)["num_rows"] == 53


# ---------------------------------------------------------------------------------------------
# atomic publication


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_failing_pipeline_leaves_nothing(tmp_path):
    def _fail(batch):  # nested: pickled by value into the Ray task
        raise RuntimeError("teacher died")

    target = tmp_path / "cache"
    with pytest.raises(Exception, match="teacher died"):
        st.write_cache(target, _spec(), _dataset(_rows()).map_batches(_fail))
    assert not target.exists() and _leftovers(tmp_path) == []


def test_rows_without_the_teachers_columns_are_refused(tmp_path):
    rows = {k: v for k, v in _rows().items() if k != "vit/logits"}
    with pytest.raises(ValueError, match="vit/logits"):
        st.write_cache(tmp_path / "cache", _spec(), _dataset(rows))
    assert _leftovers(tmp_path) == [] and not (tmp_path / "cache").exists()


def test_a_rebuild_replaces_the_cache_and_other_directories_are_never_replaced(cache_copy, tmp_path):
    d, spec, rows = cache_copy
    old_files = {s["file"] for s in _manifest(d)["shards"]}
    half = {k: v[:30] for k, v in rows.items()}
    st.write_cache(d, spec, _dataset(half))
    assert CachedData.open(d, spec).manifest["num_rows"] == 30
    assert not old_files & {s["file"] for s in _manifest(d)["shards"]}
    assert _leftovers(d.parent) == []
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a soft-target cache"):
        st.write_cache(other, spec, _dataset(half))
    assert (other / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# spec and fingerprints


def test_spec_key_stable_and_distinct(tmp_path):
    s = _spec()
    assert s.key() == s.key() == _spec().key()
    assert len(s.key()) == 16 and int(s.key(), 16) >= 0
    assert s == _spec() and hash(s) == hash(_spec())
    variants = [
        _spec(teacher_fingerprints={"cnn": FP_A, "vit": FP_A}),
        _spec(teacher_fingerprints={"vit": FP_B, "cnn": FP_A}),  # order is part of the spec
        _spec(data_fingerprint="e" * 64),
        _spec(num_classes=8),
        _spec(topk=3),
        _spec(dtype="float32"),
        _spec(tokenizer="tok"),
        _spec(seq_len=4),
    ]
    keys = {v.key() for v in variants} | {s.key()}
    assert len(keys) == len(variants) + 1
    assert st.cache_dir_for(tmp_path, s) == tmp_path / s.key()


def test_spec_is_frozen_against_caller_mutation_and_validates():
    fps = {"cnn": FP_A}
    s = _spec(teacher_fingerprints=fps)
    before = s.key()
    fps["cnn"] = FP_B
    assert s.key() == before and s.teacher_fingerprints["cnn"] == FP_A
    assert CacheSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    for bad in (dict(dtype="bfloat16"), dict(topk=C + 1), dict(num_classes=0), dict(seq_len=1.5),
                dict(teacher_fingerprints="cnn"), dict(teacher_fingerprints={"cnn": 1})):
        with pytest.raises(ValueError):
            _spec(**bad)
    # No teacher at all (self-distillation's cache: the data alone) is a spec of its own.
    assert _spec(teacher_fingerprints={}).teachers == () and _spec(teacher_fingerprints={}).key() != s.key()


def test_data_fingerprint_sensitive_to_bytes_dtype_shape_extra():
    x = np.arange(24, dtype=np.uint8).reshape(4, 6)
    y = np.array([0, 1, 1, 0], dtype=np.int64)
    fp = st.data_fingerprint(x, y, extra="train")
    assert fp == st.data_fingerprint(x.copy(), y.copy(), extra="train") and len(fp) == 64
    x2 = x.copy()
    x2[2, 3] ^= 1
    assert st.data_fingerprint(x2, y, extra="train") != fp
    assert st.data_fingerprint(x.reshape(6, 4), y, extra="train") != fp
    assert st.data_fingerprint(x.view(np.int8), y, extra="train") != fp
    assert st.data_fingerprint(x, y, extra="val") != fp
    assert st.data_fingerprint(x[:, ::2]) == st.data_fingerprint(np.ascontiguousarray(x[:, ::2]))


def test_module_import_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, distill_ray.cache.soft_targets; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"




def test_a_q8_topk_cache_reads_back_as_float32_logprobs_and_indices(ray_local, tmp_path):
    """Written by Ray Data in the q8 encoding (with its Parquet options), read back through the same
    logical columns a plain cache has: float32 log-probs and int32 indices, descending."""
    from distill_ray.kd.losses import teacher_topk

    import torch

    spec = _spec(topk=4)
    rows = _rows()
    logp, idx = {}, {}
    for t in ("cnn", "vit"):
        logits = torch.as_tensor(rows.pop(f"{t}/logits").astype(np.float32))
        lp, ix = teacher_topk(logits, 4)
        logp[t], idx[t] = lp.numpy(), ix.numpy()
        rows[f"{t}/topk_logprobs"], rows[f"{t}/topk_indices"] = logp[t], idx[t]
    stored = codec.encode_targets(dict(rows), spec.teachers, spec.topk_encoding, spec.num_classes, spec.dtype)
    d = st.write_cache(tmp_path / "q8", spec, _dataset(stored))
    cache = CachedData.open(d, spec)
    assert cache.manifest["spec"]["topk_encoding"] == "q8" and "cnn/topk_q8" in cache.manifest["columns"]
    assert "cnn/topk_logprobs" in cache.columns and "cnn/topk_q8" not in cache.columns
    got = cache.dataset("train").take_batch(100, batch_format="numpy")
    assert "split" not in got and set(got) == set(cache.columns)
    pick = np.searchsorted(rows["id"], got["id"], sorter=np.argsort(rows["id"]))
    pick = np.argsort(rows["id"])[pick]
    for t in ("cnn", "vit"):
        assert got[f"{t}/topk_logprobs"].dtype == np.float32 and got[f"{t}/topk_indices"].dtype == np.int32
        np.testing.assert_array_equal(np.sort(got[f"{t}/topk_indices"], -1), np.sort(idx[t][pick], -1))
        np.testing.assert_array_equal(got[f"{t}/topk_indices"][:, 0], idx[t][pick, 0])  # the top class first
        np.testing.assert_allclose(got[f"{t}/topk_logprobs"][:, 0], logp[t][pick, 0], atol=2e-3)
    only = cache.dataset("val", ["id", "vit/topk_indices"]).take_batch(100, batch_format="numpy")
    assert list(only) == ["id", "vit/topk_indices"]
