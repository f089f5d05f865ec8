"""Ray Data sources: your files (parquet, jsonl, csv, text, images) or a bundled preset, as one
Dataset per split whose rows are ``id`` (int64), ``x`` (the model input) and ``label``.

The path from storage to the model input is Ray Data stages end to end:

    read_* -> rows (id, split, label: one map_batches) -> preprocess (standardise / tokenize /
    decode images: one map_batches) -> filter per split

Nothing is collected on the driver but small statistics: rows and labeled rows per split, label
names, the train split's feature sums for standardisation, and a sample of the train file's first
rows to judge string columns. Every column is either an input or named in ``DataInfo.left_out``
with why, so none drops out in silence. Splits come from ``data.val_path`` /
``data.test_path``, else a ``data.split_field`` column, else seeded fractions decided by the sample id
(``rows.id_uniform``), so a split never depends on read order or parallelism. The bundled presets
are written once as Parquet (with their historical splits in a ``split`` column) and then read like
anyone's data.

``load_source`` is one decision procedure (which columns, which kind, which split, which labels) whose
every branch must fail the same clear way; it reads as its steps, each a named function: where the rows
come from and reading them (``readers``), the train schema checked and each column's role decided, the
other files checked against it and the label names (``columns``), then the row stage, subsets, counts,
preprocessing per kind and the transfer-set stage (below). The Ray Data stages these run are the pure
functions of ``rows`` and ``preprocess``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import ray
import ray.data

from distill_ray.config import ExperimentConfig, PRESETS
from distill_ray.data.columns import Layout, check_split_schemas, column_layout, label_names
from distill_ray.data.preprocess import decode_image, feature_rows, image_rows, instruction_rows, instruction_stats, \
    pil_image, taught_rows, tokenize_rows, window_rows
from distill_ray.data.readers import Origin, is_uri, read_rows, run_data_action, source_origin, table_format
from distill_ray.data.rows import SPLITS, DataError, RowPlan, keep_long_tail, keep_train_labels, long_tail_shares, \
    row_stage, rows_of_split, split_stats, standardise_stats, subset_by_id, sum_class_counts
from distill_ray.data.transfer import resolve_transfer, with_transfer_rows


@dataclass(frozen=True)
class DataInfo:
    """What the rest of the system needs to know about the data: small, plain, JSON-able."""

    task: str
    kind: str
    """tabular (x float32 [F]), text (x token ids [L]), image (x float32 [C, H, W]) or tokens (causal LM windows)."""
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    counts: Mapping[str, int]
    """Rows per split."""
    labeled: Mapping[str, int]
    """Labeled rows per split (the rest are KD-only)."""
    fingerprint: str
    """Changes whenever the samples, their split or their preprocessing could change."""
    tokenizer: str | None = None
    pad_id: int | None = None
    feature_fields: tuple[str, ...] = ()
    transform: Mapping[str, Any] | None = None
    """Tabular standardisation {mean, std} from the train split; saved with the student for Serve."""
    image_mode: str | None = None
    source: str = ""
    truncated: Mapping[str, int] | None = None
    """Instruction data: rows per split whose prompt + response was cut at data.max_length."""
    source_fingerprint: str = ""
    """The fingerprint of the source rows alone (no transfer rows): what recipe teachers, which train on
    the labeled rows, are keyed by."""
    transfer: str = "none"
    """The transfer set's kind (data.transfer resolved: none, mixup, noise or augment)."""
    transfer_rows: int = 0
    """Train rows made by data.transfer (KD only; counted in counts['train'], not in labeled)."""
    left_out: Mapping[str, str] = field(default_factory=dict)
    """Columns of data.path that are not model inputs -> why ("label column", "mostly text", ...), in
    column order: the data line and the report name them, so no column drops out in silence."""
    class_counts: tuple[int, ...] = ()
    """Classification: labeled train rows per class, [num_classes] (after data.long_tail and the labeled
    share; transfer rows are unlabeled, not counted): the long-tail loss terms' and the report's. Empty
    for a language model."""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataInfo":
        d = dict(d)
        for key in ("class_names", "input_shape", "feature_fields", "class_counts"):
            d[key] = tuple(d.get(key) or ())
        d["left_out"] = dict(d.get("left_out") or {})  # absent in infos saved before it existed
        return cls(**d)


@dataclass
class SourceData:
    """The preprocessed splits (lazy Ray Datasets: nothing is read until something iterates them)."""

    info: DataInfo
    rows: ray.data.Dataset
    """Every split's rows with a ``split`` column (what the cache builder reads, in one pass)."""
    splits: dict[str, ray.data.Dataset] = field(default_factory=dict)

    @property
    def train(self) -> ray.data.Dataset:
        return self.splits["train"]

    @property
    def val(self) -> ray.data.Dataset:
        return self.splits["val"]

    @property
    def test(self) -> ray.data.Dataset:
        return self.splits["test"]


# --- the entry point: load_source reads as its steps (from readers, columns, then the ones below) ------

def load_source(cfg: ExperimentConfig) -> SourceData:
    """The configured data as preprocessed Ray Datasets per split, validated; bad input raises
    DataError naming the file and column."""
    d = cfg.data
    origin = source_origin(cfg)
    raw = {split: run_data_action(f"reading {path}", functools.partial(read_rows, origin.fmt, path, d.task))
           for split, path in origin.sources.items() if path}
    layout = column_layout(d, origin, raw["train"])
    check_split_schemas(d, raw, origin, layout)
    class_names = label_names(d, origin, raw, layout)
    rows = _row_stage(d, origin, raw, layout, class_names)
    rows, stats = _subsets(d, origin.path, rows, layout.feature_fields, len(class_names) if class_names else None)
    counts = _count_rows(stats, layout.feature_fields)
    if not (layout.kind == "text" and d.task == "causal_lm"):  # LM windows are counted after tokenization
        _check_splits(counts.rows, origin.path)
    pre = _preprocess(d, origin, layout, rows, counts)
    source_fingerprint = _fingerprint(cfg, origin.sources, origin.preset_meta, pre.counts)
    staged, transfer, transfer_rows, row_counts = _transfer_stage(d, layout.kind, pre)
    class_names, num_classes = _classes(d, origin.path, class_names, counts.label_max, pre.num_classes)
    info = DataInfo(task=d.task, kind=layout.kind, num_classes=int(num_classes), class_names=class_names,
                    input_shape=tuple(int(s) for s in pre.input_shape), counts=row_counts, labeled=pre.labeled,
                    fingerprint=_with_transfer(source_fingerprint, transfer, d.transfer_size),
                    source_fingerprint=source_fingerprint, tokenizer=pre.tokenizer_dir, pad_id=pre.pad_id,
                    feature_fields=layout.feature_fields, transform=pre.transform, image_mode=pre.image_mode,
                    source=str(origin.path), truncated=pre.truncated, transfer=transfer, transfer_rows=transfer_rows,
                    left_out=layout.left_out, class_counts=_padded(counts.classes, num_classes)
                    if d.task == "classification" else ())
    splits = {s: staged.map_batches(rows_of_split, fn_kwargs={"split": s}, batch_format="pyarrow") for s in SPLITS}
    return SourceData(info=info, rows=staged, splits=splits)


def _row_stage(d, origin: Origin, raw: Mapping[str, ray.data.Dataset], layout: Layout,
               class_names: tuple[str, ...] | None) -> ray.data.Dataset:
    """Every source's rows as id, split, label and the input columns, in one Dataset. Rows of
    data.unlabeled_path join train without labels; the other sources keep theirs."""
    rows = None
    for split, ds in raw.items():
        fixed = "train" if split == "unlabeled" else split if origin.eval_paths else None
        plan = RowPlan(kind=layout.kind, task=d.task, input_columns=layout.input_columns,
                       label_field=None if layout.kind == "tokens" or split == "unlabeled" else layout.label_field,
                       class_names=class_names, id_field=d.id_field if not origin.preset else "id",
                       split=fixed, split_field=origin.split_field if fixed is None else None,
                       val_fraction=d.val_fraction, test_fraction=d.test_fraction, split_seed=d.split_seed,
                       label_from_folder=origin.folder_images and split != "unlabeled",
                       nan_is_missing=(table_format(origin.path) if origin.fmt == "images" else origin.fmt)
                       in ("jsonl", "csv"))
        staged = ds.map_batches(row_stage, fn_kwargs={"plan": plan}, batch_format="numpy")
        rows = staged if rows is None else rows.union(staged)
    return rows


def _subsets(d, path: str, rows: ray.data.Dataset, feature_fields: tuple[str, ...], num_classes: int | None
             ) -> tuple[ray.data.Dataset, list[dict[str, Any]]]:
    """The seeded subsets (max_train_samples / max_eval_samples, the long-tailed train split of
    data.long_tail, then the labeled share of train), and the per-block statistics of the rows that are
    left. ``num_classes``: the label names' count (None: labels are numbers, classes 0..largest)."""
    def stats_of(staged: ray.data.Dataset) -> list[dict[str, Any]]:
        return run_data_action(f"reading {path}", lambda: staged.map_batches(
            split_stats, fn_kwargs={"fields": feature_fields}, batch_format="numpy").take_all())

    stats = stats_of(rows)
    if d.format not in PRESETS and (d.max_train_samples or d.max_eval_samples):  # presets subset exactly
        seen = {s: sum(int(r["rows"]) for r in stats if r["split"] == s) for s in SPLITS}
        cap = {"train": d.max_train_samples, "val": d.max_eval_samples, "test": d.max_eval_samples}
        shares = {s: (cap[s] / seen[s] if cap[s] and seen[s] > cap[s] else 1.0) for s in SPLITS}
        rows = rows.map_batches(subset_by_id, fn_kwargs={"shares": shares, "seed": d.split_seed}, batch_format="numpy")
        stats = stats_of(rows)
    if d.long_tail.imbalance is not None and d.task == "classification":
        counts = _padded(sum_class_counts([r["class_counts"] for r in stats if r["split"] == "train"]),
                         num_classes or max(int(r["label_max"]) for r in stats) + 1)
        rows = rows.map_batches(keep_long_tail, fn_kwargs={"shares": long_tail_shares(counts, d.long_tail.imbalance),
                                                           "seed": d.long_tail.seed}, batch_format="numpy")
        stats = stats_of(rows)
    if d.labeled_fraction is not None or d.max_labeled_samples is not None:
        labeled_train = sum(int(r["labeled"]) for r in stats if r["split"] == "train")
        share = d.labeled_fraction if d.labeled_fraction is not None else \
            min(1.0, d.max_labeled_samples / max(1, labeled_train))
        rows = rows.map_batches(keep_train_labels, fn_kwargs={"share": share, "seed": d.split_seed},
                                batch_format="numpy")
        stats = stats_of(rows)
    return rows, stats


@dataclass(frozen=True)
class RowCounts:
    """The per-block statistics summed: rows and labeled rows per split, the largest label, and the
    train rows' feature sums (for standardisation)."""

    rows: dict[str, int]
    labeled: dict[str, int]
    label_max: int
    feature_sum: np.ndarray
    feature_sum_sq: np.ndarray
    classes: tuple[int, ...] = ()
    """Labeled train rows per class, up to the largest train label."""


def _count_rows(stats: list[dict[str, Any]], feature_fields: tuple[str, ...]) -> RowCounts:
    rows = {s: 0 for s in SPLITS}
    labeled = {s: 0 for s in SPLITS}
    total = np.zeros(len(feature_fields))
    total_sq = np.zeros(len(feature_fields))
    for block in stats:
        rows[block["split"]] += int(block["rows"])
        labeled[block["split"]] += int(block["labeled"])
        if block["split"] == "train":
            total += np.asarray(block["sum"])
            total_sq += np.asarray(block["sum_sq"])
    return RowCounts(rows, labeled, max([int(b["label_max"]) for b in stats] or [-1]), total, total_sq,
                     sum_class_counts([b["class_counts"] for b in stats if b["split"] == "train"]))


def _padded(counts: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
    """Per-class counts with a zero for each class past the largest label counted, up to ``num_classes``."""
    return tuple(int(n) for n in counts) + (0,) * (num_classes - len(counts))


# --- preprocessing per kind --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocessed:
    """The rows as model inputs and what preprocessing learned about them."""

    rows: ray.data.Dataset
    input_shape: tuple[int, ...]
    counts: dict[str, int]
    """Rows per split: the row stage's, or (instructions, causal-LM windows) the tokenized rows'."""
    labeled: dict[str, int]
    num_classes: int = 0
    """The tokenizer's vocabulary for language models; 0 until the labels decide it (``_classes``)."""
    tokenizer_dir: str | None = None
    tokenizer: Any = None
    pad_id: int | None = None
    transform: Mapping[str, Any] | None = None
    image_mode: str | None = None
    truncated: dict[str, int] | None = None


def _preprocess(d, origin: Origin, layout: Layout, rows: ray.data.Dataset, counts: RowCounts) -> Preprocessed:
    """One Ray Data stage per kind: standardised features, decoded images, or token ids."""
    if layout.kind == "tabular":
        return _tabular_stage(rows, layout.feature_fields, counts)
    if layout.kind == "image":
        return _image_stage(d, origin, rows, layout.input_columns[0], counts)
    from distill_ray.data.bundled import load_tokenizer, resolve_tokenizer

    tokenizer_dir = str(resolve_tokenizer(d.tokenizer))
    tok = load_tokenizer(tokenizer_dir)
    text = Preprocessed(rows, (d.max_length,), counts.rows, counts.labeled, tokenizer_dir=tokenizer_dir, tokenizer=tok,
                        pad_id=int(tok.pad_token_id if tok.pad_token_id is not None else 0))
    if layout.kind == "tokens":  # a preset's windows, tokenized when it was written
        return dataclasses.replace(text, num_classes=len(tok))
    if layout.instruction_fields:
        return _instruction_stage(d, origin.path, text, layout.instruction_fields)
    if d.task == "causal_lm":
        return _window_stage(d, origin.path, text, layout.input_columns[0])
    return dataclasses.replace(text, rows=rows.map_batches(
        tokenize_rows, fn_kwargs={"text_field": layout.input_columns[0], "tokenizer": tokenizer_dir,
                                  "max_length": d.max_length}, batch_format="numpy"))


def _tabular_stage(rows: ray.data.Dataset, feature_fields: tuple[str, ...], counts: RowCounts) -> Preprocessed:
    transform = standardise_stats(counts.rows["train"], counts.feature_sum, counts.feature_sum_sq)
    staged = rows.map_batches(feature_rows, fn_kwargs={"fields": feature_fields, "transform": transform},
                              batch_format="numpy")
    return Preprocessed(staged, (len(feature_fields),), counts.rows, counts.labeled, transform=transform)


def _image_stage(d, origin: Origin, rows: ray.data.Dataset, column: str, counts: RowCounts) -> Preprocessed:
    """Every image decoded to the first image's mode (grey or RGB) and shape (or data.image_size)."""
    path = origin.path
    base_dir = None if origin.folder_images or is_uri(path) else str(Path(path).expanduser().parent)
    first = run_data_action(f"reading {path}", functools.partial(rows.take, 1))
    if not first:
        raise DataError(f"{path}: no images")
    probe = first[0][column]
    image_mode = _image_mode(probe, base_dir)
    shape = decode_image(probe, image_mode, d.image_size, base_dir).shape
    staged = rows.map_batches(image_rows, fn_kwargs={"column": column, "mode": image_mode, "size": d.image_size,
                                                     "shape": shape, "base_dir": base_dir}, batch_format="numpy")
    return Preprocessed(staged, tuple(shape), counts.rows, counts.labeled, image_mode=image_mode)


def _image_mode(probe: Any, base_dir: str | None) -> str:
    """L for a grey first image, else RGB."""
    if isinstance(probe, np.ndarray) and probe.dtype != object:
        return "L" if probe.ndim == 2 or probe.shape[-1] == 1 else "RGB"
    import io

    Image = pil_image()
    img = Image.open(io.BytesIO(probe)) if isinstance(probe, (bytes, bytearray)) else \
        Image.open(Path(base_dir or ".") / str(probe))
    return "L" if img.mode in ("L", "1", "I", "I;16", "F") else "RGB"


def _instruction_stage(d, path: str, text: Preprocessed, fields: tuple[str, ...]) -> Preprocessed:
    """Prompt + response as one sequence per row; rows whose prompt fills the window are dropped and the
    rest counted (and those cut at data.max_length)."""
    staged = text.rows.map_batches(instruction_rows, fn_kwargs={"fields": fields, "tokenizer": text.tokenizer_dir,
                                                                "max_length": d.max_length, "pad_id": text.pad_id},
                                   batch_format="numpy")
    seq_stats = run_data_action(f"tokenizing {path}", lambda: staged.map_batches(instruction_stats,
                                                                                 batch_format="numpy").take_all())
    staged = staged.map_batches(taught_rows, batch_format="numpy")
    counts, truncated = {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}
    for block in seq_stats:
        counts[block["split"]] += int(block["rows"]) - int(block["untaught"])
        truncated[block["split"]] += int(block["cut"])
    _check_splits(counts, path, hint="raise data.max_length: prompts fill the window")
    return dataclasses.replace(text, rows=staged, num_classes=len(text.tokenizer), counts=counts, labeled=dict(counts),
                               truncated=truncated)


def _window_stage(d, path: str, text: Preprocessed, text_field: str) -> Preprocessed:
    """Causal LM on plain text: each text's token stream cut into windows, counted per split."""
    staged = text.rows.map_batches(window_rows, fn_kwargs={"text_field": text_field, "tokenizer": text.tokenizer_dir,
                                                           "max_length": d.max_length}, batch_format="numpy")
    window_stats = run_data_action(f"tokenizing {path}", lambda: staged.map_batches(
        split_stats, fn_kwargs={"fields": ()}, batch_format="numpy").take_all())
    counts = {s: 0 for s in SPLITS}
    for block in window_stats:
        counts[block["split"]] += int(block["rows"])
    _check_splits(counts, path, hint="lower data.max_length or add text")
    return dataclasses.replace(text, rows=staged, num_classes=len(text.tokenizer), counts=counts, labeled=dict(counts))


def _transfer_stage(d, kind: str, pre: Preprocessed) -> tuple[ray.data.Dataset, str, int, dict[str, int]]:
    """The transfer set (data.transfer resolved) added to train: the rows, its kind, the rows it adds,
    and the rows per split with them."""
    transfer = resolve_transfer(d.transfer, kind, d.task, pre.labeled["train"], pre.counts["train"] - pre.labeled["train"])
    if transfer == "none":
        return pre.rows, transfer, 0, pre.counts
    tokens = None
    if kind == "text":
        tok = pre.tokenizer
        tokens = {"pad_id": pre.pad_id, "mask_id": tok.mask_token_id, "special_ids": list(tok.all_special_ids)}
    staged = pre.rows.map_batches(with_transfer_rows, fn_kwargs={"kind": transfer, "data_kind": kind,
                                                                 "copies": d.transfer_size, "seed": d.split_seed,
                                                                 "tokens": tokens}, batch_format="numpy")
    transfer_rows = pre.counts["train"] * d.transfer_size
    return staged, transfer, transfer_rows, {**pre.counts, "train": pre.counts["train"] + transfer_rows}


def _classes(d, path: str, class_names: tuple[str, ...] | None, label_max: int,
             num_classes: int) -> tuple[tuple[str, ...], int]:
    """(label names, number of classes): classification needs some labeled row; without names, the
    classes are 0..largest label."""
    if d.task == "classification":
        if not class_names and label_max < 0:
            raise DataError(f"{path}: no row has a label; classification needs labels on some rows (a teacher "
                            "recipe and the learned blend train on them)")
        num_classes = len(class_names) if class_names else label_max + 1
        if class_names is None:
            class_names = tuple(str(i) for i in range(num_classes))
    return tuple(class_names or ()), num_classes


def _with_transfer(fingerprint: str, transfer: str, size: int) -> str:
    """The data's fingerprint with its transfer rows: unchanged without them (caches built before
    data.transfer existed stay valid)."""
    if transfer == "none":
        return fingerprint
    return hashlib.sha256(f"{fingerprint}+transfer={transfer}x{size}".encode()).hexdigest()[:16]


def _check_splits(counts: Mapping[str, int], path: str, hint: str = "") -> None:
    for split in SPLITS:
        if counts.get(split, 0) == 0:
            how = {"train": "data.path has no training rows",
                   "val": "set data.val_path, give data.split_field rows named 'val', or raise data.val_fraction",
                   "test": "set data.test_path, give data.split_field rows named 'test', or raise data.test_fraction"}
            raise DataError(f"{path}: the {split} split is empty ({', '.join(f'{s}: {n}' for s, n in counts.items())}); "
                            f"{how[split]}" + (f"; {hint}" if hint else ""))


def _fingerprint(cfg: ExperimentConfig, sources: Mapping[str, str], preset_meta: Mapping[str, Any],
                 counts: Mapping[str, int]) -> str:
    """sha256 of the data config, the files (path, size, mtime) and the row counts per split."""
    from distill_ray.config import config_to_dict

    data = config_to_dict(cfg.data)
    for key in ("prompt_field", "response_field", "messages_field"):  # keys newer than the caches built
        if data[key] is None:                                          # without them: unset, they stay out
            del data[key]
    for key in ("transfer", "transfer_size"):  # the source rows only: transfer rows extend it (with_transfer)
        del data[key]
    if data["long_tail"]["imbalance"] is None:  # off: the caches built before it existed stay valid
        del data["long_tail"]
    h = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    h.update(json.dumps(dict(preset_meta), sort_keys=True, default=str).encode())
    h.update(json.dumps(dict(counts), sort_keys=True).encode())
    _hash_files(h, sources)
    return h.hexdigest()[:16]


def _hash_files(h, sources: Mapping[str, str]) -> None:
    """Feed each split's path and its files' (path, size, mtime) to the hash ``h``."""
    for split, path in sorted(sources.items()):
        if not path:
            continue
        h.update(f"{split}={path}".encode())
        if not is_uri(path):
            p = Path(path).expanduser()
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else \
                [Path(f) for f in sorted(glob.glob(str(p), recursive=True))]
            for f in files:
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())


def data_files_fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 of the data config and its files (path, size, mtime), computed without reading a row or
    starting Ray: what the model registry records beside a student and ``registry status`` recomputes
    to tell whether the data changed since (the full ``DataInfo.fingerprint`` also counts rows, which
    needs a pass over the data)."""
    from distill_ray.config import config_to_dict

    h = hashlib.sha256(json.dumps(config_to_dict(cfg.data), sort_keys=True).encode())
    origin = source_origin(cfg)
    h.update(json.dumps(dict(origin.preset_meta), sort_keys=True, default=str).encode())
    _hash_files(h, origin.sources)
    return h.hexdigest()[:16]
