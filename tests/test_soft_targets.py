"""Tests for distill_ray.soft_targets: round trips, id lookup, staleness, corruption, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distill_ray import __version__
from distill_ray import soft_targets as st
from distill_ray.soft_targets import (
    MANIFEST,
    CacheSpec,
    CorruptCacheError,
    SoftTargets,
    StaleCacheError,
    StoreWriter,
)

C = 7
FP_A = "a" * 64
FP_B = "b" * 64


def _spec(**kw) -> CacheSpec:
    base = dict(teacher_fingerprints={"cnn": FP_A, "vit": FP_B}, data_fingerprint="d" * 64, num_classes=C)
    base.update(kw)
    return CacheSpec(**base)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _full_outputs(spec: CacheSpec, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    seq = () if spec.seq_len is None else (spec.seq_len,)
    r = _rng(seed)
    return {t: (r.standard_normal((n, *seq, spec.num_classes)) * 3).astype(np.float32) for t in spec.teachers}


def _topk_outputs(spec: CacheSpec, n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    seq = () if spec.seq_len is None else (spec.seq_len,)
    r = _rng(seed)
    out = {}
    for t in spec.teachers:
        logits = r.standard_normal((n, *seq, spec.num_classes)).astype(np.float32)
        idx = np.argsort(-logits, axis=-1)[..., : spec.topk]
        out[t] = (np.take_along_axis(logits, idx, -1), idx.astype(np.int64))
    return out


def _write(directory: Path, spec: CacheSpec, ids: np.ndarray, outputs: dict, shard_rows: int, batch: int = 10) -> Path:
    """Write in batches of ``batch`` rows so shards straddle add() calls."""
    with StoreWriter(directory, spec, shard_rows=shard_rows) as w:
        for s in range(0, len(ids), batch):
            sl = slice(s, s + batch)
            w.add(ids[sl], {t: (tuple(a[sl] for a in o) if isinstance(o, tuple) else o[sl]) for t, o in outputs.items()})
        return w.finish()


@pytest.fixture
def full_cache(tmp_path):
    """A float16 full-logit cache of 53 rows in shards of 16 (4 shards, the last partial)."""
    spec = _spec()
    ids = _rng(1).permutation(1000)[:53].astype(np.int64) + 5  # non-contiguous, unsorted ids
    outputs = _full_outputs(spec, len(ids))
    d = _write(tmp_path / "cache", spec, ids, outputs, shard_rows=16)
    return d, spec, ids, outputs


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------
# round trips


def test_full_logits_round_trip_across_shards(full_cache):
    d, spec, ids, outputs = full_cache
    m = _manifest(d)
    assert [s["rows"] for s in m["shards"]] == [16, 16, 16, 5]
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST] + [f"shard-{i:05d}.parquet" for i in range(4)]
    assert m["num_rows"] == 53 and m["teachers"] == ["cnn", "vit"]
    assert m["columns"] == ["id", "cnn/logits", "vit/logits"]
    assert m["created_by"] == f"distill-ray {__version__}"
    assert m["shards"][1]["first_id"] == ids[16] and m["shards"][1]["last_id"] == ids[31]
    assert CacheSpec.from_dict(m["spec"]) == spec

    cache = SoftTargets.open(d, expected=spec)
    np.testing.assert_array_equal(cache.ids, ids)  # stored order = order added
    assert cache.ids.dtype == np.int64 and cache.teachers == ("cnn", "vit") and len(cache) == 53
    rows = np.arange(53)
    for t in spec.teachers:
        got = cache.logits(t, rows)
        assert got.dtype == np.float32 and got.shape == (53, C)
        np.testing.assert_allclose(got, outputs[t], rtol=1e-3, atol=1e-3)  # fp16 rounding
        np.testing.assert_array_equal(got, outputs[t].astype(np.float16).astype(np.float32))
    stacked = cache.stacked_logits(rows[::2])
    assert stacked.shape == (2, 27, C) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked[1], cache.logits("vit", rows[::2]))
    np.testing.assert_array_equal(stacked[0], cache.logits("cnn", rows[::2]))


def test_float32_round_trip_is_exact(tmp_path):
    spec = _spec(dtype="float32")
    ids = np.arange(30, dtype=np.int64)
    outputs = _full_outputs(spec, 30, seed=3)
    d = _write(tmp_path / "c", spec, ids, outputs, shard_rows=7)
    cache = SoftTargets.open(d, spec)
    for t in spec.teachers:
        np.testing.assert_array_equal(cache.logits(t, np.arange(30)), outputs[t])


def test_topk_round_trip(tmp_path):
    spec = _spec(topk=3, dtype="float32")
    ids = np.arange(100, 125, dtype=np.int64)
    outputs = _topk_outputs(spec, 25)
    d = _write(tmp_path / "c", spec, ids, outputs, shard_rows=10, batch=4)
    assert _manifest(d)["columns"] == ["id", "cnn/topk_values", "cnn/topk_indices", "vit/topk_values", "vit/topk_indices"]
    cache = SoftTargets.open(d, spec)
    for t in spec.teachers:
        v, i = cache.topk(t, np.arange(25))
        assert v.dtype == np.float32 and i.dtype == np.int64 and v.shape == i.shape == (25, 3)
        np.testing.assert_array_equal(v, outputs[t][0])
        np.testing.assert_array_equal(i, outputs[t][1])
    with pytest.raises(ValueError, match="topk"):
        cache.logits("cnn", np.arange(2))
    with pytest.raises(ValueError, match="topk"):
        cache.stacked_logits(np.arange(2))


def test_sequence_topk_round_trip(tmp_path):
    spec = _spec(topk=4, seq_len=5, num_classes=50, tokenizer="gpt2-tok")
    ids = np.arange(23, dtype=np.int64)
    outputs = _topk_outputs(spec, 23, seed=2)
    d = _write(tmp_path / "c", spec, ids, outputs, shard_rows=8, batch=6)
    cache = SoftTargets.open(d, spec)
    rows = cache.rows_for([22, 0, 9])
    for t in spec.teachers:
        v, i = cache.topk(t, rows)
        assert v.shape == i.shape == (3, 5, 4)
        np.testing.assert_allclose(v, outputs[t][0][[22, 0, 9]], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(i, outputs[t][1][[22, 0, 9]])
    with pytest.raises(ValueError, match=r"top-4 values only; use topk\(\), not logits\(\)"):
        cache.logits("cnn", rows)


def test_sequence_full_logits_round_trip(tmp_path):
    spec = _spec(seq_len=3, num_classes=11)
    ids = np.arange(9, dtype=np.int64)
    outputs = _full_outputs(spec, 9, seed=4)
    d = _write(tmp_path / "c", spec, ids, outputs, shard_rows=4, batch=9)
    cache = SoftTargets.open(d, spec)
    got = cache.stacked_logits(np.arange(9))
    assert got.shape == (2, 9, 3, 11)
    np.testing.assert_allclose(got[0], outputs["cnn"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got[1], outputs["vit"], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="logits"):
        cache.topk("cnn", np.arange(2))


# ---------------------------------------------------------------------------------------------
# id lookup


def test_rows_for_maps_shuffled_subset(full_cache):
    d, spec, ids, outputs = full_cache
    cache = SoftTargets.open(d)
    pick = _rng(7).permutation(53)[:20]
    rows = cache.rows_for(ids[pick])
    np.testing.assert_array_equal(rows, pick)
    np.testing.assert_array_equal(cache.ids[rows], ids[pick])
    np.testing.assert_allclose(cache.logits("vit", rows), outputs["vit"][pick], rtol=1e-3, atol=1e-3)


def test_rows_for_missing_id_raises_keyerror_naming_it(full_cache):
    d, _, ids, _ = full_cache
    cache = SoftTargets.open(d)
    absent = 10_000_001
    with pytest.raises(KeyError, match=str(absent)) as e:
        cache.rows_for(np.array([ids[0], absent, ids[3]]))
    assert "1 id(s)" in str(e.value)
    with pytest.raises(KeyError, match="5 id"):  # below and above every stored id, too
        cache.rows_for(np.array([-1, 0, 1, 2, 99_999]))
    with pytest.raises(KeyError, match="'nope'"):
        cache.logits("nope", np.arange(2))


# ---------------------------------------------------------------------------------------------
# stale


def test_stale_teacher_fingerprint_names_field_and_teacher(full_cache):
    d, spec, _, _ = full_cache
    newer = _spec(teacher_fingerprints={"cnn": "9b2c" + "0" * 60, "vit": FP_B})
    with pytest.raises(StaleCacheError) as e:
        SoftTargets.open(d, expected=newer)
    msg = str(e.value)
    assert msg.startswith(str(d))
    assert "teacher_fingerprints['cnn']: cached aaaaaaaaaaaa… vs now 9b2c00000000…" in msg
    assert "vit" not in msg.split("\n", 1)[1].split("To fix")[0]  # only the differing teacher
    assert "--rebuild" in msg and "cache.rebuild=true" in msg


def test_stale_topk_and_teacher_order(full_cache):
    d, spec, _, _ = full_cache
    with pytest.raises(StaleCacheError, match=r"topk: cached None vs now 5") as e:
        st.verify(d, expected=_spec(topk=5))
    assert "teacher_fingerprints" not in str(e.value)
    with pytest.raises(StaleCacheError, match="order"):
        st.verify(d, expected=_spec(teacher_fingerprints={"vit": FP_B, "cnn": FP_A}))
    with pytest.raises(StaleCacheError, match=r"teacher_fingerprints\['new'\]: cached \(absent\)"):
        st.verify(d, expected=_spec(teacher_fingerprints={"cnn": FP_A, "vit": FP_B, "new": FP_A}))
    assert st.verify(d, expected=_spec())["num_rows"] == 53  # an equal spec passes


# ---------------------------------------------------------------------------------------------
# corrupt


def test_flipped_byte_in_shard_is_corrupt_and_names_shard(full_cache):
    d, spec, _, _ = full_cache
    shard = d / "shard-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="shard-00002.parquet") as e:
        SoftTargets.open(d, spec)
    assert str(e.value).startswith(str(d)) and "sha256" in str(e.value)


def test_missing_shard_is_corrupt(full_cache):
    d, spec, _, _ = full_cache
    (d / "shard-00001.parquet").unlink()
    with pytest.raises(CorruptCacheError, match="shard-00001.parquet.*missing"):
        st.verify(d, spec)


def test_truncated_or_missing_manifest_is_corrupt(full_cache, tmp_path):
    d, spec, _, _ = full_cache
    text = (d / MANIFEST).read_text()
    (d / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(CorruptCacheError, match="unreadable manifest.json"):
        SoftTargets.open(d, spec)
    (d / MANIFEST).unlink()
    with pytest.raises(CorruptCacheError, match="no manifest.json"):
        st.verify(d)
    with pytest.raises(CorruptCacheError, match="no such cache directory"):
        st.verify(tmp_path / "never-built")


def test_edited_row_counts_and_format_version_are_corrupt(full_cache):
    d, spec, _, _ = full_cache
    original = (d / MANIFEST).read_text()

    m = json.loads(original)
    m["num_rows"] = 52
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="num_rows=52.*53 rows"):
        SoftTargets.open(d, spec)

    m = json.loads(original)  # consistent totals, but one shard's count is a lie
    m["shards"][0]["rows"] = 15
    m["num_rows"] = 52
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="shard-00000.parquet holds 16 rows"):
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


def test_exception_inside_writer_leaves_nothing(tmp_path):
    spec = _spec()
    target = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="teacher died"):
        with StoreWriter(target, spec, shard_rows=4) as w:
            w.add(np.arange(10), _full_outputs(spec, 10))  # two shards already on disk in the temp dir
            assert len(list(tmp_path.glob(".cache.tmp-*/shard-*.parquet"))) == 2
            raise RuntimeError("teacher died")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_finish_raises_and_cleans_up(tmp_path):
    spec = _spec()
    with pytest.raises(RuntimeError, match="without finish"):
        with StoreWriter(tmp_path / "cache", spec, shard_rows=4) as w:
            w.add(np.arange(10), _full_outputs(spec, 10))
    assert list(tmp_path.iterdir()) == []


def test_finish_replaces_existing_cache_entirely(full_cache):
    d, spec, _, _ = full_cache
    assert len(list(d.glob("shard-*.parquet"))) == 4
    stale_marker = d / "shard-00003.parquet"
    new_ids = np.arange(5, dtype=np.int64)
    new_out = _full_outputs(spec, 5, seed=9)
    _write(d, spec, new_ids, new_out, shard_rows=100)
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST, "shard-00000.parquet"]
    assert not stale_marker.exists()
    assert _leftovers(d.parent) == []  # neither temp nor moved-aside dirs remain
    cache = SoftTargets.open(d, spec)
    np.testing.assert_array_equal(cache.ids, new_ids)
    np.testing.assert_allclose(cache.logits("cnn", np.arange(5)), new_out["cnn"], rtol=1e-3, atol=1e-3)


def test_refuses_to_replace_a_directory_that_is_not_a_cache(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a soft-target cache"):
        StoreWriter(tmp_path / "home", _spec())
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_finish_with_duplicate_ids_raises_and_cleans_up(tmp_path):
    spec = _spec()
    w = StoreWriter(tmp_path / "cache", spec, shard_rows=3)
    w.add(np.array([1, 2, 3, 4]), _full_outputs(spec, 4))
    w.add(np.array([9, 2]), _full_outputs(spec, 2))
    with pytest.raises(ValueError, match=r"duplicated ids include \[2\]"):
        w.finish()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="aborted"):
        w.add(np.array([5]), _full_outputs(spec, 1))


# ---------------------------------------------------------------------------------------------
# add() validation


def test_add_rejects_wrong_teacher_set(tmp_path):
    spec = _spec()
    w = StoreWriter(tmp_path / "c", spec)
    outs = _full_outputs(spec, 4)
    with pytest.raises(ValueError, match=r"missing \['vit'\]"):
        w.add(np.arange(4), {"cnn": outs["cnn"]})
    with pytest.raises(ValueError, match=r"unexpected \['bert'\]"):
        w.add(np.arange(4), {**outs, "bert": outs["cnn"]})
    w.abort()


def test_add_rejects_wrong_shapes_naming_teacher_and_shapes(tmp_path):
    spec = _spec()
    w = StoreWriter(tmp_path / "c", spec)
    outs = _full_outputs(spec, 4)
    outs["vit"] = outs["vit"][:, :5]
    with pytest.raises(ValueError, match=r"teacher 'vit'.*\(4, 5\).*\(4, 7\)"):
        w.add(np.arange(4), outs)
    with pytest.raises(ValueError, match=r"teacher 'cnn'.*\(4, 7\).*\(3, 7\)"):
        w.add(np.arange(3), _full_outputs(spec, 4))
    w.abort()

    kspec = _spec(topk=2, seq_len=3)
    w = StoreWriter(tmp_path / "k", kspec)
    outs = _topk_outputs(kspec, 4)
    outs["cnn"] = (outs["cnn"][0][..., :1], outs["cnn"][1])
    with pytest.raises(ValueError, match=r"teacher 'cnn'.*\(4, 3, 1\).*\(4, 3, 2\)"):
        w.add(np.arange(4), outs)
    outs = _topk_outputs(kspec, 4)
    outs["vit"] = outs["vit"][0]  # a bare array where a (values, indices) tuple is expected
    with pytest.raises(ValueError, match="teacher 'vit'.*tuple"):
        w.add(np.arange(4), outs)
    outs = _topk_outputs(kspec, 4)
    outs["vit"] = (outs["vit"][0], outs["vit"][1] + C)
    with pytest.raises(ValueError, match=r"teacher 'vit'.*\[0, 7\)"):
        w.add(np.arange(4), outs)
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_add_rejects_float16_overflow(tmp_path):
    spec = _spec()
    outs = _full_outputs(spec, 2)
    outs["cnn"][1, 3] = 1e6
    with pytest.raises(ValueError, match="teacher 'cnn'.*overflow float16.*float32"):
        StoreWriter(tmp_path / "c", spec).add(np.arange(2), outs)


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
                dict(teacher_fingerprints={})):
        with pytest.raises(ValueError):
            _spec(**bad)


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

    code = "import sys, distill_ray.soft_targets; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Ray Data


@pytest.mark.ray
def test_to_ray_dataset_reads_every_row(full_cache, ray_local):
    d, spec, ids, outputs = full_cache
    ds = st.to_ray_dataset(d, expected=spec)
    assert ds.count() == 53
    rows = ds.take_all()
    got = {int(r["id"]): np.asarray(r["cnn/logits"], dtype=np.float32) for r in rows}
    assert sorted(got) == sorted(ids.tolist())
    np.testing.assert_allclose(got[int(ids[7])], outputs["cnn"][7], rtol=1e-3, atol=1e-3)
