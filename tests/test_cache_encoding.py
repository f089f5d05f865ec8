"""The top-k storage encodings of the soft-target cache (pure: numpy, torch and pyarrow, no Ray):
q8 round trip within its stated bound, the narrowest index type, Parquet options that really reach
the columns, and a cache never read in an encoding other than its own."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import torch

from distill_ray.cache import soft_targets as st
from distill_ray.cache import topk_encoding as codec
from distill_ray.cache.files import sha256_file
from distill_ray.kd.losses import teacher_topk, topk_kd_divergence
from distill_ray.cache.soft_targets import CacheSpec, CorruptCacheError, StaleCacheError


def _topk(n: int = 400, vocab: int = 3000, k: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3  # peaked enough that the top k hold most of the mass
    logp, idx = teacher_topk(logits, k)
    return logits, logp, idx


def test_q8_round_trip_within_the_stated_bound():
    logits, logp, idx = _topk()
    cols = codec.encode_topk(logp.numpy(), idx.numpy(), "q8", 3000)
    assert cols["topk_top"].dtype == np.float16 and cols["topk_q8"].dtype == np.uint8
    assert cols["topk_q8"].max() <= codec.Q8_LEVELS
    got_logp, got_idx = codec.decode_topk(cols, "q8")
    assert got_logp.dtype == np.float32 and got_idx.dtype == np.int32
    assert (np.diff(got_logp, axis=-1) <= 0).all()  # descending, so [..., 0] is the top class
    assert (got_idx[:, 0] == idx[:, 0].numpy()).all()
    # a near-tie at the top (0.001 nats) keeps the teacher's top class first
    tie = codec.decode_topk(codec.encode_topk(np.array([[-0.7, -0.701, -3.0]]), np.array([[9, 2, 5]]), "q8", 10), "q8")
    assert list(tie[1][0]) == [9, 2, 5]
    tie = codec.decode_topk(codec.encode_topk(np.array([[-0.7, -0.7, -3.0]]), np.array([[9, 2, 5]]), "q8", 10), "q8")
    assert list(tie[1][0]) == [9, 2, 5]  # an exact (float16) tie: the teacher's order decides
    # the same class set per position; compare values class by class
    assert (np.sort(got_idx, -1) == np.sort(idx.numpy(), -1)).all()
    want = dict(zip(map(tuple, np.stack([np.repeat(np.arange(len(idx)), idx.shape[1]), idx.numpy().ravel()], 1)),
                    logp.numpy().ravel()))
    have = np.array([want[(r, c)] for r, c in zip(np.repeat(np.arange(len(idx)), idx.shape[1]), got_idx.ravel())])
    err = np.abs(got_logp.ravel() - have)
    top = logp.numpy().max(-1, keepdims=True)
    offset = (np.repeat(top, idx.shape[1], 1).ravel() - have)
    top_err = np.abs(top.astype(np.float16).astype(np.float32) - top).max()
    # u = 1 - exp(-offset / c) comes back within half a level: the offset within c * |ln(1 - u +- 0.5 / L) - ln(1 - u)|
    c, half = codec.Q8_SCALE, 0.5 / codec.Q8_LEVELS
    inside = offset < c * np.log(1 / (2 * half)) - 1.0  # past the cap, offsets are stored as the cap
    rest = np.exp(-offset[inside] / c)  # 1 - u
    h = np.where(1 - rest < 1 / codec.Q8_LEVELS, 1 / codec.Q8_LEVELS, half)  # near-ties of the top sit one level below it
    bound = c * np.maximum(np.log(rest) - np.log(rest - h), np.log(rest + h) - np.log(rest)) + 2 * top_err + 1e-5
    assert inside.mean() > 0.5
    assert (err[inside] <= bound).all(), (err[inside] - bound).max()
    assert err[offset < 1.0].max() <= 0.025  # ~e^(o/2) / 255 nats near the top
    # what the loss sees (k + 1 buckets at T = 1): far below 1e-3 from the exact top-k
    exact = topk_kd_divergence(logits, logp, idx, kind="reverse_kl")
    coded = topk_kd_divergence(logits, torch.from_numpy(got_logp), torch.from_numpy(got_idx), kind="reverse_kl")
    assert float(exact) < 1e-5 and float(coded) < 1e-3


def test_q8_per_token_shapes_and_plain_is_the_old_format():
    _, logp, idx = _topk(n=24, k=8)
    logp, idx = logp.reshape(3, 8, 8).numpy(), idx.reshape(3, 8, 8).numpy()  # [B, S, k]
    cols = codec.encode_topk(logp, idx, "q8", 3000)
    assert cols["topk_top"].shape == (3, 8) and cols["topk_q8"].shape == cols["topk_delta"].shape == (3, 8, 8)
    got_logp, got_idx = codec.decode_topk(cols, "q8")
    assert got_logp.shape == got_idx.shape == (3, 8, 8)
    plain = codec.encode_topk(logp, idx, "plain", 3000, "float16")
    assert set(plain) == {"topk_logprobs", "topk_indices"}
    assert plain["topk_logprobs"].dtype == np.float16 and plain["topk_indices"].dtype == np.int32
    back = codec.decode_topk(plain, "plain")
    assert back[0].dtype == np.float32 and (back[1] == idx).all()
    with pytest.raises(ValueError, match="q8, plain"):
        codec.encode_topk(logp, idx, "q4", 3000)


@pytest.mark.parametrize("num_classes, dtype", [(2, np.uint8), (10, np.uint8), (256, np.uint8), (257, np.uint16),
                                                (49_152, np.uint16), (65_536, np.uint16), (65_537, np.uint32),
                                                (151_936, np.uint32)])
def test_index_dtype_is_the_narrowest_that_holds_the_vocabulary(num_classes, dtype):
    assert codec.index_dtype(num_classes) == np.dtype(dtype)
    idx = np.array([[0, num_classes - 1]])
    cols = codec.encode_topk(np.array([[-0.1, -3.0]], np.float32), idx, "q8", num_classes)
    assert cols["topk_delta"].dtype == np.dtype(dtype)
    assert sorted(codec.decode_topk(cols, "q8")[1][0]) == [0, num_classes - 1]


def _spec(**kw) -> CacheSpec:
    base = dict(teacher_fingerprints={"t": "a" * 64}, data_fingerprint="d" * 64, num_classes=3000, topk=8)
    return CacheSpec(**{**base, **kw})


def test_spec_records_the_encoding_and_refuses_unknown_ones():
    assert _spec().topk_encoding == "q8"
    assert _spec(topk_encoding="plain").key() != _spec().key()
    assert _spec(topk=None).topk_encoding is None  # full logits: nothing to encode
    assert _spec(topk=None, topk_encoding="plain") == _spec(topk=None)
    with pytest.raises(ValueError, match="topk_encoding='q4'.*q8, plain"):
        _spec(topk_encoding="q4")
    assert codec.target_columns(_spec()) == ["t/topk_top", "t/topk_q8", "t/topk_delta"]
    assert codec.target_columns(_spec(topk_encoding="plain")) == ["t/topk_logprobs", "t/topk_indices"]
    assert codec.logical_columns(_spec(), ["id", "t/topk_top", "t/topk_q8", "t/topk_delta", "difficulty/x"]) == \
        ["id", "t/topk_logprobs", "t/topk_indices", "difficulty/x"]


def _table(spec: CacheSpec, rows: int = 12) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray  # the tensor type only; starts nothing

    _, logp, idx = _topk(n=rows * 4, k=spec.topk)
    batch = {"id": np.arange(rows, dtype=np.int64), "x": np.arange(rows * 4, dtype=np.int64).reshape(rows, 4),
             "label": np.zeros((rows, 4), np.int64),
             "t/topk_logprobs": logp.reshape(rows, 4, -1).numpy(), "t/topk_indices": idx.reshape(rows, 4, -1).numpy()}
    batch = codec.encode_targets(batch, spec.teachers, spec.topk_encoding, spec.num_classes, spec.dtype)
    return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else v for k, v in batch.items()})


def _write_cache_by_hand(d, spec: CacheSpec) -> None:
    """What ``write_cache`` leaves, without Ray: one shard written with the spec's Parquet options."""
    table = _table(spec)
    pds.write_dataset(table, d / "split=train", format="parquet", basename_template="part-{i}.parquet",
                      file_options=pds.ParquetFileFormat().make_write_options(**codec.parquet_options(spec)))
    rel = "split=train/part-0.parquet"
    manifest = {"format_version": st.FORMAT_VERSION, "spec": spec.to_dict(), "teachers": list(spec.teachers),
                "columns": table.column_names, "num_rows": table.num_rows,
                "rows_per_split": {"train": table.num_rows, "val": 0, "test": 0},
                "shards": [{"file": rel, "split": "train", "rows": table.num_rows,
                            "sha256": sha256_file(d / rel)}]}
    (d / st.MANIFEST).write_text(json.dumps(manifest))


def test_parquet_options_reach_the_stored_columns(tmp_path):
    spec = _spec()
    _write_cache_by_hand(tmp_path, spec)
    meta = pq.ParquetFile(tmp_path / "split=train/part-0.parquet").metadata.row_group(0)
    enc = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    for c in codec.target_columns(spec):
        assert "BYTE_STREAM_SPLIT" in enc[f"{c}.list.element"], enc
    assert "RLE_DICTIONARY" in enc["x.list.element"]
    assert meta.column(0).compression == "ZSTD"


def test_a_cache_in_another_encoding_is_never_misread(tmp_path):
    q8, plain = _spec(), _spec(topk_encoding="plain")
    _write_cache_by_hand(tmp_path, q8)
    assert st.verify(tmp_path, q8)["spec"]["topk_encoding"] == "q8"
    # asked for as plain: stale, naming the field
    with pytest.raises(StaleCacheError, match="topk_encoding: cached q8 vs now plain"):
        st.verify(tmp_path, plain)
    # a manifest edited to claim another encoding than its files hold: refused, not decoded wrongly
    m = json.loads((tmp_path / st.MANIFEST).read_text())
    m["spec"]["topk_encoding"] = "plain"
    (tmp_path / st.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="columns lack"):
        st.verify(tmp_path)
    # an unknown encoding, and a cache of the format before encodings were recorded
    m["spec"]["topk_encoding"] = "q4"
    (tmp_path / st.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="topk_encoding='q4'"):
        st.verify(tmp_path)
    m["spec"].pop("topk_encoding")
    m["format_version"] = 2
    (tmp_path / st.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="format_version 2, this distill-ray reads 3"):
        st.verify(tmp_path)


def test_decode_targets_restores_the_logical_columns():
    spec = _spec()
    table = _table(spec)
    batch = {c: table[c].chunk(0).to_numpy() for c in table.column_names}
    out = st._decode_and_select(batch, ("t",), "q8", ["id", "t/topk_indices", "t/topk_logprobs"])
    assert list(out) == ["id", "t/topk_indices", "t/topk_logprobs"]
    assert out["t/topk_logprobs"].shape == (12, 4, 8) and out["t/topk_logprobs"].dtype == np.float32
