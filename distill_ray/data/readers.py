"""Reading a source: where its rows come from (``source_origin``: a preset's table or ``data.path``, and
the val/test/unlabeled paths beside it), the files a path names (file, folder, glob or URI), each local
file opened the cheap way first so a bad one is named before any work starts, then read by Ray Data with
a ``path`` column naming each row's file. Ray Data failures come back as a ``DataError`` saying what was
being read.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import ray
import ray.data

from distill_ray.config import PRESETS, ExperimentConfig
from distill_ray.data.rows import PATH_COLUMN, DataError

EXTENSIONS = {"parquet": ("parquet",), "jsonl": ("jsonl", "json"), "csv": ("csv",), "text": ("txt", "text", "md", "py", "rst"),
              "images": ("png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp")}


def is_uri(path: str) -> bool:
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


def read_rows(fmt: str, path: str, task: str) -> ray.data.Dataset:
    """The raw rows of one path, with a ``path`` column naming each row's file (``task``: a causal LM reads
    text files whole)."""
    paths: str | list[str] = path
    if not is_uri(path):
        files = _local_files(path, fmt if fmt != "images" or Path(path).expanduser().is_dir() else table_format(path))
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
        if task == "causal_lm":  # whole files: windows are cut from each file's token stream
            return ray.data.read_binary_files(paths, include_paths=True).map_batches(_decode_text_files,
                                                                                   batch_format="pyarrow")
        return ray.data.read_text(paths, include_paths=True)
    if fmt == "images":
        if is_image_table(path):
            return read_rows(table_format(path), path, task)
        return ray.data.read_images(paths, include_paths=True)
    raise DataError(f"data.format: {fmt!r} is not a file format")


def _decode_text_files(batch: pa.Table) -> pa.Table:
    texts = [b.decode("utf-8", errors="replace") for b in batch.column("bytes").to_pylist()]
    return pa.table({"text": texts, PATH_COLUMN: batch.column(PATH_COLUMN)})


TABLE_FORMATS = {"parquet": "parquet", "jsonl": "jsonl", "json": "jsonl", "csv": "csv"}
"""A table file's suffix -> the format it is read as (a table of images names its format this way)."""


def _suffix(path: str) -> str:
    return Path(path.rstrip("/")).suffix.lower().lstrip(".")


def table_format(path: str) -> str:
    """The format a table's suffix names; Parquet for a folder or any other suffix."""
    return TABLE_FORMATS.get(_suffix(path), "parquet")


def is_image_table(path: str) -> bool:
    """Whether ``data.format: images`` names a table of images (else a folder of image files)."""
    return _suffix(path) in TABLE_FORMATS


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


def run_data_action(what: str, fn):
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


# --- where the rows come from ------------------------------------------------------------------

@dataclass(frozen=True)
class Origin:
    """Where the rows come from: a preset's table or ``data.path``, and the other paths beside it."""

    path: str
    fmt: str
    split_field: str | None
    class_names: tuple[str, ...] | None
    """A preset's label names; None for your files (found in ``label_names``)."""
    preset_meta: Mapping[str, Any]
    """A preset's metadata (kind, class_names, instruction columns, its parameters); {} for your files."""
    sources: Mapping[str, str | None]
    """train -> path, val/test -> data.val_path/test_path (when either is set), unlabeled -> data.unlabeled_path."""
    preset: bool

    @property
    def eval_paths(self) -> bool:
        return "val" in self.sources

    @property
    def folder_images(self) -> bool:
        return self.fmt == "images" and not is_image_table(self.path)


def source_origin(cfg: ExperimentConfig) -> Origin:
    """A preset is written once as a Parquet table with a ``split`` column; your files are read as they are."""
    d = cfg.data
    if d.format in PRESETS:
        from distill_ray.data.presets import preset_table

        path, preset_meta = preset_table(cfg)
        fmt, split_field, class_names = "parquet", "split", tuple(preset_meta["class_names"])
    else:
        path, fmt, split_field, class_names, preset_meta = d.path, d.format, d.split_field, None, {}
    eval_paths = d.val_path is not None or d.test_path is not None
    sources = {"train": path, **({"val": d.val_path, "test": d.test_path} if eval_paths else {}),
               **({"unlabeled": d.unlabeled_path} if d.unlabeled_path else {})}
    return Origin(path, fmt, split_field, class_names, preset_meta, sources, preset=d.format in PRESETS)

