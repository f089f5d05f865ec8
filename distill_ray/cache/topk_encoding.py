"""How a teacher's top-k targets are stored in the cache, and read back.

Top-k targets are stored in one of ``TOPK_ENCODINGS`` (recorded in the manifest's spec, so a cache
is always decoded the way it was written; ``CachedData.dataset`` hands every reader the same
logical columns ``{teacher}/topk_logprobs`` (float32, descending) + ``{teacher}/topk_indices``):

- ``q8`` (default): per position, the top log-prob as float16 (``{t}/topk_top``), each entry's
  offset below it companded to 8 bits, ``q = round(255 * (1 - exp(-offset / 2)))`` (uint8,
  ``{t}/topk_q8``: fine steps near the top, where the mass is, coarse far below it), and the
  entries sorted by class index, stored as index deltas in the narrowest unsigned type the
  vocabulary allows (``{t}/topk_delta``); written with Parquet BYTE_STREAM_SPLIT + zstd. About 2x
  smaller than ``plain`` float16 (``bench/cache_size.py``).
- ``plain``: log-probs in the spec's ``dtype`` (float16/float32) + int32 indices, descending (the
  only format before ``q8``).

No Ray: the cache builder's last stage encodes, ``CachedData.dataset`` decodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from distill_ray.config import TOPK_ENCODINGS

if TYPE_CHECKING:
    from distill_ray.cache.soft_targets import CacheSpec

__all__ = ["LOGICAL_TOPK", "STORED_TOPK", "target_columns", "index_dtype", "encode_topk", "decode_topk",
           "encode_targets", "decode_targets", "parquet_options", "logical_columns"]

LOGICAL_TOPK = ("topk_logprobs", "topk_indices")  # what readers get, whatever the encoding
STORED_TOPK = {"plain": LOGICAL_TOPK, "q8": ("topk_top", "topk_q8", "topk_delta")}
Q8_LEVELS = 255  # a uint8
Q8_SCALE = 2.0  # nats: offset o is stored as u = 1 - exp(-o / Q8_SCALE), so steps grow with distance from the top


def target_columns(spec: CacheSpec) -> list[str]:
    """The teacher columns a cache of ``spec`` holds on disk, in teacher order."""
    if spec.topk is None:
        return [f"{t}/logits" for t in spec.teachers]
    return [f"{t}/{c}" for t in spec.teachers for c in STORED_TOPK[spec.topk_encoding]]


def index_dtype(num_classes: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every class index below ``num_classes``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def encode_topk(logprobs: np.ndarray, indices: np.ndarray, encoding: str, num_classes: int,
                dtype: str = "float16") -> dict[str, np.ndarray]:
    """One teacher's top-k ``[..., k]`` (log-probs at T = 1, any order; distinct indices) as the stored
    columns of ``encoding``, keyed by column suffix (``topk_top``, ... ; see the module docstring).

    ``q8`` error bound: the top log-prob is float16; every other entry's offset ``o`` below it comes
    back within half a level of ``u = 1 - exp(-o / 2)``, i.e. ``|error| <= exp(o / 2) / 255`` nats to first
    order (0.004 nats at the top, 0.011 at o = 2, 0.6 at o = 10, where the entry has < 5e-5 of the top's
    mass); offsets past ``2 * ln(510)`` = 12.5 nats are stored as that much. Only the top class is stored
    at offset 0 (others at least one level, 0.008 nats, below), so the top-1 survives any near-tie.
    """
    logprobs = np.asarray(logprobs, dtype=np.float32)
    indices = np.asarray(indices)
    if logprobs.shape != indices.shape:
        raise ValueError(f"top-k log-probs {logprobs.shape} and indices {indices.shape} differ in shape")
    if encoding == "plain":
        return {"topk_logprobs": logprobs.astype(dtype), "topk_indices": indices.astype(np.int32)}
    if encoding != "q8":
        raise ValueError(f"unknown top-k encoding {encoding!r}; choose one of: {', '.join(TOPK_ENCODINGS)}")
    order = np.argsort(indices, axis=-1, kind="stable")
    sorted_idx = np.take_along_axis(indices, order, -1).astype(np.int64)
    values = np.take_along_axis(logprobs, order, -1)
    top = logprobs.max(-1).astype(np.float16)
    offset = np.maximum(top.astype(np.float32)[..., None] - values, 0.0)  # inf (a -inf log-prob) stays inf
    # NaN (a cross-tokenizer teacher's unaligned position) stays NaN through the float16 top; its levels are 0.
    q = np.rint(np.nan_to_num(-np.expm1(-offset / Q8_SCALE) * Q8_LEVELS))
    # Only the teacher's top class is stored at level 0, so a near-tie (< 0.004 nats) cannot swap the
    # top-1 on reading: the others are at least one level (0.008 nats) below it.
    # the top class is the first maximum in the input's order (the teacher's, which float16 ties keep)
    top_class = np.take_along_axis(indices, np.argmax(logprobs, axis=-1)[..., None], -1)
    top_pos = np.argmax(sorted_idx == top_class, axis=-1)[..., None]
    q = np.maximum(q, 1)
    np.put_along_axis(q, top_pos, 0, -1)
    q = q.astype(np.uint8)
    delta = np.diff(sorted_idx, axis=-1, prepend=0).astype(index_dtype(num_classes))
    return {"topk_top": top, "topk_q8": q, "topk_delta": delta}


def decode_topk(columns: Mapping[str, np.ndarray], encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``encode_topk``: (float32 log-probs, int32 indices), ``[..., k]``, descending by
    log-prob (so ``[..., 0]`` is the teacher's top class)."""
    if encoding == "plain":
        return (np.asarray(columns["topk_logprobs"], dtype=np.float32),
                np.asarray(columns["topk_indices"], dtype=np.int32))
    if encoding != "q8":
        raise ValueError(f"unknown top-k encoding {encoding!r}; choose one of: {', '.join(TOPK_ENCODINGS)}")
    top = np.asarray(columns["topk_top"], dtype=np.float32)
    u = np.minimum(np.asarray(columns["topk_q8"], dtype=np.float32) / Q8_LEVELS, 1.0 - 0.5 / Q8_LEVELS)
    values = top[..., None] + Q8_SCALE * np.log1p(-u)
    indices = np.cumsum(np.asarray(columns["topk_delta"], dtype=np.int64), axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return (np.take_along_axis(values, order, -1).astype(np.float32),
            np.take_along_axis(indices, order, -1).astype(np.int32))


def encode_targets(batch: dict[str, np.ndarray], teachers: Sequence[str], encoding: str, num_classes: int,
                   dtype: str) -> dict[str, np.ndarray]:
    """The teachers' logical top-k columns (``{t}/topk_logprobs``, ``{t}/topk_indices``) replaced by the
    stored columns of ``encoding``; full logits are left alone."""
    for t in teachers:
        logp, idx = batch.pop(f"{t}/topk_logprobs"), batch.pop(f"{t}/topk_indices")
        for suffix, col in encode_topk(logp, idx, encoding, num_classes, dtype).items():
            batch[f"{t}/{suffix}"] = col
    return batch


def decode_targets(batch: dict[str, np.ndarray], teachers: Sequence[str], encoding: str) -> dict[str, np.ndarray]:
    """Inverse of ``encode_targets`` for the teachers whose stored columns are in ``batch``."""
    for t in teachers:
        suffixes = STORED_TOPK[encoding]
        if all(f"{t}/{c}" in batch for c in suffixes):
            logp, idx = decode_topk({c: batch.pop(f"{t}/{c}") for c in suffixes}, encoding)
            batch[f"{t}/topk_logprobs"], batch[f"{t}/topk_indices"] = logp, idx
    return batch


def parquet_options(spec: CacheSpec) -> dict[str, Any]:
    """Parquet writer options for a cache of ``spec`` (``pyarrow.dataset.ParquetFileFormat().
    make_write_options(**...)``, which is what Ray Data's ``write_parquet(**...)`` passes them to).

    ``q8``: the stored top-k columns as BYTE_STREAM_SPLIT (a uint8/uint16 value is a 4-byte INT32 in
    Parquet; split into byte streams, the always-zero high bytes vanish under zstd and the low ones
    compress to about their entropy; dictionary encoding would bit-pack them at 8-16 bits and leave
    zstd nothing to find), and dictionaries only for the integer inputs and labels; zstd level 9.
    ``plain`` and full logits keep Ray Data's defaults (snappy, dictionaries), as before ``q8``.
    """
    if spec.topk is None or spec.topk_encoding == "plain":
        return {}
    # Tensor columns (Ray's extension type over a list) are addressed by their leaf path; a path
    # that does not exist (e.g. "x.list.element" when x is a scalar) is ignored by the writer.
    coded = [f"{c}.list.element" for c in target_columns(spec)]
    return {"compression": "zstd", "compression_level": 9,
            "use_dictionary": ["x", "x.list.element", "label", "label.list.element"],
            "column_encoding": {c: "BYTE_STREAM_SPLIT" for c in coded}}


def logical_columns(spec: CacheSpec, stored: Sequence[str]) -> list[str]:
    """Stored column names as readers see them (each teacher's encoded top-k as its two logical columns)."""
    if spec.topk is None or spec.topk_encoding == "plain":
        return list(stored)
    out: list[str] = []
    for c in stored:
        teacher, _, suffix = c.rpartition("/")
        if teacher in spec.teachers and suffix in STORED_TOPK[spec.topk_encoding]:
            c = f"{teacher}/{LOGICAL_TOPK[0]}"
            if c in out:
                continue
            out += [c, f"{teacher}/{LOGICAL_TOPK[1]}"]
        else:
            out.append(c)
    return out

