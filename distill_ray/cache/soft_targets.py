"""The soft-target store: teacher outputs computed once, kept as Parquet, reused by every run and trial.

A cache is the whole training dataset, not a side table: every row carries ``id``, ``x`` (the
model input), ``label`` (-1 when unlabeled), each teacher's targets (``{teacher}/logits`` [C] or
its top k, stored in the spec's ``topk_encoding``; see below) and the per-row difficulty measures
(``difficulty/{measure}``), so training reads it as a stream and joins nothing::

    <root>/<spec.key()>/
        manifest.json                  what the cache was computed from; rows and sha256 per file
        split=train/<file>.parquet     written by the Ray Data tasks that ran the teachers
        split=val/...   split=test/...

Ray Data's workers write the Parquet files themselves (``Dataset.write_parquet``): nothing is
funnelled through the driver, which only lists the files, checksums them and writes the manifest.
The cache is built in a hidden sibling directory and renamed into place when complete, so a
reader never sees a half-written cache. ``verify`` (and ``CachedData.open``) refuse a cache
computed from other inputs (``StaleCacheError``, naming every differing field) or a damaged one
(``CorruptCacheError``, naming the file); neither is ever silently used.

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_ray import __version__
from distill_ray.cache.files import abbreviated, publish_directory, sha256_file
from distill_ray.config import CACHE_DTYPES, TOPK_ENCODINGS
from distill_ray.data.rows import SPLITS

if TYPE_CHECKING:  # ray is heavy; imported where datasets are made
    import ray.data

__all__ = [
    "CacheError",
    "StaleCacheError",
    "CorruptCacheError",
    "MANIFEST",
    "FORMAT_VERSION",
    "CacheSpec",
    "data_fingerprint",
    "cache_dir_for",
    "TOPK_ENCODINGS",
    "index_dtype",
    "encode_topk",
    "decode_topk",
    "parquet_options",
    "write_cache",
    "verify",
    "CachedData",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 2: inputs, labels, targets and difficulty, split by directory; 3: + spec.topk_encoding

_SHARD_RE = re.compile(r"split=(train|val|test)/[A-Za-z0-9_.-]+\.parquet")
_REBUILD_HINT = "rebuild it with `distill-ray cache CONFIG --rebuild` (or set cache.rebuild=true)"


class CacheError(RuntimeError):
    """Base class: a soft-target cache cannot be used."""


class StaleCacheError(CacheError):
    """The cache was computed from other inputs (teachers, data, layout) than the caller expects."""


class CorruptCacheError(CacheError):
    """The cache is damaged: bad or missing manifest, missing shard, checksum/row/schema mismatch."""


# ---------------------------------------------------------------------------------------------
# What a cache was computed from


@dataclass(frozen=True, eq=False)
class CacheSpec:
    """What a cache was computed from; equal specs mean the cache can be reused.

    ``teacher_fingerprints`` keeps its order (it is the teacher order of ``stacked_logits``, so
    two specs with the same teachers in another order are *not* equal). It is stored as a
    read-only mapping; equality and hashing go through ``key()``.
    """

    teacher_fingerprints: Mapping[str, str]
    """Teacher name -> sha256 of its weights, in teacher order."""
    data_fingerprint: str
    """sha256 of the input data and split (see ``data_fingerprint()``)."""
    num_classes: int
    """C: classes, or vocabulary size for language models."""
    topk: int | None = None
    """None: full logits are stored; k: only each position's k largest logits and their indices."""
    dtype: str = "float16"
    """Storage dtype of full logits, and of top-k values when ``topk_encoding='plain'``: float16 or float32."""
    topk_encoding: str | None = "q8"
    """How top-k targets are stored (``TOPK_ENCODINGS``); None when full logits are stored."""
    tokenizer: str | None = None
    """Tokenizer fingerprint or name, for text data."""
    seq_len: int | None = None
    """None: one prediction per row ([C]); S: one per token ([S, C] or [S, k])."""

    def __post_init__(self) -> None:
        fps = self.teacher_fingerprints
        if isinstance(fps, (str, bytes)) or not isinstance(fps, Mapping) or not fps:
            raise ValueError("CacheSpec.teacher_fingerprints must be a non-empty mapping name -> sha256")
        for name, fp in fps.items():
            if not isinstance(name, str) or not name or not isinstance(fp, str):
                raise ValueError(f"CacheSpec.teacher_fingerprints: bad entry {name!r}: {fp!r}")
        # A private copy: the caller mutating its dict later must not change a frozen spec.
        object.__setattr__(self, "teacher_fingerprints", MappingProxyType(dict(fps)))
        if not isinstance(self.data_fingerprint, str):
            raise ValueError(f"CacheSpec.data_fingerprint must be a str, got {self.data_fingerprint!r}")
        object.__setattr__(self, "num_classes", _positive_int("num_classes", self.num_classes))
        if self.topk is not None:
            k = _positive_int("topk", self.topk)
            if k > self.num_classes:
                raise ValueError(f"CacheSpec.topk={k} exceeds num_classes={self.num_classes}")
            object.__setattr__(self, "topk", k)
        if self.seq_len is not None:
            object.__setattr__(self, "seq_len", _positive_int("seq_len", self.seq_len))
        if self.topk is None:
            object.__setattr__(self, "topk_encoding", None)  # full logits: no top-k encoding to tell apart
        elif self.topk_encoding not in TOPK_ENCODINGS:
            raise ValueError(f"CacheSpec.topk_encoding={self.topk_encoding!r}; choose one of: {', '.join(TOPK_ENCODINGS)}")
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"CacheSpec.dtype={self.dtype!r}; choose one of: {', '.join(CACHE_DTYPES)}")
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise ValueError(f"CacheSpec.tokenizer must be a str or None, got {self.tokenizer!r}")

    @property
    def teachers(self) -> tuple[str, ...]:
        """Teacher names in order."""
        return tuple(self.teacher_fingerprints)

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values (teacher order kept by the dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["teacher_fingerprints"] = dict(self.teacher_fingerprints)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheSpec":
        """Inverse of ``to_dict``; unknown or missing fields raise TypeError."""
        return cls(**d)

    def _canonical(self) -> str:
        d = self.to_dict()
        # Pairs, not an object: sort_keys would otherwise erase the teacher order.
        d["teacher_fingerprints"] = [[k, v] for k, v in self.teacher_fingerprints.items()]
        # A new storage format must never be looked up under an old format's directory.
        d["format_version"] = FORMAT_VERSION
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def key(self) -> str:
        """16 hex chars of sha256 over a canonical JSON of every field: the cache subdirectory."""
        return hashlib.sha256(self._canonical().encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CacheSpec):
            return NotImplemented
        return self._canonical() == other._canonical()

    def __hash__(self) -> int:
        return hash(self._canonical())


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"CacheSpec.{field} must be a positive int, got {value!r}")
    try:
        v = operator.index(value)  # accepts numpy ints, refuses floats
    except TypeError:
        raise ValueError(f"CacheSpec.{field} must be a positive int, got {value!r}") from None
    if v < 1:
        raise ValueError(f"CacheSpec.{field} must be a positive int, got {v}")
    return int(v)


def data_fingerprint(*arrays: np.ndarray, extra: str = "") -> str:
    """sha256 hex over each array's dtype, shape and bytes, then ``extra`` (e.g. the split name).

    The dtype and shape are hashed too, so the same bytes viewed differently do not collide.
    """
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"array:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    h.update(f"extra:{len(extra)}:".encode())
    h.update(extra.encode())
    return h.hexdigest()


def cache_dir_for(root: str | Path, spec: CacheSpec) -> Path:
    """``root / spec.key()`` (``~`` expanded)."""
    return Path(root).expanduser() / spec.key()


# ---------------------------------------------------------------------------------------------
# Columns

LOGICAL_TOPK = ("topk_logprobs", "topk_indices")  # what readers get, whatever the encoding
_STORED_TOPK = {"plain": LOGICAL_TOPK, "q8": ("topk_top", "topk_q8", "topk_delta")}
Q8_LEVELS = 255  # a uint8
Q8_SCALE = 2.0  # nats: offset o is stored as u = 1 - exp(-o / Q8_SCALE), so steps grow with distance from the top


def target_columns(spec: CacheSpec) -> list[str]:
    """The teacher columns a cache of ``spec`` holds on disk, in teacher order."""
    if spec.topk is None:
        return [f"{t}/logits" for t in spec.teachers]
    return [f"{t}/{c}" for t in spec.teachers for c in _STORED_TOPK[spec.topk_encoding]]


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
        suffixes = _STORED_TOPK[encoding]
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
        if teacher in spec.teachers and suffix in _STORED_TOPK[spec.topk_encoding]:
            c = f"{teacher}/{LOGICAL_TOPK[0]}"
            if c in out:
                continue
            out += [c, f"{teacher}/{LOGICAL_TOPK[1]}"]
        else:
            out.append(c)
    return out


def required_columns(spec: CacheSpec) -> list[str]:
    return ["id", "x", "label", *target_columns(spec)]


def _is_replaceable(directory: Path) -> bool:
    """True if ``directory`` holds nothing but a cache's own files (so deleting it is safe)."""
    if not directory.is_dir():
        return False
    for p in directory.rglob("*"):
        rel = p.relative_to(directory).as_posix()
        if p.is_dir() and re.fullmatch(r"split=(train|val|test)", rel):
            continue
        if rel != MANIFEST and not _SHARD_RE.fullmatch(rel):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Writing


def write_cache(directory: str | Path, spec: CacheSpec, dataset: "ray.data.Dataset",
                max_rows_per_file: int | None = None) -> Path:
    """Write ``dataset`` (rows with ``split`` and ``required_columns(spec)``: top-k targets already in
    the stored columns of ``spec.topk_encoding``, see ``encode_targets``) as the cache of ``spec``.

    Ray Data's tasks write the Parquet files (partitioned by split) into a hidden sibling
    directory; the driver then reads only file footers and bytes for the manifest (rows, sha256),
    and renames the directory into place. Any failure leaves no cache behind.
    """
    target = Path(directory).expanduser()
    if target.exists() and not _is_replaceable(target):
        raise FileExistsError(f"{target}: exists and is not a soft-target cache (it holds other files); "
                              "refusing to replace it")
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        dataset.write_parquet(str(tmp), partition_cols=["split"], max_rows_per_file=max_rows_per_file,
                              **parquet_options(spec))
        shards = []
        for path in sorted(tmp.rglob("*.parquet")):
            rel = path.relative_to(tmp).as_posix()
            with pq.ParquetFile(path) as pf:
                rows, names = pf.metadata.num_rows, pf.schema_arrow.names
            missing = [c for c in required_columns(spec) if c not in names]
            if missing:
                raise ValueError(f"{rel}: the cache rows lack columns {missing}")
            shards.append({"file": rel, "split": rel.split("/")[0].split("=")[1], "rows": rows,
                           "sha256": sha256_file(path)})
        shards = [s for s in shards if s["rows"] > 0]
        if not shards:
            raise ValueError(f"{target}: no rows were written; refusing to publish an empty cache")
        with pq.ParquetFile(tmp / shards[0]["file"]) as pf:
            columns = [c for c in pf.schema_arrow.names if c != "split"]
        manifest = {
            "format_version": FORMAT_VERSION,
            "spec": spec.to_dict(),
            "teachers": list(spec.teachers),
            "columns": columns,
            "num_rows": sum(s["rows"] for s in shards),
            "rows_per_split": {split: sum(s["rows"] for s in shards if s["split"] == split) for split in SPLITS},
            "shards": shards,
            "created_by": f"distill-ray {__version__}",
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        publish_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------
# Verifying


def verify(directory: str | Path, expected: CacheSpec | None = None) -> dict[str, Any]:
    """Check a cache and return its manifest.

    Raises CorruptCacheError for a missing/unparseable/other-format manifest, a missing file, or a
    file whose sha256, row count or columns differ from the manifest; StaleCacheError if
    ``expected`` differs from the spec the cache was computed from (checked first, so a stale
    cache is refused without reading it).
    """
    d = Path(directory).expanduser()
    manifest, spec = _read_manifest(d)
    if expected is not None and expected != spec:
        raise StaleCacheError(_stale_message(d, spec, expected))
    for s in manifest["shards"]:
        _verify_shard(d, s, spec)
    total = sum(s["rows"] for s in manifest["shards"])
    if total != manifest["num_rows"]:
        raise CorruptCacheError(f"{d}: manifest num_rows={manifest['num_rows']} but its files hold {total} rows; "
                                f"{_REBUILD_HINT}")
    return manifest


def _read_manifest(d: Path) -> tuple[dict[str, Any], CacheSpec]:
    path = d / MANIFEST
    if not d.is_dir():
        raise CorruptCacheError(f"{d}: no such cache directory; build it with `distill-ray cache CONFIG`")
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCacheError(f"{d}: no {MANIFEST} (not a soft-target cache, or a write never finished); "
                                f"{_REBUILD_HINT}") from None
    except (OSError, ValueError) as e:
        raise CorruptCacheError(f"{d}: unreadable {MANIFEST} ({e}); {_REBUILD_HINT}") from e
    if not isinstance(m, dict):
        raise CorruptCacheError(f"{d}: {MANIFEST} is not a JSON object; {_REBUILD_HINT}")
    if m.get("format_version") != FORMAT_VERSION:
        raise CorruptCacheError(f"{d}: {MANIFEST} has format_version {m.get('format_version')!r}, this distill-ray "
                                f"reads {FORMAT_VERSION}; {_REBUILD_HINT}")
    try:
        spec = CacheSpec.from_dict(m["spec"])
        problems = []
        if m["teachers"] != list(spec.teachers):
            problems.append(f"teachers {m['teachers']} do not match the spec's {list(spec.teachers)}")
        missing = [c for c in required_columns(spec) if c not in m["columns"]]
        if missing:
            problems.append(f"columns lack {missing}")
        for s in m["shards"]:
            # The file pattern also keeps an edited manifest from pointing outside the cache.
            if not (isinstance(s["file"], str) and _SHARD_RE.fullmatch(s["file"]) and ".." not in s["file"]
                    and isinstance(s["sha256"], str) and isinstance(s["rows"], int) and s["split"] in SPLITS):
                problems.append(f"bad file entry {s!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCacheError(f"{d}: malformed {MANIFEST} ({type(e).__name__}: {e}); {_REBUILD_HINT}") from e
    if problems:
        raise CorruptCacheError(f"{d}: malformed {MANIFEST}: {'; '.join(problems)}; {_REBUILD_HINT}")
    return m, spec


def _verify_shard(d: Path, s: Mapping[str, Any], spec: CacheSpec) -> None:
    path = d / s["file"]
    if not path.is_file():
        raise CorruptCacheError(f"{d}: file {s['file']} listed in {MANIFEST} is missing; {_REBUILD_HINT}")
    digest = sha256_file(path)
    if digest != s["sha256"]:
        raise CorruptCacheError(f"{d}: file {s['file']} is corrupt: sha256 {digest[:12]}… vs {s['sha256'][:12]}… "
                                f"in {MANIFEST}; {_REBUILD_HINT}")
    try:
        with pq.ParquetFile(path) as pf:  # reads only the footer
            rows, names = pf.metadata.num_rows, pf.schema_arrow.names
    except (OSError, pa.ArrowException) as e:
        raise CorruptCacheError(f"{d}: file {s['file']} is not readable Parquet ({e}); {_REBUILD_HINT}") from e
    if rows != s["rows"]:
        raise CorruptCacheError(f"{d}: file {s['file']} holds {rows} rows, {MANIFEST} says {s['rows']}; {_REBUILD_HINT}")
    missing = [c for c in required_columns(spec) if c not in names]
    if missing:
        raise CorruptCacheError(f"{d}: file {s['file']} lacks columns {missing}; {_REBUILD_HINT}")


def _stale_message(d: Path, cached: CacheSpec, now: CacheSpec) -> str:
    lines = []
    for f in dataclasses.fields(CacheSpec):
        a, b = getattr(cached, f.name), getattr(now, f.name)
        if f.name == "teacher_fingerprints":
            for t in dict.fromkeys([*a, *b]):  # union, order kept
                fa, fb = a.get(t, "(absent)"), b.get(t, "(absent)")
                if fa != fb:
                    lines.append(f"teacher_fingerprints[{t!r}]: cached {abbreviated(fa)} vs now {abbreviated(fb)}")
            if set(a) == set(b) and list(a) != list(b):
                lines.append(f"teacher_fingerprints order: cached {list(a)} vs now {list(b)}")
        elif a != b:
            lines.append(f"{f.name}: cached {abbreviated(a)} vs now {abbreviated(b)}")
    detail = "\n  ".join(lines)
    return f"{d}: stale soft-target cache, computed from other inputs than now:\n  {detail}\nTo fix: {_REBUILD_HINT}."


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class CachedData:
    """A verified cache: its manifest, and each split as a lazy Ray Dataset over its files."""

    directory: Path
    manifest: Mapping[str, Any]
    spec: CacheSpec

    @classmethod
    def open(cls, directory: str | Path, expected: CacheSpec | None = None) -> "CachedData":
        d = Path(directory).expanduser()
        manifest = verify(d, expected)
        return cls(d, manifest, CacheSpec.from_dict(manifest["spec"]))

    @property
    def teachers(self) -> tuple[str, ...]:
        return self.spec.teachers

    @property
    def columns(self) -> list[str]:
        """The columns readers get (top-k targets as ``{t}/topk_logprobs`` + ``{t}/topk_indices``,
        whatever the encoding on disk)."""
        return logical_columns(self.spec, self.manifest["columns"])

    def rows(self, split: str) -> int:
        return int(self.manifest["rows_per_split"].get(split, 0))

    def files(self, split: str) -> list[str]:
        return [str(self.directory / s["file"]) for s in self.manifest["shards"] if s["split"] == split]

    def dataset(self, split: str, columns: Sequence[str] | None = None) -> "ray.data.Dataset":
        """The split's rows as a Ray Dataset (only ``columns`` are read from Parquet when given).

        Top-k targets come back decoded from the cache's own encoding (its manifest's, never the
        caller's): ``{t}/topk_logprobs`` float32 and ``{t}/topk_indices`` int32, descending."""
        import ray.data

        files = self.files(split)
        if not files:
            raise CorruptCacheError(f"{self.directory}: the cache has no {split} rows; {_REBUILD_HINT}")
        wanted = [c for c in (columns or self.columns) if c != "split"]
        encoding = self.spec.topk_encoding
        if self.spec.topk is None or encoding == "plain":
            return ray.data.read_parquet(files, partitioning=None).select_columns(wanted)
        stored, decode = [], []
        for c in wanted:
            teacher, _, suffix = c.rpartition("/")
            if teacher in self.spec.teachers and suffix in LOGICAL_TOPK:
                decode.append(teacher)
                stored += [f"{teacher}/{s}" for s in _STORED_TOPK[encoding] if f"{teacher}/{s}" not in stored]
            else:
                stored.append(c)
        ds = ray.data.read_parquet(files, partitioning=None).select_columns(stored)
        if not decode:
            return ds
        return ds.map_batches(_decode_and_select, fn_kwargs={"teachers": tuple(dict.fromkeys(decode)),
                                                             "encoding": encoding, "columns": wanted},
                              batch_format="numpy")


def _decode_and_select(batch: dict[str, np.ndarray], teachers: Sequence[str], encoding: str,
                       columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Decode the stored top-k columns, then keep exactly the columns asked for, in their order."""
    batch = decode_targets(dict(batch), teachers, encoding)
    return {c: batch[c] for c in columns}
