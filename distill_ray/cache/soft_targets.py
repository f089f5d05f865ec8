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
is always decoded the way it was written): ``topk_encoding`` encodes and decodes them, and
``CachedData.dataset`` hands every reader the same logical columns ``{teacher}/topk_logprobs``
(float32, descending) + ``{teacher}/topk_indices``.
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
from distill_ray.cache.topk_encoding import LOGICAL_TOPK, STORED_TOPK, decode_targets, logical_columns, \
    parquet_options, target_columns
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
        # Empty: the data alone, for a run whose only teachers are the student itself (self-distillation).
        if isinstance(fps, (str, bytes)) or not isinstance(fps, Mapping):
            raise ValueError("CacheSpec.teacher_fingerprints must be a mapping name -> sha256")
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


def required_columns(spec: CacheSpec) -> list[str]:
    """The columns every cache of ``spec`` holds, the teachers' as stored."""
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
                stored += [f"{teacher}/{s}" for s in STORED_TOPK[encoding] if f"{teacher}/{s}" not in stored]
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
