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
(``data.id_uniform``), so a split never depends on read order or parallelism. The bundled presets
are written once as Parquet (with their historical splits in a ``split`` column) and then read like
anyone's data.

One module for every format on purpose: ``load_source`` is one decision procedure (which columns,
which kind, which split, which labels) whose every branch must fail the same clear way; the
per-format row stages beside it are small.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import ray
import ray.data

from distill_ray.config import ExperimentConfig, PRESETS
from distill_ray.data.bundled import IGNORE_LABEL, DataError, apply_standardise, content_ids, hash_to_id, is_number, \
    label_ids, normalise_split_names, split_by_id, id_uniform, standardise_stats
from distill_ray.data.chat import render_chat_prompt
from distill_ray.data.transfer import resolve_transfer, with_transfer_rows
from distill_ray.extras import require

SPLITS = ("train", "val", "test")
EXTENSIONS = {"parquet": ("parquet",), "jsonl": ("jsonl", "json"), "csv": ("csv",), "text": ("txt", "text", "md", "py", "rst"),
              "images": ("png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp")}
PATH_COLUMN = "path"  # added by read_*(include_paths=True), dropped after the row stage


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

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataInfo":
        d = dict(d)
        for key in ("class_names", "input_shape", "feature_fields"):
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



# --- reading ----------------------------------------------------------------------------------------

def _is_uri(path: str) -> bool:
    return "://" in path


def _local_files(path: str, fmt: str) -> list[str]:
    """The files a local path names (file, directory, glob); errors if there are none."""
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
    elif p.is_file():
        files = [str(p)]
    elif p.is_dir():
        exts = EXTENSIONS[fmt]
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower().lstrip(".") in exts)
        if not files:
            raise DataError(f"data.path: {p} holds no {fmt} files (looked for *.{', *.'.join(exts)})")
    else:
        raise DataError(f"data.path: {path} does not exist{_made_by(p)}")
    if not files:
        raise DataError(f"data.path: {path} matches no files")
    return files


# Example data the repository's scripts write into the cache (the configs of jobs/configs/ read it there).
MADE_BY = {"examples": "python jobs/make_example_data.py", "check": "make check-data"}


def _made_by(path: Path) -> str:
    """What writes a missing path, when it is one of the repository's example or check sets."""
    from distill_ray.data.bundled import cache_root

    for folder, command in MADE_BY.items():
        if path.resolve().is_relative_to((cache_root() / folder).resolve()):
            return f" (it is written by `{command}`: run that first)"
    return ""


def _check_readable(files: list[str], fmt: str) -> None:
    """Open each local file the cheap way (Parquet footer, first JSON line, CSV header) so a bad
    file is named before any work starts."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    for f in files:
        try:
            if fmt == "parquet":
                pq.read_schema(f)
            elif fmt == "jsonl":
                with open(f, "rb") as fh:
                    for n, line in enumerate(fh, 1):
                        if line.strip():
                            json.loads(line)
                            if n > 1000:
                                break
            elif fmt == "csv":
                pcsv.open_csv(f).read_next_batch()
            elif fmt == "text":
                with open(f, "rb") as fh:
                    fh.read(4096).decode("utf-8")
        except StopIteration:
            raise DataError(f"{f}: the CSV file is empty") from None
        except Exception as err:  # noqa: BLE001 - any failure to open is the user's file, named
            raise DataError(f"{f}: cannot be read as {fmt}: {str(err).splitlines()[0][:300]}") from None


def _read(fmt: str, path: str, cfg: ExperimentConfig) -> ray.data.Dataset:
    """The raw rows of one path, with a ``path`` column naming each row's file."""
    paths: str | list[str] = path
    if not _is_uri(path):
        files = _local_files(path, fmt if fmt != "images" or Path(path).expanduser().is_dir() else _table_format(path))
        if fmt != "images":
            _check_readable(files, fmt)
        paths = files
    if fmt == "parquet":
        return ray.data.read_parquet(paths, include_paths=True)
    if fmt == "jsonl":
        return ray.data.read_json(paths, lines=True, include_paths=True)
    if fmt == "csv":
        return ray.data.read_csv(paths, include_paths=True)
    if fmt == "text":
        if cfg.data.task == "causal_lm":  # whole files: windows are cut from each file's token stream
            return ray.data.read_binary_files(paths, include_paths=True).map_batches(_decode_text_files,
                                                                                   batch_format="pyarrow")
        return ray.data.read_text(paths, include_paths=True)
    if fmt == "images":
        if _is_image_table(path):
            return _read(_table_format(path), path, cfg)
        return ray.data.read_images(paths, include_paths=True)
    raise DataError(f"data.format: {fmt!r} is not a file format")


def _decode_text_files(batch: pa.Table) -> pa.Table:
    texts = [b.decode("utf-8", errors="replace") for b in batch.column("bytes").to_pylist()]
    return pa.table({"text": texts, PATH_COLUMN: batch.column(PATH_COLUMN)})


def _table_format(path: str) -> str:
    suffix = Path(path.rstrip("/")).suffix.lower().lstrip(".")
    return {"parquet": "parquet", "jsonl": "jsonl", "json": "jsonl", "csv": "csv"}.get(suffix, "parquet")


def _is_image_table(path: str) -> bool:
    return Path(path.rstrip("/")).suffix.lower().lstrip(".") in ("parquet", "jsonl", "json", "csv")


def _ray_data_error(err: BaseException) -> DataError | None:
    """The DataError raised inside a Ray Data task, if that is what ``err`` wraps."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    match = re.search(r"DataError: (.+)", str(err))
    return DataError(match.group(1).strip()) if match else None


def _run(what: str, fn):
    """Run a Ray Data action; a DataError from a task comes back as itself, other failures as a
    DataError that says what was being read."""
    try:
        return fn()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001
        inner = _ray_data_error(err)
        if inner is not None:
            raise inner from None
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "rror" in ln and "Traceback" not in ln), lines[-1] if lines else repr(err))
        raise DataError(f"{what}: {reason.strip()[:400]}") from None


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


def _rows(batch: dict[str, np.ndarray], plan: RowPlan) -> dict[str, np.ndarray]:
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


def _limit(batch: dict[str, np.ndarray], keep: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """A seeded subset per split, decided by the id (max_train_samples / max_eval_samples)."""
    u = id_uniform(batch["id"], seed, salt=1)
    limit = np.array([keep.get(s, 1.0) for s in batch["split"]], dtype=np.float64)
    mask = u < limit
    return {k: v[mask] for k, v in batch.items()}


def _keep_labels(batch: dict[str, np.ndarray], share: float, seed: int) -> dict[str, np.ndarray]:
    """Labels stay on a seeded share of the train rows, decided by the id (data.labeled_fraction /
    max_labeled_samples); the other train rows become unlabeled (-1), a transfer set for KD."""
    drop = (batch["split"] == "train") & (id_uniform(batch["id"], seed, salt=2) >= share)
    batch["label"] = np.where(drop, np.int64(-1), batch["label"])
    return batch


def _source_name(paths) -> str:
    if paths is None or len(paths) == 0:
        return "data"
    first = str(paths[0])
    return first if all(str(p) == first for p in paths[:50]) else f"{first} (and others)"


# --- preprocessing stages ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _tokenize(batch: dict[str, np.ndarray], text_field: str, tokenizer: str, max_length: int) -> dict[str, np.ndarray]:
    tok = _tokenizer(tokenizer)
    texts = ["" if t is None else str(t) for t in batch[text_field]]
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length,
              return_attention_mask=False, return_token_type_ids=False)
    return {"id": batch["id"], "x": np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(texts), max_length),
            "label": batch["label"], "split": batch["split"]}


def _windows(batch: dict[str, np.ndarray], text_field: str, tokenizer: str, max_length: int) -> dict[str, np.ndarray]:
    """Causal LM: each text's token stream cut into windows of ``max_length`` (+1 for the shifted labels)."""
    tok = _tokenizer(tokenizer)
    xs, ys, ids, splits = [], [], [], []
    for text, sid, split in zip(batch[text_field], batch["id"], batch["split"]):
        stream = tok(str(text), add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)["input_ids"]
        for w, start in enumerate(range(0, len(stream) - max_length, max_length)):
            window = stream[start:start + max_length + 1]
            xs.append(window[:-1])
            ys.append(window[1:])
            ids.append(f"{sid}/{w}")
            splits.append(split)
    shape = (len(xs), max_length)
    return {"id": hash_to_id(ids) if ids else np.zeros(0, np.int64),
            "x": np.asarray(xs, dtype=np.int64).reshape(shape), "label": np.asarray(ys, dtype=np.int64).reshape(shape),
            "split": np.asarray(splits, dtype=object).astype(str)}


def _instructions(batch: dict[str, np.ndarray], fields: tuple[str, ...], tokenizer: str, max_length: int,
                  pad_id: int) -> dict[str, np.ndarray]:
    """Causal-LM instruction data: prompt + response as one sequence of ``max_length`` tokens (+1 for the
    shifted labels), right-padded with ``pad_id``. Labels are the next tokens of the response only
    (prompt and padding positions are IGNORE_LABEL); ``cut`` marks sequences longer than max_length.
    ``fields`` is (prompt column, response column), or (messages column,) of chat turns rendered with
    the tokenizer's chat template."""
    tok = _tokenizer(tokenizer)
    n = len(batch["id"])
    xs = np.full((n, max_length), pad_id, np.int64)
    ys = np.full((n, max_length), IGNORE_LABEL, np.int64)
    cut = np.zeros(n, bool)
    pairs = [_prompt_and_response(batch, i, fields, tok) for i in range(n)]
    # one tokenizer call per column: the fast tokenizer's batch path
    encode = functools.partial(tok, add_special_tokens=False, return_attention_mask=False, verbose=False)
    prompt_rows = encode([p for p, _ in pairs])["input_ids"] if n else []
    response_rows = encode([r for _, r in pairs])["input_ids"] if n else []
    for i, (prompt_ids, response_ids) in enumerate(zip(prompt_rows, response_rows)):
        if len(fields) == 2 and tok.eos_token_id is not None:
            response_ids = response_ids + [tok.eos_token_id]  # the model learns where a response ends
        seq = prompt_ids + response_ids
        cut[i] = len(seq) > max_length + 1
        seq = seq[:max_length + 1]
        xs[i, :len(seq) - 1] = seq[:-1]
        # position j predicts token j + 1: the response's tokens are the labels from len(prompt) - 1 on
        start = max(len(prompt_ids) - 1, 0)
        ys[i, start:len(seq) - 1] = seq[start + 1:]
    return {"id": batch["id"], "x": xs, "label": ys, "split": batch["split"], "cut": cut}


def _prompt_and_response(batch: dict[str, np.ndarray], i: int, fields: tuple[str, ...], tok) -> tuple[str, str]:
    if len(fields) == 2:
        prompt, response = (batch[f][i] for f in fields)
        return "" if prompt is None else str(prompt), "" if response is None else str(response)
    turns = batch[fields[0]][i]
    turns = json.loads(turns) if isinstance(turns, str) else [dict(t) for t in turns]
    if not turns or any(not isinstance(t, Mapping) or "role" not in t or "content" not in t for t in turns) \
            or turns[-1]["role"] != "assistant":
        raise DataError(f"data.messages_field: column {fields[0]!r} row id {batch['id'][i]} must be a list of "
                        "{role, content} turns ending with the assistant's")
    turns = [{"role": str(t["role"]), "content": str(t["content"])} for t in turns]
    prompt = render_chat_prompt(tok, turns[:-1])
    if not getattr(tok, "chat_template", None):
        return prompt, turns[-1]["content"] + (tok.eos_token or "")
    whole = tok.apply_chat_template(turns, tokenize=False)
    if not whole.startswith(prompt):
        raise DataError(f"data.messages_field: the tokenizer's chat template does not render the prompt of row id "
                        f"{batch['id'][i]} as a prefix of the whole conversation; give prompt_field/response_field")
    return prompt, whole[len(prompt):]


def _instruction_stats(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per block and split: rows, rows cut at max_length, rows left with no response token to learn."""
    taught = (np.asarray(batch["label"]) >= 0).any(1)
    splits = [s for s in SPLITS if (np.asarray(batch["split"]) == s).any()]
    masks = [np.asarray(batch["split"]) == s for s in splits]
    return {"split": np.array(splits, dtype=object).astype(str),
            "rows": np.array([m.sum() for m in masks], np.int64),
            "cut": np.array([(m & batch["cut"]).sum() for m in masks], np.int64),
            "untaught": np.array([(m & ~taught).sum() for m in masks], np.int64)}


def _taught_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows with at least one response token in the window (a prompt that fills it teaches nothing)."""
    keep = (np.asarray(batch["label"]) >= 0).any(1)
    return {k: np.asarray(v)[keep] for k, v in batch.items() if k != "cut"}


def _features(batch: dict[str, np.ndarray], fields: tuple[str, ...], transform: Mapping[str, Any]) -> dict[str, np.ndarray]:
    x = np.stack([np.asarray(batch[f], dtype=np.float32) for f in fields], axis=1) if fields else \
        np.zeros((len(batch["id"]), 0), np.float32)
    return {"id": batch["id"], "x": apply_standardise(x, transform), "label": batch["label"], "split": batch["split"]}


def _pil_image():
    return require("PIL.Image", "reading images (data.format=images, or data.image_field)")


def decode_image(value: Any, mode: str, size: int | None, base_dir: str | None = None) -> np.ndarray:
    """One image (array, encoded bytes, or a path) as float32 [C, H, W] in [0, 1]."""
    Image = _pil_image()

    if isinstance(value, np.ndarray) and value.dtype != object:
        img = Image.fromarray(value.astype(np.uint8))
    else:
        if isinstance(value, (bytes, bytearray)):
            import io

            img = Image.open(io.BytesIO(value))
        else:
            path = Path(str(value))
            if not path.is_absolute() and base_dir:
                path = Path(base_dir) / path
            img = Image.open(path)
    img = img.convert(mode)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _images(batch: dict[str, np.ndarray], column: str, mode: str, size: int | None, shape: tuple[int, ...],
            base_dir: str | None) -> dict[str, np.ndarray]:
    xs = []
    for value in batch[column]:
        x = decode_image(value, mode, size, base_dir)
        if x.shape != shape:
            raise DataError(f"an image has shape {x.shape[1:]} ({x.shape[0]} channels) but the first one had "
                            f"{shape[1:]}; set data.image_size to resize them all")
        xs.append(x)
    return {"id": batch["id"], "x": np.stack(xs) if xs else np.zeros((0, *shape), np.float32),
            "label": batch["label"], "split": batch["split"]}


def _split_rows(batch: pa.Table, split: str) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("split"), split)).drop_columns(["split"])


def _stats(batch: dict[str, np.ndarray], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per block: rows and labeled rows per split, and the train rows' feature sums."""
    out = {"split": [], "rows": [], "labeled": [], "sum": [], "sum_sq": [], "label_max": []}
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
    width = len(fields)
    return {"split": np.array(out["split"], dtype=object).astype(str), "rows": np.array(out["rows"], np.int64),
            "label_max": np.array(out["label_max"], np.int64),
            "labeled": np.array(out["labeled"], np.int64),
            "sum": np.array(out["sum"], np.float64).reshape(len(out["rows"]), width),
            "sum_sq": np.array(out["sum_sq"], np.float64).reshape(len(out["rows"]), width)}


# --- the entry point -----------------------------------------------------------------------------------

def load_source(cfg: ExperimentConfig) -> SourceData:
    """The configured data as preprocessed Ray Datasets per split, validated; bad input raises
    DataError naming the file and column."""
    d = cfg.data
    if d.format in PRESETS:
        from distill_ray.data.presets import preset_table

        path, meta = preset_table(cfg)
        fmt, split_field, class_names = "parquet", "split", tuple(meta["class_names"])
    else:
        path, fmt, split_field, class_names, meta = d.path, d.format, d.split_field, None, {}

    kind = meta.get("kind") or {"images": "image", "text": "text"}.get(fmt) or \
        ("text" if d.task == "causal_lm" else None)
    eval_paths = d.val_path is not None or d.test_path is not None
    sources = {"train": path, **({"val": d.val_path, "test": d.test_path} if eval_paths else {}),
               **({"unlabeled": d.unlabeled_path} if d.unlabeled_path else {})}
    raw = {split: _run(f"reading {p}", functools.partial(_read, fmt, p, cfg)) for split, p in sources.items() if p}
    schema = _run(f"reading {path}", raw["train"].schema)
    columns = [c for c in schema.names if c != PATH_COLUMN]
    types = dict(zip(schema.names, schema.types))

    folder_images = fmt == "images" and not _is_image_table(path)
    instruction_fields = tuple(f for f in (meta.get("prompt_field", d.prompt_field),
                                           meta.get("response_field", d.response_field), d.messages_field) if f)
    for key, name in zip(("data.prompt_field", "data.response_field") if len(instruction_fields) == 2
                         else ("data.messages_field",), instruction_fields):
        if name not in columns:
            raise DataError(f"{key}: column {name!r} is not in {path}; its columns are: {', '.join(columns)}")
    if instruction_fields:
        kind = "text"
    if kind is None:  # parquet/jsonl/csv: text if the text column is there and no features are named, else tabular
        if d.text_field != "text" and d.text_field not in columns and d.feature_fields is None:
            raise DataError(f"data.text_field: column {d.text_field!r} is not in {path}; its columns are: "
                            f"{', '.join(columns)}")
        kind = "text" if d.text_field in columns and d.feature_fields is None else "tabular"
    if fmt == "images":
        kind = "image"
    label_field = _label_column(d, columns, path, folder_images)
    for key, name in (("data.id_field", d.id_field), ("data.split_field", split_field),
                      ("data.image_field", d.image_field if fmt == "images" and not folder_images else None)):
        if name is not None and name not in columns:
            raise DataError(f"{key}: column {name!r} is not in {path}; its columns are: {', '.join(columns)}")
    if fmt == "images" and not folder_images and d.image_field is None:
        raise DataError("data.image_field: images read from a table need the column of image paths or bytes; "
                        f"columns of {path}: {', '.join(columns)}")

    # Why a column is not an input, for the columns every kind sets aside (the label only where it is one).
    reasons = {c: why for c, why in ((label_field if d.task == "classification" else None, "label column"),
                                     (d.id_field, "id column"), (split_field, "split column")) if c}
    feature_fields: tuple[str, ...] = ()
    left_out: dict[str, str] = {}
    if kind == "tabular":
        feature_fields, left_out = _tabular_columns(d, raw["train"], path, columns, types, reasons)
    elif kind == "text" and d.text_field not in columns and d.format not in PRESETS and not instruction_fields:
        raise DataError(f"data.text_field: column {d.text_field!r} is not in {path}; its columns are: {', '.join(columns)}")

    for split, ds in raw.items():  # val/test files must look like train
        if split == "train":
            continue
        other = _run(f"reading {sources[split]}", ds.schema)
        other_types = dict(zip(other.names, other.types))
        needed = [c for c in (*feature_fields, d.text_field if kind == "text" else None,
                              label_field if split != "unlabeled" else None, d.id_field, d.image_field) if c]
        diff = [c for c in needed if c in types and (c not in other_types or
                                                     not _compatible(types[c], other_types[c]))]
        if diff:
            raise DataError(f"data.{split}_path: {sources[split]} does not match the train data's schema in "
                            f"{', '.join(repr(c) for c in diff)} (train: {', '.join(f'{c}: {types[c]}' for c in diff)}; "
                            f"{split}: {', '.join(f'{c}: {other_types.get(c, chr(45))}' for c in diff)})")

    # Label names: given by the preset, the class folders, or the sorted unique strings of the label column.
    if folder_images:
        class_names = _folder_classes(path)
    elif class_names is None and label_field is not None and d.task == "classification":
        if pa.types.is_string(types[label_field]) or pa.types.is_large_string(types[label_field]):
            values = set()
            for ds in (ds for split, ds in raw.items() if split != "unlabeled"):
                values |= set(_run(f"reading {path}", functools.partial(ds.unique, label_field)))
            values = {v for v in values if v is not None and not (isinstance(v, float) and v != v)}  # null / NaN
            if any(not isinstance(v, str) for v in values):
                raise DataError(f"{path}: column {label_field!r} mixes numbers and strings; use one type for labels")
            class_names = tuple(sorted(values))

    if kind == "image":
        input_columns = ("image",) if folder_images or d.format in PRESETS else (d.image_field,)
    elif kind == "tabular":
        input_columns = feature_fields
    elif kind == "tokens":
        input_columns = ("x", "label")
    elif instruction_fields:
        input_columns = instruction_fields
    else:
        input_columns = ("text",) if d.format in PRESETS else (d.text_field,)
    if kind != "tabular" and d.format not in PRESETS:  # a preset's own columns are no news to anyone
        left_out = {c: reasons.get(c, "not used") for c in columns if c not in input_columns}
    rows = None
    for split, ds in raw.items():
        # Rows of data.unlabeled_path join train without labels; the other sources keep theirs.
        fixed = "train" if split == "unlabeled" else split if eval_paths else None
        plan = RowPlan(kind=kind, task=d.task, input_columns=input_columns,
                       label_field=None if kind == "tokens" or split == "unlabeled" else label_field,
                       class_names=class_names, id_field=d.id_field if d.format not in PRESETS else "id",
                       split=fixed, split_field=split_field if fixed is None else None,
                       val_fraction=d.val_fraction, test_fraction=d.test_fraction, split_seed=d.split_seed,
                       label_from_folder=folder_images and split != "unlabeled",
                       nan_is_missing=(_table_format(path) if fmt == "images" else fmt) in ("jsonl", "csv"))
        staged = ds.map_batches(_rows, fn_kwargs={"plan": plan}, batch_format="numpy")
        rows = staged if rows is None else rows.union(staged)
    def split_stats():
        return _run(f"reading {path}", lambda: rows.map_batches(_stats, fn_kwargs={"fields": feature_fields},
                                                                batch_format="numpy").take_all())

    stats = split_stats()
    if d.format not in PRESETS and (d.max_train_samples or d.max_eval_samples):  # presets subset exactly
        seen = {s: sum(int(r["rows"]) for r in stats if r["split"] == s) for s in SPLITS}
        cap = {"train": d.max_train_samples, "val": d.max_eval_samples, "test": d.max_eval_samples}
        keep = {s: (cap[s] / seen[s] if cap[s] and seen[s] > cap[s] else 1.0) for s in SPLITS}
        rows = rows.map_batches(_limit, fn_kwargs={"keep": keep, "seed": d.split_seed}, batch_format="numpy")
        stats = split_stats()
    if d.labeled_fraction is not None or d.max_labeled_samples is not None:
        labeled_train = sum(int(r["labeled"]) for r in stats if r["split"] == "train")
        share = d.labeled_fraction if d.labeled_fraction is not None else \
            min(1.0, d.max_labeled_samples / max(1, labeled_train))
        rows = rows.map_batches(_keep_labels, fn_kwargs={"share": share, "seed": d.split_seed}, batch_format="numpy")
        stats = split_stats()
    counts = {s: 0 for s in SPLITS}
    labeled = {s: 0 for s in SPLITS}
    label_max = max([int(r["label_max"]) for r in stats] or [-1])
    total = np.zeros(len(feature_fields))
    total_sq = np.zeros(len(feature_fields))
    for row in stats:
        counts[row["split"]] += int(row["rows"])
        labeled[row["split"]] += int(row["labeled"])
        if row["split"] == "train":
            total += np.asarray(row["sum"])
            total_sq += np.asarray(row["sum_sq"])
    if not (kind == "text" and d.task == "causal_lm"):  # LM windows are counted after tokenization, below
        _check_splits(counts, path)

    tokenizer_dir, pad_id, transform, image_mode, num_classes, truncated = None, None, None, None, 0, None
    if kind == "tabular":
        transform = standardise_stats(counts["train"], total, total_sq)
        pre = rows.map_batches(_features, fn_kwargs={"fields": feature_fields, "transform": transform},
                               batch_format="numpy")
        input_shape = (len(feature_fields),)
    elif kind == "image":
        column = input_columns[0]
        base_dir = None if folder_images or _is_uri(path) else str(Path(path).expanduser().parent)
        first = _run(f"reading {path}", functools.partial(rows.take, 1))
        if not first:
            raise DataError(f"{path}: no images")
        probe = first[0][column]
        if isinstance(probe, np.ndarray) and probe.dtype != object:
            image_mode = "L" if probe.ndim == 2 or probe.shape[-1] == 1 else "RGB"
        else:
            import io

            Image = _pil_image()
            img = Image.open(io.BytesIO(probe)) if isinstance(probe, (bytes, bytearray)) else \
                Image.open(Path(base_dir or ".") / str(probe))
            image_mode = "L" if img.mode in ("L", "1", "I", "I;16", "F") else "RGB"
        shape = decode_image(probe, image_mode, d.image_size, base_dir).shape
        pre = rows.map_batches(_images, fn_kwargs={"column": column, "mode": image_mode, "size": d.image_size,
                                                   "shape": shape, "base_dir": base_dir}, batch_format="numpy")
        input_shape = tuple(shape)
    elif kind == "tokens":
        from distill_ray.data.bundled import load_tokenizer, resolve_tokenizer

        tokenizer_dir = str(resolve_tokenizer(d.tokenizer))
        tok = load_tokenizer(tokenizer_dir)
        pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        num_classes = len(tok)
        pre = rows
        input_shape = (d.max_length,)
    else:
        from distill_ray.data.bundled import load_tokenizer, resolve_tokenizer

        tokenizer_dir = str(resolve_tokenizer(d.tokenizer))
        tok = load_tokenizer(tokenizer_dir)
        pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        input_shape = (d.max_length,)
        if instruction_fields:
            pre = rows.map_batches(_instructions, fn_kwargs={"fields": instruction_fields, "tokenizer": tokenizer_dir,
                                                             "max_length": d.max_length, "pad_id": pad_id},
                                   batch_format="numpy")
            seq_stats = _run(f"tokenizing {path}", lambda: pre.map_batches(_instruction_stats,
                                                                          batch_format="numpy").take_all())
            pre = pre.map_batches(_taught_rows, batch_format="numpy")
            num_classes = len(tok)
            counts, truncated = {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}
            for row in seq_stats:
                counts[row["split"]] += int(row["rows"]) - int(row["untaught"])
                truncated[row["split"]] += int(row["cut"])
            labeled = dict(counts)
            _check_splits(counts, path, hint="raise data.max_length: prompts fill the window")
        elif d.task == "causal_lm":
            pre = rows.map_batches(_windows, fn_kwargs={"text_field": input_columns[0], "tokenizer": tokenizer_dir,
                                                        "max_length": d.max_length}, batch_format="numpy")
            num_classes = len(tok)
            window_stats = _run(f"tokenizing {path}", lambda: pre.map_batches(
                _stats, fn_kwargs={"fields": ()}, batch_format="numpy").take_all())
            counts = {s: 0 for s in SPLITS}
            for row in window_stats:
                counts[row["split"]] += int(row["rows"])
            labeled = dict(counts)
            _check_splits(counts, path, hint="lower data.max_length or add text")
        else:
            pre = rows.map_batches(_tokenize, fn_kwargs={"text_field": input_columns[0], "tokenizer": tokenizer_dir,
                                                         "max_length": d.max_length}, batch_format="numpy")

    source_fingerprint = _fingerprint(cfg, sources, meta, counts)
    transfer = resolve_transfer(d.transfer, kind, d.task, labeled["train"], counts["train"] - labeled["train"])
    transfer_rows = 0
    if transfer != "none":
        tokens = None
        if kind == "text":  # tok: the tokenizer loaded above
            tokens = {"pad_id": pad_id, "mask_id": tok.mask_token_id, "special_ids": list(tok.all_special_ids)}
        pre = pre.map_batches(with_transfer_rows, fn_kwargs={"kind": transfer, "data_kind": kind,
                                                             "copies": d.transfer_size, "seed": d.split_seed,
                                                             "tokens": tokens}, batch_format="numpy")
        transfer_rows = counts["train"] * d.transfer_size
        counts = {**counts, "train": counts["train"] + transfer_rows}

    if d.task == "classification":
        if not class_names and label_max < 0:
            raise DataError(f"{path}: no row has a label; classification needs labels on some rows (a teacher "
                            "recipe and the learned blend train on them)")
        num_classes = len(class_names) if class_names else label_max + 1
        if class_names is None:
            class_names = tuple(str(i) for i in range(num_classes))

    info = DataInfo(task=d.task, kind=kind, num_classes=int(num_classes), class_names=tuple(class_names or ()),
                    input_shape=tuple(int(s) for s in input_shape), counts=counts, labeled=labeled,
                    fingerprint=_with_transfer(source_fingerprint, transfer, d.transfer_size),
                    source_fingerprint=source_fingerprint, tokenizer=tokenizer_dir, pad_id=pad_id,
                    feature_fields=feature_fields, transform=transform, image_mode=image_mode, source=str(path),
                    truncated=truncated, transfer=transfer, transfer_rows=transfer_rows, left_out=left_out)
    splits = {s: pre.map_batches(_split_rows, fn_kwargs={"split": s}, batch_format="pyarrow") for s in SPLITS}
    return SourceData(info=info, rows=pre, splits=splits)


def _with_transfer(fingerprint: str, transfer: str, size: int) -> str:
    """The data's fingerprint with its transfer rows: unchanged without them (caches built before
    data.transfer existed stay valid)."""
    if transfer == "none":
        return fingerprint
    return hashlib.sha256(f"{fingerprint}+transfer={transfer}x{size}".encode()).hexdigest()[:16]


def _label_column(d, columns: list[str], path: str, folder_images: bool) -> str | None:
    """data.label_field when it is a column of data.path. Classification data without it is refused
    here, by name: read as unlabeled it would only fail later with "no row has a label". Image
    folders are labeled by folder name, causal LM needs no label column, and a preset keeps its own
    (rows of data.unlabeled_path are unlabeled by design: only data.path is asked)."""
    if folder_images:
        return None
    if d.label_field in columns:
        return d.label_field
    if d.task == "classification" and d.format not in PRESETS:
        raise DataError(f"data.label_field: column {d.label_field!r} is not in {path}; its columns are: "
                        f"{', '.join(columns)}")
    return None


def _tabular_columns(d, ds: ray.data.Dataset, path: str, columns: list[str], types: Mapping[str, pa.DataType],
                     reasons: Mapping[str, str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The feature columns, and every other column with why it is left out (column order).
    data.feature_fields is used as given; else every numeric column but label/id/split is a feature
    and a string column is judged on a sample of the train file (``_judge_strings``)."""
    if d.feature_fields is not None:
        missing = [f for f in d.feature_fields if f not in columns]
        if missing:
            raise DataError(f"data.feature_fields: {missing} not in {path}; its columns are: {', '.join(columns)}")
        bad = [f for f in d.feature_fields if not _numeric(types[f])]
        if bad:
            raise DataError(f"data.feature_fields: {', '.join(f'{f!r} ({types[f]})' for f in bad)} in {path} "
                            "are not numeric; list numeric columns only, or encode these first")
        features = tuple(d.feature_fields)
        return features, {c: reasons.get(c, "not in data.feature_fields") for c in columns if c not in features}
    strings = [c for c in columns if c not in reasons and _is_text(types[c])]
    judged = _judge_strings(ds, path, strings) if strings else {}
    features, left_out = [], {}
    for c in columns:
        if c in reasons:
            left_out[c] = reasons[c]
        elif _numeric(types[c]):
            features.append(c)
        else:
            left_out[c] = judged.get(c) or f"not numeric ({types[c]})"
    if not features:
        raise DataError(f"{path}: no numeric feature columns (columns: {', '.join(columns)}); name the "
                        f"text column with data.text_field (now {d.text_field!r}) or the features with "
                        "data.feature_fields")
    return tuple(features), left_out


SAMPLE_ROWS = 1000
"""Rows of the train file read on the driver to judge a string column (a sample, never a split)."""


def _judge_strings(ds: ray.data.Dataset, path: str, columns: list[str]) -> dict[str, str]:
    """Why each string column is left out, judged on the first SAMPLE_ROWS rows: mostly words is
    text ("mostly text"). Mostly numbers is a feature stored as strings, often with a few bad values
    (a stray "oops" turns a whole CSV/Parquet column into strings): dropping it would lose a real
    feature without a word, so it raises, naming a value that is not a number."""
    sample = _run(f"reading {path}", lambda: ds.select_columns([*columns, PATH_COLUMN]).take(SAMPLE_ROWS))
    judged = {}
    for column in columns:
        values = [(r[column], r[PATH_COLUMN]) for r in sample if _present(r[column])]
        if not values:
            judged[column] = "not numeric (string)"  # nothing to judge by: no value in the sample
        elif 2 * sum(is_number(v) for v, _ in values) < len(values):
            judged[column] = "mostly text"
        else:
            raise _numbers_as_strings(ds, path, column, values)
    return judged


def _numbers_as_strings(ds: ray.data.Dataset, path: str, column: str, sample: list[tuple[Any, str]]) -> DataError:
    """The error for a string column of mostly numbers, naming a value that is not one: from the
    sample, else the first the workers find in the whole column (one value comes back, not the column)."""
    bad = next(((v, f) for v, f in sample if not is_number(v)), None)
    if bad is None:
        found = _run(f"reading {path}", lambda: ds.select_columns([column, PATH_COLUMN]).map_batches(
            _first_non_number, fn_kwargs={"column": column}, batch_format="numpy").take(1))
        bad = (found[0]["value"], found[0][PATH_COLUMN]) if found else None
    leave = "or leave the column out with data.feature_fields (the numeric columns to use)"
    if bad is None:
        return DataError(f"{path}: column {column!r} holds numbers stored as strings (e.g. {str(sample[0][0])!r}); "
                         f"store it as a numeric column, {leave}")
    value, file = bad
    return DataError(f"{file}: column {column!r} holds numbers stored as strings, but {str(value)!r} is not a number; "
                     f"clean that value (and any like it) and store the column as numbers, {leave}")


def _first_non_number(batch: dict[str, np.ndarray], column: str) -> dict[str, np.ndarray]:
    """At most one row per block: the first present value of ``column`` that is not a number, and its file."""
    for value, file in zip(batch[column], batch[PATH_COLUMN]):
        if _present(value) and not is_number(value):
            return {"value": np.array([str(value)]), PATH_COLUMN: np.array([str(file)])}
    return {"value": np.array([], dtype=str), PATH_COLUMN: np.array([], dtype=str)}


def _present(value: Any) -> bool:
    """Not a missing value: null, NaN and blank strings say nothing about what a column holds."""
    return value is not None and not (isinstance(value, float) and value != value) and str(value).strip() != ""


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):  # a categorical column (pandas "category") holds its values as strings
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def _compatible(a: pa.DataType, b: pa.DataType) -> bool:
    if a == b:
        return True
    if _numeric(a) and _numeric(b):
        return True
    return pa.types.is_null(a) or pa.types.is_null(b) or (_is_text(a) and _is_text(b))


def _folder_classes(path: str) -> tuple[str, ...]:
    root = Path(path).expanduser()
    if _is_uri(path) or not root.is_dir():
        raise DataError(f"data.path: {path} must be a local folder with one subfolder per class "
                        "(or a table with data.image_field)")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"data.path: {path} has no class subfolders; put each class's images in a folder named after it")
    return classes


def _check_splits(counts: Mapping[str, int], path: str, hint: str = "") -> None:
    for split in SPLITS:
        if counts.get(split, 0) == 0:
            how = {"train": "data.path has no training rows",
                   "val": "set data.val_path, give data.split_field rows named 'val', or raise data.val_fraction",
                   "test": "set data.test_path, give data.split_field rows named 'test', or raise data.test_fraction"}
            raise DataError(f"{path}: the {split} split is empty ({', '.join(f'{s}: {n}' for s, n in counts.items())}); "
                            f"{how[split]}" + (f"; {hint}" if hint else ""))


def _fingerprint(cfg: ExperimentConfig, sources: Mapping[str, str], meta: Mapping[str, Any],
                 counts: Mapping[str, int]) -> str:
    """sha256 of the data config, the files (path, size, mtime) and the row counts per split."""
    from distill_ray.config import config_to_dict

    data = config_to_dict(cfg.data)
    for key in ("prompt_field", "response_field", "messages_field"):  # keys newer than the caches built
        if data[key] is None:                                          # without them: unset, they stay out
            del data[key]
    for key in ("transfer", "transfer_size"):  # the source rows only: transfer rows extend it (with_transfer)
        del data[key]
    h = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    h.update(json.dumps(dict(meta), sort_keys=True, default=str).encode())
    h.update(json.dumps(dict(counts), sort_keys=True).encode())
    for split, path in sorted(sources.items()):
        if not path:
            continue
        h.update(f"{split}={path}".encode())
        if not _is_uri(path):
            p = Path(path).expanduser()
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else \
                [Path(f) for f in sorted(glob.glob(str(p), recursive=True))]
            for f in files:
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
