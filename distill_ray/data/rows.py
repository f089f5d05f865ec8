"""The row stage and its pure pieces: every source's rows become ``id``, ``split`` and ``label`` here.

Sample ids (given, or a stable hash of the row's content), splits decided by the id (so they never
depend on read order, block boundaries or parallelism), label ids with every bad label named, the
seeded subsets, and the per-split counts and feature sums the driver collects. Plain numpy, no
Ray: ``sources`` runs these functions as Ray Data stages, and the bundled loaders, the
transfer set and the Train loop's shards call the same ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa


class DataError(ValueError):
    """User data cannot be used as configured; the message names the file and/or column and the fix."""


IGNORE_LABEL = -100  # a label position that trains nothing (prompt tokens, padding), as in transformers

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}

PATH_COLUMN = "path"  # added by read_*(include_paths=True), dropped after the row stage


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed bijection of uint64 that scatters nearby ids."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def id_uniform(ids: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """A float in [0, 1) per sample id, fixed by (id, seed, salt): splits and subsets decided by it
    never depend on read order, block boundaries or parallelism."""
    with np.errstate(over="ignore"):
        key = np.asarray(ids).astype(np.int64).view(np.uint64) ^ mix64(np.array([seed * 1_000_003 + salt]))[0]
    return (mix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_by_id(ids: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """'train' / 'val' / 'test' per id: the first ``test_fraction`` of the id-hash range is test, the
    next ``val_fraction`` validation."""
    u = id_uniform(ids, seed)
    return np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train")).astype(object)


def hash_to_id(values: Sequence) -> np.ndarray:
    """Stable non-negative int64 ids from strings/bytes (sha256, first 8 bytes)."""
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        raw = v if isinstance(v, bytes) else str(v).encode()
        out[i] = int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") & (2**63 - 1)
    return out


def content_ids(columns: Mapping[str, Sequence]) -> np.ndarray:
    """The default sample id: a stable hash of the row's content (column names and values), so the
    same row gets the same id in every run, whatever file or block it arrives in."""
    names = sorted(columns)
    n = len(columns[names[0]]) if names else 0
    rows = [b"\x1f".join(f"{name}={_canonical(columns[name][i])}".encode() for name in names) for i in range(n)]
    return hash_to_id(rows)


def _canonical(value: Any) -> str:
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest() + str(value.dtype) + str(value.shape)
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return repr(value.item() if isinstance(value, np.generic) else value)


def normalise_split_names(values: Sequence, column: str, source: str) -> np.ndarray:
    """A split column's values as train / val / test; anything else is an error naming it."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        name = SPLIT_NAMES.get(str(v).strip().lower()) if v is not None else None
        if name is None:
            raise DataError(f"{source}: column {column!r} holds {v!r}; a split column holds train, val "
                            f"(or validation/valid/dev) or test")
        out[i] = name
    return out


def label_ids(values: Sequence, column: str, source: str, class_names: Sequence[str] | None,
              nan_is_missing: bool = False) -> np.ndarray:
    """Labels as int64 class ids, -1 for an unlabeled row (null, or a negative int).

    Ints stay as they are; strings map through ``class_names`` (sorted unique strings, found once
    over the train data). NaN, floats that are not whole numbers, bools and mixed types are errors
    naming the column and the source. ``nan_is_missing``: the reader turned missing values into NaN
    (JSON lines and CSV through pandas), so a NaN label marks an unlabeled row, not an error.
    """
    out = np.full(len(values), -1, dtype=np.int64)
    kinds = set()
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, (bool, np.bool_)):
            raise DataError(f"{source}: column {column!r} holds a boolean label ({v!r}); use ints or strings")
        if isinstance(v, (str, np.str_)):
            kinds.add("string")
            if class_names is None:  # the data's label type is numeric, yet here is a string
                raise DataError(f"{source}: column {column!r} holds {v!r} where the data's labels are numbers: it "
                                "mixes numbers and strings; use one type for labels")
            if class_names is not None:
                try:
                    out[i] = class_names.index(str(v))
                except ValueError:
                    raise DataError(f"{source}: column {column!r} holds label {v!r}, which the train data does "
                                    f"not have (classes: {', '.join(class_names[:20])})") from None
            continue
        if isinstance(v, (float, np.floating)):
            if nan_is_missing and np.isnan(v):
                continue
            if not np.isfinite(v):
                raise DataError(f"{source}: column {column!r} holds NaN/inf labels; leave the label empty (null) "
                                "for an unlabeled row")
            if float(v) != int(v):
                raise DataError(f"{source}: column {column!r} holds a non-integer label {v!r}; labels are class "
                                "ids or names")
        kinds.add("number")
        out[i] = int(v) if int(v) >= 0 else -1
    if len(kinds) > 1:
        raise DataError(f"{source}: column {column!r} mixes numbers and strings; use one type for labels")
    if kinds == {"string"} and class_names is None:
        raise DataError(f"{source}: column {column!r} holds strings but no class names were found")
    return out


def standardise_stats(count: int, total: np.ndarray, total_sq: np.ndarray) -> dict[str, list[float]]:
    """Mean and std from running sums (std of a constant column is 1, so it maps to 0, not NaN)."""
    mean = total / max(count, 1)
    var = np.maximum(total_sq / max(count, 1) - mean**2, 0.0)
    std = np.sqrt(var)
    return {"mean": mean.astype(np.float64).tolist(), "std": np.where(std > 1e-12, std, 1.0).tolist()}


def apply_standardise(x: np.ndarray, transform: Mapping[str, Sequence[float]]) -> np.ndarray:
    """The saved tabular transform, as training applied it and Serve applies it to raw requests."""
    mean = np.asarray(transform["mean"], dtype=np.float32)
    std = np.asarray(transform["std"], dtype=np.float32)
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)


# --- the row stage: id, split, label ---------------------------------------------------------------

@dataclass(frozen=True)
class RowPlan:
    """What the row stage does with one source's raw batches (pickled into Ray tasks)."""

    kind: str
    task: str
    input_columns: tuple[str, ...]
    label_field: str | None
    class_names: tuple[str, ...] | None
    id_field: str | None
    split: str | None  # a fixed split (val_path / test_path), else split_field or fractions
    split_field: str | None
    val_fraction: float
    test_fraction: float
    split_seed: int
    label_from_folder: bool = False
    nan_is_missing: bool = False  # JSON lines / CSV: the reader turns a missing label into NaN


def row_stage(batch: dict[str, np.ndarray], plan: RowPlan) -> dict[str, np.ndarray]:
    """One raw batch as the plan's input columns plus ``id``, ``split`` and ``label``."""
    paths = batch.get(PATH_COLUMN)
    source = _source_name(paths)
    n = len(next(iter(batch.values())))
    if plan.id_field is not None:
        raw_ids = batch[plan.id_field]
        ids = raw_ids.astype(np.int64) if np.issubdtype(np.asarray(raw_ids).dtype, np.integer) else hash_to_id(raw_ids)
    else:
        content = {c: batch[c] for c in plan.input_columns}
        if plan.label_field and plan.label_field in batch:
            content[plan.label_field] = batch[plan.label_field]
        if plan.kind == "image" and paths is not None and plan.label_from_folder:
            content = {"image": batch["image"]}  # the same picture in two folders is one sample
        ids = content_ids(content)
    if plan.split is not None:
        split = np.array([plan.split] * n, dtype=object)
    elif plan.split_field is not None:
        split = normalise_split_names(list(batch[plan.split_field]), plan.split_field, source)
    else:
        split = split_by_id(ids, plan.val_fraction, plan.test_fraction, plan.split_seed)
    if plan.kind == "tokens":
        labels = np.asarray(batch["label"], dtype=np.int64)
    elif plan.label_from_folder:
        names = [Path(str(p)).parent.name for p in paths]
        labels = label_ids(names, "folder name", source, list(plan.class_names))
    elif plan.label_field is not None and plan.label_field in batch and plan.task == "classification":
        labels = label_ids(list(batch[plan.label_field]), plan.label_field, source,
                           list(plan.class_names) if plan.class_names else None, nan_is_missing=plan.nan_is_missing)
    else:
        labels = np.full(n, -1, dtype=np.int64)
    out = {c: batch[c] for c in plan.input_columns}
    out.update({"id": ids, "split": split.astype(str), "label": labels})
    return out


def _source_name(paths) -> str:
    if paths is None or len(paths) == 0:
        return "data"
    first = str(paths[0])
    return first if all(str(p) == first for p in paths[:50]) else f"{first} (and others)"


def subset_by_id(batch: dict[str, np.ndarray], shares: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """A seeded subset per split, decided by the id (max_train_samples / max_eval_samples)."""
    u = id_uniform(batch["id"], seed, salt=1)
    limit = np.array([shares.get(s, 1.0) for s in batch["split"]], dtype=np.float64)
    mask = u < limit
    return {k: v[mask] for k, v in batch.items()}


def keep_train_labels(batch: dict[str, np.ndarray], share: float, seed: int) -> dict[str, np.ndarray]:
    """Labels stay on a seeded share of the train rows, decided by the id (data.labeled_fraction /
    max_labeled_samples); the other train rows become unlabeled (-1), a transfer set for KD."""
    drop = (batch["split"] == "train") & (id_uniform(batch["id"], seed, salt=2) >= share)
    batch["label"] = np.where(drop, np.int64(-1), batch["label"])
    return batch


def long_tail_shares(counts: Sequence[int], imbalance: float) -> list[float]:
    """The share of each class's labeled train rows that ``data.long_tail`` keeps: class c (label order,
    C classes) is cut to about ``n_max * imbalance ** (-c / (C - 1))`` rows, n_max the largest class's
    count (Cao et al.'s and Cui et al.'s exponential profile), so ``min(1, that / n_c)``; a class with
    no rows keeps its share 1 (nothing to cut). One class: nothing is cut."""
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) < 2:
        return [1.0] * len(counts)
    target = counts.max() * float(imbalance) ** (-np.arange(len(counts)) / (len(counts) - 1))
    return np.where(counts > 0, np.minimum(1.0, target / np.maximum(counts, 1.0)), 1.0).tolist()


def keep_long_tail(batch: dict[str, np.ndarray], shares: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """The long-tailed train split (``data.long_tail``): a labeled train row of class c stays when its
    id's seeded uniform is below ``shares[c]`` (``long_tail_shares``), so which rows stay is fixed by
    (id, seed), whatever the read order; validation, test and unlabeled rows all stay."""
    label = np.asarray(batch["label"])
    share = np.asarray(shares, dtype=np.float64)[np.clip(label, 0, len(shares) - 1)]
    cut = (np.asarray(batch["split"]) == "train") & (label >= 0)
    keep = ~cut | (id_uniform(batch["id"], seed, salt=3) < share)
    return {k: v[keep] for k, v in batch.items()}


def class_counts_text(labels: np.ndarray) -> str:
    """Labeled rows per class (labels >= 0) as "n_0,n_1,...", up to the largest label: a block's class
    counts in one string column (blocks differ in their largest label)."""
    labels = np.asarray(labels)
    labels = labels[labels >= 0]
    return ",".join(str(int(n)) for n in np.bincount(labels)) if len(labels) else ""


def sum_class_counts(texts: Sequence[str]) -> tuple[int, ...]:
    """The per-block ``class_counts_text`` strings summed per class."""
    total: list[int] = []
    for text in texts:
        for c, n in enumerate(int(v) for v in text.split(",") if v):
            total.extend([0] * (c + 1 - len(total)))
            total[c] += n
    return tuple(total)


def split_stats(batch: dict[str, np.ndarray], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per block: rows and labeled rows per split, the train rows' labeled rows per class
    (``class_counts_text``; classification) and feature sums."""
    out = {"split": [], "rows": [], "labeled": [], "sum": [], "sum_sq": [], "label_max": [], "class_counts": []}
    label = np.asarray(batch["label"])
    labeled = (label >= 0) if label.ndim == 1 else np.ones(len(label), bool)
    for split in SPLITS:
        mask = np.asarray(batch["split"]) == split
        if not mask.any():
            continue
        if fields and split == "train":
            x = np.stack([np.asarray(batch[f], dtype=np.float64)[mask] for f in fields], axis=1)
            s, sq = x.sum(0), (x * x).sum(0)
        else:
            s = sq = np.zeros(len(fields))
        out["split"].append(split)
        out["rows"].append(int(mask.sum()))
        out["labeled"].append(int(labeled[mask].sum()))
        out["sum"].append(s)
        out["sum_sq"].append(sq)
        out["label_max"].append(int(label[mask].max()) if label.ndim == 1 else -1)
        out["class_counts"].append(class_counts_text(label[mask]) if label.ndim == 1 and split == "train" else "")
    width = len(fields)
    return {"split": np.array(out["split"], dtype=object).astype(str), "rows": np.array(out["rows"], np.int64),
            "label_max": np.array(out["label_max"], np.int64),
            "labeled": np.array(out["labeled"], np.int64),
            "class_counts": np.array(out["class_counts"], dtype=object).astype(str),
            "sum": np.array(out["sum"], np.float64).reshape(len(out["rows"]), width),
            "sum_sq": np.array(out["sum_sq"], np.float64).reshape(len(out["rows"]), width)}


def rows_of_split(batch: pa.Table, split: str) -> pa.Table:
    """The rows of one split, without the ``split`` column."""
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("split"), split)).drop_columns(["split"])

