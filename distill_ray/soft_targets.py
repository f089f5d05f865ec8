"""The soft-target store: teacher outputs computed once, kept as Parquet shards, reused everywhere.

Computing teacher outputs is the expensive part of distillation, and every training run and Tune
trial needs the same ones. So they are computed once per ``CacheSpec`` (teachers' weights, data,
output layout) and written under ``root / spec.key()``::

    <root>/<spec.key()>/
        manifest.json          what the cache was computed from, and a sha256 per shard
        shard-00000.parquet    columns: id, {teacher}/logits  (or {teacher}/topk_values,
        shard-00001.parquet             {teacher}/topk_indices), rows in the order written
        ...

Per row a teacher stores either its full logits, ``[C]`` for classification or ``[S, C]`` for
sequences, or its top-k values and class indices, ``[k]`` / ``[S, k]``. Each is flattened into a
Parquet FixedSizeList so shards stay plain Arrow that Ray Data can read directly.

Readers call ``verify`` (or ``SoftTargets.open``, which calls it): a cache computed from other
inputs raises ``StaleCacheError`` naming every differing field; a damaged one raises
``CorruptCacheError``. Neither is ever silently used. ``StoreWriter`` builds a cache in a hidden
sibling directory and renames it into place only when complete, so a reader never sees a
half-written cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_ray import __version__

if TYPE_CHECKING:  # ray is heavy; only to_ray_dataset() imports it
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
    "StoreWriter",
    "verify",
    "SoftTargets",
    "to_ray_dataset",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

_DTYPES = ("float16", "float32")
_SHARD_RE = re.compile(r"shard-\d{5,}\.parquet")
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
    """Storage dtype of logits / top-k values: float16 or float32 (reads always give float32)."""
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
        if self.dtype not in _DTYPES:
            raise ValueError(f"CacheSpec.dtype={self.dtype!r}; choose one of: {', '.join(_DTYPES)}")
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
# Column layout, shared by writer and reader


@dataclass(frozen=True)
class _Column:
    name: str  # Parquet column name
    teacher: str
    kind: str  # "logits" | "topk_values" | "topk_indices"
    row_shape: tuple[int, ...]  # per-row shape: (C,), (S, C), (k,) or (S, k)
    dtype: np.dtype  # storage dtype

    @property
    def width(self) -> int:
        return int(np.prod(self.row_shape))

    @property
    def arrow_type(self) -> pa.DataType:
        return pa.list_(pa.from_numpy_dtype(self.dtype), self.width)


def _layout(spec: CacheSpec) -> list[_Column]:
    """Teacher columns in file order (the ``id`` column comes first and is not listed)."""
    seq = () if spec.seq_len is None else (spec.seq_len,)
    values = np.dtype(spec.dtype)
    cols: list[_Column] = []
    for t in spec.teachers:
        if spec.topk is None:
            cols.append(_Column(f"{t}/logits", t, "logits", seq + (spec.num_classes,), values))
        else:
            shape = seq + (spec.topk,)
            cols.append(_Column(f"{t}/topk_values", t, "topk_values", shape, values))
            cols.append(_Column(f"{t}/topk_indices", t, "topk_indices", shape, np.dtype(np.int32)))
    return cols


def _schema(spec: CacheSpec) -> pa.Schema:
    return pa.schema([pa.field("id", pa.int64())] + [pa.field(c.name, c.arrow_type) for c in _layout(spec)])


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in chunks


def _is_replaceable(directory: Path) -> bool:
    """True if ``directory`` holds nothing but a cache's own files (so deleting it is safe)."""
    return directory.is_dir() and all(
        p.name == MANIFEST or _SHARD_RE.fullmatch(p.name) for p in directory.iterdir()
    )


# ---------------------------------------------------------------------------------------------
# Writing


class StoreWriter:
    """Append batches of teacher outputs, cut them into shards, publish the cache atomically.

    Everything is written into a hidden sibling ``.{name}.tmp-{uuid}`` and renamed to
    ``directory`` by ``finish()``. As a context manager, leaving the block with an exception
    discards the partial cache (``abort()``); ``finish()`` is always explicit.

    >>> with StoreWriter(cache_dir_for(root, spec), spec) as w:   # doctest: +SKIP
    ...     for ids, outputs in batches:
    ...         w.add(ids, outputs)
    ...     w.finish()
    """

    def __init__(self, directory: str | Path, spec: CacheSpec, shard_rows: int = 8192) -> None:
        self.directory = Path(directory).expanduser()
        self.spec = spec
        if isinstance(shard_rows, bool) or operator.index(shard_rows) < 1:
            raise ValueError(f"shard_rows must be a positive int, got {shard_rows!r}")
        self.shard_rows = int(shard_rows)
        self._check_target()
        self._columns = _layout(spec)
        self._schema = _schema(spec)
        self._tmp = self.directory.parent / f".{self.directory.name}.tmp-{uuid.uuid4().hex}"
        self._pending_ids: list[np.ndarray] = []
        self._pending: dict[str, list[np.ndarray]] = {c.name: [] for c in self._columns}
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._all_ids: list[np.ndarray] = []
        self._state = "open"  # -> "finished" | "aborted"

    # -- public ---------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, outputs: Mapping[str, Any]) -> None:
        """Append N rows.

        ids: [N] integers, unique across the whole cache.
        outputs: teacher name -> full logits [N, C] / [N, S, C] when ``spec.topk`` is None, else a
        tuple (values, indices), each [N, k] / [N, S, k]. Exactly the spec's teachers.
        """
        self._require_open("add")
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got dtype {ids.dtype} shape {ids.shape}")
        n = len(ids)
        missing = [t for t in self.spec.teachers if t not in outputs]
        extra = [t for t in outputs if t not in self.spec.teacher_fingerprints]
        if missing or extra:
            raise ValueError(
                f"outputs must hold exactly the spec's teachers {list(self.spec.teachers)}; "
                f"missing {missing}, unexpected {extra}"
            )
        converted = {}
        for teacher in self.spec.teachers:
            converted.update(self._convert(teacher, outputs[teacher], n))
        if n == 0:
            return
        self._pending_ids.append(ids.astype(np.int64, copy=False))
        for name, arr in converted.items():
            self._pending[name].append(arr)
        self._pending_rows += n
        while self._pending_rows >= self.shard_rows:
            self._write_shard(self.shard_rows)

    def finish(self) -> Path:
        """Write the last partial shard and the manifest, then publish; returns ``directory``."""
        self._require_open("finish")
        try:
            if self._pending_rows:
                self._write_shard(self._pending_rows)
            if not self._shards:
                raise ValueError(f"{self.directory}: no rows were added; refusing to publish an empty cache")
            self._check_unique_ids()
            self._write_manifest()
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "finished"
        return self.directory

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        if self._state == "open":
            self._state = "aborted"
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._pending_ids, self._all_ids = [], []
        self._pending = {c.name: [] for c in self._columns}
        self._pending_rows = 0

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            # Leaving without finish() would strand a temp dir; make the slip loud, not silent.
            self.abort()
            raise RuntimeError(f"{self.directory}: StoreWriter left without finish(); nothing was published")

    # -- internals ------------------------------------------------------------------------------

    def _require_open(self, what: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.directory}: cannot {what}() a StoreWriter that is {self._state}")

    def _check_target(self) -> None:
        d = self.directory
        if d.exists() and not _is_replaceable(d):
            raise FileExistsError(
                f"{d}: exists and is not a soft-target cache (it holds other files); refusing to replace it"
            )

    def _convert(self, teacher: str, out: Any, n: int) -> dict[str, np.ndarray]:
        """Validate one teacher's output and return its columns as [N, width] storage arrays."""
        spec, seq = self.spec, (() if self.spec.seq_len is None else (self.spec.seq_len,))
        if spec.topk is None:
            if isinstance(out, tuple):
                raise ValueError(f"teacher {teacher!r}: the spec stores full logits, got a (values, indices) tuple")
            logits = np.asarray(out)
            _check_shape(teacher, "logits", logits.shape, (n, *seq, spec.num_classes))
            return {f"{teacher}/logits": self._cast_values(teacher, logits).reshape(n, -1)}
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                f"teacher {teacher!r}: the spec stores top-{spec.topk}; expected a (values, indices) tuple, "
                f"got {type(out).__name__}"
            )
        values, indices = np.asarray(out[0]), np.asarray(out[1])
        want = (n, *seq, spec.topk)
        _check_shape(teacher, "topk values", values.shape, want)
        _check_shape(teacher, "topk indices", indices.shape, want)
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"teacher {teacher!r}: topk indices must be integers, got {indices.dtype}")
        if indices.size and (indices.min() < 0 or indices.max() >= spec.num_classes):
            raise ValueError(
                f"teacher {teacher!r}: topk indices must lie in [0, {spec.num_classes}), "
                f"got range [{indices.min()}, {indices.max()}]"
            )
        return {
            f"{teacher}/topk_values": self._cast_values(teacher, values).reshape(n, -1),
            f"{teacher}/topk_indices": indices.astype(np.int32, copy=False).reshape(n, -1),
        }

    def _cast_values(self, teacher: str, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # overflow is detected and reported below
            out = np.ascontiguousarray(x, dtype=self.spec.dtype)
        # float16 tops out at 65504: an overflowing logit would become inf and NaN the loss later.
        if out.dtype != x.dtype and np.issubdtype(x.dtype, np.floating):
            bad = np.isinf(out) & np.isfinite(x)
            if bad.any():
                raise ValueError(
                    f"teacher {teacher!r}: values overflow {self.spec.dtype} "
                    f"(max |x| = {np.abs(x[bad]).max():.4g}); store them as float32 (cache.dtype=float32)"
                )
        return out

    def _take_pending(self, rows: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Pop the first ``rows`` buffered rows, keeping the rest buffered."""
        ids = np.concatenate(self._pending_ids)
        cols = {name: np.concatenate(parts) for name, parts in self._pending.items()}
        rest = len(ids) - rows
        self._pending_ids = [ids[rows:]] if rest else []
        self._pending = {name: ([a[rows:]] if rest else []) for name, a in cols.items()}
        self._pending_rows = rest
        return ids[:rows], {name: a[:rows] for name, a in cols.items()}

    def _write_shard(self, rows: int) -> None:
        ids, cols = self._take_pending(rows)
        arrays = [pa.array(ids, pa.int64())]
        for c in self._columns:
            flat = np.ascontiguousarray(cols[c.name]).reshape(-1)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), c.width))
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        self._tmp.mkdir(parents=True, exist_ok=True)
        name = _shard_name(len(self._shards))
        path = self._tmp / name
        pq.write_table(table, path)
        self._shards.append(
            {"file": name, "rows": rows, "sha256": _sha256_file(path),
             "first_id": int(ids[0]), "last_id": int(ids[-1])}
        )
        self._all_ids.append(ids)

    def _check_unique_ids(self) -> None:
        ids = np.concatenate(self._all_ids)
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            dups = uniq[counts > 1][:5].tolist()
            raise ValueError(f"{self.directory}: ids must be unique; duplicated ids include {dups}")

    def _write_manifest(self) -> None:
        manifest = {
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "teachers": list(self.spec.teachers),
            "columns": self._schema.names,
            "num_rows": sum(s["rows"] for s in self._shards),
            "shards": self._shards,
            "created_by": f"distill-ray {__version__}",
        }
        with open(self._tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")

    def _publish(self) -> None:
        """Rename the temp dir to ``directory``, replacing an existing cache there.

        A non-empty directory cannot be renamed over, so an old cache is first moved aside: a
        concurrent reader sees the old cache, then no cache, then the new one, never a mix.
        Crash durability is not needed from fsync: a torn shard fails its sha256 in verify().
        """
        target = self.directory
        aside = None
        if target.exists():
            self._check_target()
            aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
            os.replace(target, aside)
        try:
            os.replace(self._tmp, target)
        except BaseException:
            if aside is not None and not target.exists():
                os.replace(aside, target)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _check_shape(teacher: str, what: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"teacher {teacher!r}: {what} have shape {tuple(got)}, expected {tuple(want)} for this spec")


# ---------------------------------------------------------------------------------------------
# Verifying


def verify(directory: str | Path, expected: CacheSpec | None = None) -> dict[str, Any]:
    """Check a cache and return its manifest (the parsed JSON, unchanged).

    Raises CorruptCacheError for a missing/unparseable/other-format manifest, a missing shard, or
    a shard whose sha256, row count or schema differs from the manifest; StaleCacheError if
    ``expected`` is given and differs from the spec the cache was computed from. Staleness is
    checked before the shards are hashed, so a stale cache is refused without reading it all.
    """
    return _verify(Path(directory).expanduser(), expected)[0]


def _verify(d: Path, expected: CacheSpec | None) -> tuple[dict[str, Any], CacheSpec]:
    manifest, spec = _read_manifest(d)
    if expected is not None and expected != spec:
        raise StaleCacheError(_stale_message(d, spec, expected))
    schema = _schema(spec)
    total = 0
    for s in manifest["shards"]:
        _verify_shard(d, s, schema)
        total += s["rows"]
    if total != manifest["num_rows"]:
        raise CorruptCacheError(
            f"{d}: manifest num_rows={manifest['num_rows']} but its shards hold {total} rows; {_REBUILD_HINT}"
        )
    return manifest, spec


def _read_manifest(d: Path) -> tuple[dict[str, Any], CacheSpec]:
    path = d / MANIFEST
    if not d.is_dir():
        raise CorruptCacheError(f"{d}: no such cache directory; build it with `distill-ray cache CONFIG`")
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise CorruptCacheError(f"{d}: no {MANIFEST} (not a soft-target cache, or a write never finished); "
                                f"{_REBUILD_HINT}") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptCacheError(f"{d}: unreadable {MANIFEST} ({e}); {_REBUILD_HINT}") from e
    if not isinstance(m, dict):
        raise CorruptCacheError(f"{d}: {MANIFEST} is not a JSON object; {_REBUILD_HINT}")
    if m.get("format_version") != FORMAT_VERSION:
        raise CorruptCacheError(
            f"{d}: {MANIFEST} has format_version {m.get('format_version')!r}, this distill-ray "
            f"reads {FORMAT_VERSION}; {_REBUILD_HINT}"
        )
    try:
        spec = CacheSpec.from_dict(m["spec"])
        shards = m["shards"]
        problems = []
        if m["teachers"] != list(spec.teachers):
            problems.append(f"teachers {m['teachers']} do not match the spec's {list(spec.teachers)}")
        if m["columns"] != _schema(spec).names:
            problems.append(f"columns {m['columns']} do not match the spec's {_schema(spec).names}")
        if not isinstance(m["num_rows"], int) or not isinstance(shards, list):
            problems.append("num_rows must be an int and shards a list")
        for s in shards:
            # The file-name pattern also keeps an edited manifest from pointing outside the cache.
            if not (isinstance(s["file"], str) and _SHARD_RE.fullmatch(s["file"])
                    and isinstance(s["sha256"], str)
                    and all(isinstance(s[k], int) for k in ("rows", "first_id", "last_id"))):
                problems.append(f"bad shard entry {s!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCacheError(f"{d}: malformed {MANIFEST} ({type(e).__name__}: {e}); {_REBUILD_HINT}") from e
    if problems:
        raise CorruptCacheError(f"{d}: malformed {MANIFEST}: {'; '.join(problems)}; {_REBUILD_HINT}")
    return m, spec


def _verify_shard(d: Path, s: Mapping[str, Any], schema: pa.Schema) -> None:
    path = d / s["file"]
    if not path.is_file():
        raise CorruptCacheError(f"{d}: shard {s['file']} listed in {MANIFEST} is missing; {_REBUILD_HINT}")
    digest = _sha256_file(path)
    if digest != s["sha256"]:
        raise CorruptCacheError(
            f"{d}: shard {s['file']} is corrupt: sha256 {digest[:12]}… vs {s['sha256'][:12]}… "
            f"in {MANIFEST}; {_REBUILD_HINT}"
        )
    # The bytes match the manifest, so the footer is the one written; the checks below catch a
    # manifest edited to disagree with its shards, or a writer bug.
    try:
        with pq.ParquetFile(path) as pf:  # reads only the footer
            rows, got_schema = pf.metadata.num_rows, pf.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise CorruptCacheError(f"{d}: shard {s['file']} is not readable Parquet ({e}); {_REBUILD_HINT}") from e
    if rows != s["rows"]:
        raise CorruptCacheError(
            f"{d}: shard {s['file']} holds {rows} rows, {MANIFEST} says {s['rows']}; {_REBUILD_HINT}"
        )
    if not got_schema.equals(schema, check_metadata=False):
        raise CorruptCacheError(
            f"{d}: shard {s['file']} schema {got_schema} does not match the spec's {schema}; {_REBUILD_HINT}"
        )


def _short(v: Any) -> str:
    """Long fingerprints abbreviated the way people read them."""
    if isinstance(v, str):
        return v[:12] + "…" if len(v) > 16 else v
    return repr(v)


def _stale_message(d: Path, cached: CacheSpec, now: CacheSpec) -> str:
    lines = []
    for f in dataclasses.fields(CacheSpec):
        a, b = getattr(cached, f.name), getattr(now, f.name)
        if f.name == "teacher_fingerprints":
            for t in dict.fromkeys([*a, *b]):  # union, order kept
                fa, fb = a.get(t, "(absent)"), b.get(t, "(absent)")
                if fa != fb:
                    lines.append(f"teacher_fingerprints[{t!r}]: cached {_short(fa)} vs now {_short(fb)}")
            if set(a) == set(b) and list(a) != list(b):
                lines.append(f"teacher_fingerprints order: cached {list(a)} vs now {list(b)}")
        elif a != b:
            lines.append(f"{f.name}: cached {_short(a)} vs now {_short(b)}")
    detail = "\n  ".join(lines)
    return f"{d}: stale soft-target cache, computed from other inputs than now:\n  {detail}\nTo fix: {_REBUILD_HINT}."


# ---------------------------------------------------------------------------------------------
# Reading


class SoftTargets:
    """A verified cache loaded into memory as numpy, indexable by sample id.

    Values stay in their storage dtype in memory (float16 halves the footprint) and are cast to
    float32 per lookup. ``rows`` arguments are positions into ``ids`` (see ``rows_for``).
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], spec: CacheSpec, ids: np.ndarray,
                 columns: dict[str, np.ndarray]) -> None:
        """Use ``SoftTargets.open``; this only wires up already-verified arrays."""
        self.directory = directory
        self.manifest = manifest
        self.spec = spec
        self.teachers: tuple[str, ...] = spec.teachers
        self.ids = ids
        self._columns = columns
        # Sorted view for vectorised id -> row lookup (searchsorted), instead of a Python dict.
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        if len(ids) > 1 and (self._sorted_ids[1:] == self._sorted_ids[:-1]).any():
            raise CorruptCacheError(f"{directory}: duplicate ids in the cache; {_REBUILD_HINT}")

    @classmethod
    def open(cls, directory: str | Path, expected: CacheSpec | None = None) -> "SoftTargets":
        """``verify()`` the cache, then read every shard into memory."""
        d = Path(directory).expanduser()
        manifest, spec = _verify(d, expected)
        n = manifest["num_rows"]
        layout = _layout(spec)
        # Preallocated and filled shard by shard: peak memory is the cache plus one shard.
        ids = np.empty(n, np.int64)
        columns = {c.name: np.empty((n, *c.row_shape), c.dtype) for c in layout}
        start = 0
        for s in manifest["shards"]:
            table = pq.read_table(d / s["file"])
            stop = start + s["rows"]
            ids[start:stop] = table.column("id").to_numpy()
            if (ids[start], ids[stop - 1]) != (s["first_id"], s["last_id"]):
                raise CorruptCacheError(f"{d}: shard {s['file']} ids do not match {MANIFEST}; {_REBUILD_HINT}")
            for c in layout:
                columns[c.name][start:stop] = _fixed_list_to_numpy(table.column(c.name), c.row_shape)
            start = stop
        return cls(d, manifest, spec, ids, columns)

    def __len__(self) -> int:
        return len(self.ids)

    def rows_for(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions (int64, same shape as ``ids``) of the given sample ids.

        KeyError lists up to 5 ids that are not in the cache.
        """
        q = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, q)
        pos_clipped = np.minimum(pos, len(self._sorted_ids) - 1)
        found = (pos < len(self._sorted_ids)) & (self._sorted_ids[pos_clipped] == q)
        if not found.all():
            missing = q[~found]
            raise KeyError(
                f"{missing.size} id(s) not in soft-target cache {self.directory}, e.g. {missing[:5].tolist()}"
            )
        return self._order[pos_clipped]

    def logits(self, teacher: str, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), C] (or [len(rows), S, C]); full-logit caches only."""
        self._require_mode(full=True, what="logits")
        return self._column(teacher, "logits")[rows].astype(np.float32)

    def topk(self, teacher: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values float32, class indices int64), each [len(rows), k] (or [.., S, k]); top-k caches only."""
        self._require_mode(full=False, what="topk")
        values = self._column(teacher, "topk_values")[rows].astype(np.float32)
        indices = self._column(teacher, "topk_indices")[rows].astype(np.int64)
        return values, indices

    def stacked_logits(self, rows: np.ndarray) -> np.ndarray:
        """float32 [K, len(rows), C] (or [K, len(rows), S, C]), teachers in spec order."""
        self._require_mode(full=True, what="stacked_logits")
        first = self._column(self.teachers[0], "logits")[rows]
        out = np.empty((len(self.teachers), *first.shape), np.float32)
        out[0] = first
        for i, t in enumerate(self.teachers[1:], start=1):
            out[i] = self._column(t, "logits")[rows]  # assignment casts to float32 in place
        return out

    def _column(self, teacher: str, kind: str) -> np.ndarray:
        if teacher not in self.spec.teacher_fingerprints:
            raise KeyError(f"teacher {teacher!r} is not in cache {self.directory}; it holds {list(self.teachers)}")
        return self._columns[f"{teacher}/{kind}"]

    def _require_mode(self, full: bool, what: str) -> None:
        k = self.spec.topk
        if full and k is not None:
            raise ValueError(f"{self.directory}: cache stores top-{k} values only; use topk(), not {what}()")
        if not full and k is None:
            raise ValueError(f"{self.directory}: cache stores full logits; use logits(), not {what}()")


def _fixed_list_to_numpy(col: pa.ChunkedArray, row_shape: tuple[int, ...]) -> np.ndarray:
    """A FixedSizeList column as [rows, *row_shape], zero-copy when it is a single chunk."""
    # flatten() (not .values) honours a chunk's slice offset.
    parts = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in col.chunks]
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return flat.reshape(-1, *row_shape)


def to_ray_dataset(directory: str | Path, expected: CacheSpec | None = None) -> "ray.data.Dataset":
    """The verified cache's shards as a Ray Dataset (columns as in the Parquet files).

    Row order across blocks is not guaranteed by Ray; join on the ``id`` column.
    """
    import ray.data  # lazy: importing this module must stay light

    d = Path(directory).expanduser()
    manifest = verify(d, expected)
    return ray.data.read_parquet([str(d / s["file"]) for s in manifest["shards"]])
