"""Which columns of a table are what. The train file's schema is checked against the config and decides
the data's kind and every column's role (``column_layout``): the instruction, label, id, split and image
columns the config names, the tabular feature columns (numeric ones, or ``data.feature_fields``), and
string columns judged on a sample of the train file as text or as numbers stored as strings (an error
naming a bad value). The val/test/unlabeled files must match it (``check_split_schemas``), and the label
names come from the preset, the class folders or the label column (``label_names``). Every column left
out is named with why, so none drops out in silence; ``columns_summary`` is how the run's data line says it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import ray.data

from distill_ray.config import PRESETS
from distill_ray.data.readers import Origin, is_uri, run_data_action
from distill_ray.data.rows import PATH_COLUMN, DataError


@dataclass(frozen=True)
class Layout:
    """What the train file's schema decides: the data's kind and the role of every column."""

    columns: tuple[str, ...]
    types: Mapping[str, pa.DataType]
    kind: str
    instruction_fields: tuple[str, ...]
    """(prompt column, response column), (messages column,) or () when the data is not instructions."""
    label_field: str | None
    feature_fields: tuple[str, ...]
    input_columns: tuple[str, ...]
    left_out: dict[str, str]


def column_layout(d, origin: Origin, train: ray.data.Dataset) -> Layout:
    """Check the train file's schema against the config and decide each column's role, failing on the
    first column the config names that is not there."""
    path = origin.path
    schema = run_data_action(f"reading {path}", train.schema)
    columns = [c for c in schema.names if c != PATH_COLUMN]
    types = dict(zip(schema.names, schema.types))
    instruction_fields = _instruction_fields(d, origin, columns)
    kind = _infer_kind(d, origin, columns, instruction_fields)
    label_field = label_column(d, columns, path, origin.folder_images)
    _check_named_columns(d, origin, columns)
    # Why a column is not an input, for the columns every kind sets aside (the label only where it is one).
    reasons = {c: why for c, why in ((label_field if d.task == "classification" else None, "label column"),
                                     (d.id_field, "id column"), (origin.split_field, "split column")) if c}
    feature_fields: tuple[str, ...] = ()
    left_out: dict[str, str] = {}
    if kind == "tabular":
        feature_fields, left_out = tabular_columns(d, train, path, columns, types, reasons)
    elif kind == "text" and d.text_field not in columns and not origin.preset and not instruction_fields:
        raise DataError(f"data.text_field: column {d.text_field!r} is not in {path}; its columns are: {', '.join(columns)}")
    input_columns = _input_columns(d, origin, kind, feature_fields, instruction_fields)
    if kind != "tabular" and not origin.preset:  # a preset's own columns are no news to anyone
        left_out = {c: reasons.get(c, "not used") for c in columns if c not in input_columns}
    return Layout(tuple(columns), types, kind, instruction_fields, label_field, feature_fields, input_columns, left_out)


def _instruction_fields(d, origin: Origin, columns: list[str]) -> tuple[str, ...]:
    """The prompt and response columns (a preset's, or data.prompt_field / response_field), or the
    messages column; each must be a column of the train file."""
    fields = tuple(f for f in (origin.preset_meta.get("prompt_field", d.prompt_field),
                               origin.preset_meta.get("response_field", d.response_field), d.messages_field) if f)
    for key, name in zip(("data.prompt_field", "data.response_field") if len(fields) == 2
                         else ("data.messages_field",), fields):
        if name not in columns:
            raise DataError(f"{key}: column {name!r} is not in {origin.path}; its columns are: {', '.join(columns)}")
    return fields


def _infer_kind(d, origin: Origin, columns: list[str], instruction_fields: tuple[str, ...]) -> str:
    """tabular, text, image or tokens: a preset says, images are images, instructions and causal-LM data
    are text; a table is text if its text column is there and no features are named, else tabular."""
    kind = origin.preset_meta.get("kind") or {"images": "image", "text": "text"}.get(origin.fmt) or \
        ("text" if d.task == "causal_lm" else None)
    if instruction_fields:
        kind = "text"
    if kind is None:
        if d.text_field != "text" and d.text_field not in columns and d.feature_fields is None:
            raise DataError(f"data.text_field: column {d.text_field!r} is not in {origin.path}; its columns are: "
                            f"{', '.join(columns)}")
        kind = "text" if d.text_field in columns and d.feature_fields is None else "tabular"
    return "image" if origin.fmt == "images" else kind


def _check_named_columns(d, origin: Origin, columns: list[str]) -> None:
    """The id, split and image columns the config names are columns of the train file; a table of images
    names its image column."""
    table_images = origin.fmt == "images" and not origin.folder_images
    for key, name in (("data.id_field", d.id_field), ("data.split_field", origin.split_field),
                      ("data.image_field", d.image_field if table_images else None)):
        if name is not None and name not in columns:
            raise DataError(f"{key}: column {name!r} is not in {origin.path}; its columns are: {', '.join(columns)}")
    if table_images and d.image_field is None:
        raise DataError("data.image_field: images read from a table need the column of image paths or bytes; "
                        f"columns of {origin.path}: {', '.join(columns)}")


def _input_columns(d, origin: Origin, kind: str, feature_fields: tuple[str, ...],
                   instruction_fields: tuple[str, ...]) -> tuple[str, ...]:
    """The columns the row stage keeps as the model's input."""
    if kind == "image":
        return ("image",) if origin.folder_images or origin.preset else (d.image_field,)
    if kind == "tabular":
        return feature_fields
    if kind == "tokens":
        return ("x", "label")
    if instruction_fields:
        return instruction_fields
    return ("text",) if origin.preset else (d.text_field,)


def check_split_schemas(d, raw: Mapping[str, ray.data.Dataset], origin: Origin, layout: Layout) -> None:
    """The val, test and unlabeled files must look like train in the columns read from them."""
    types = layout.types
    for split, ds in raw.items():
        if split == "train":
            continue
        other = run_data_action(f"reading {origin.sources[split]}", ds.schema)
        other_types = dict(zip(other.names, other.types))
        needed = [c for c in (*layout.feature_fields, d.text_field if layout.kind == "text" else None,
                              layout.label_field if split != "unlabeled" else None, d.id_field, d.image_field) if c]
        diff = [c for c in needed if c in types and (c not in other_types or
                                                     not compatible_types(types[c], other_types[c]))]
        if diff:
            raise DataError(f"data.{split}_path: {origin.sources[split]} does not match the train data's schema in "
                            f"{', '.join(repr(c) for c in diff)} (train: {', '.join(f'{c}: {types[c]}' for c in diff)}; "
                            f"{split}: {', '.join(f'{c}: {other_types.get(c, chr(45))}' for c in diff)})")


def label_names(d, origin: Origin, raw: Mapping[str, ray.data.Dataset], layout: Layout) -> tuple[str, ...] | None:
    """Given by the preset, the class folders, or the sorted unique strings of the label column (over
    every labeled source); None for numeric labels."""
    if origin.folder_images:
        return _folder_classes(origin.path)
    label_field = layout.label_field
    if origin.class_names is not None or label_field is None or d.task != "classification":
        return origin.class_names
    if not (pa.types.is_string(layout.types[label_field]) or pa.types.is_large_string(layout.types[label_field])):
        return None
    values = set()
    for ds in (ds for split, ds in raw.items() if split != "unlabeled"):
        values |= set(run_data_action(f"reading {origin.path}", functools.partial(ds.unique, label_field)))
    values = {v for v in values if v is not None and not (isinstance(v, float) and v != v)}  # null / NaN
    if any(not isinstance(v, str) for v in values):
        raise DataError(f"{origin.path}: column {label_field!r} mixes numbers and strings; use one type for labels")
    return tuple(sorted(values))


def _folder_classes(path: str) -> tuple[str, ...]:
    root = Path(path).expanduser()
    if is_uri(path) or not root.is_dir():
        raise DataError(f"data.path: {path} must be a local folder with one subfolder per class "
                        "(or a table with data.image_field)")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"data.path: {path} has no class subfolders; put each class's images in a folder named after it")
    return classes


def label_column(d, columns: list[str], path: str, folder_images: bool) -> str | None:
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


def tabular_columns(d, ds: ray.data.Dataset, path: str, columns: list[str], types: Mapping[str, pa.DataType],
                     reasons: Mapping[str, str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The feature columns, and every other column with why it is left out (column order).
    data.feature_fields is used as given; else every numeric column but label/id/split is a feature
    and a string column is judged on a sample of the train file (``_judge_strings``)."""
    if d.feature_fields is not None:
        missing = [f for f in d.feature_fields if f not in columns]
        if missing:
            raise DataError(f"data.feature_fields: {missing} not in {path}; its columns are: {', '.join(columns)}")
        bad = [f for f in d.feature_fields if not is_numeric(types[f])]
        if bad:
            raise DataError(f"data.feature_fields: {', '.join(f'{f!r} ({types[f]})' for f in bad)} in {path} "
                            "are not numeric; list numeric columns only, or encode these first")
        features = tuple(d.feature_fields)
        return features, {c: reasons.get(c, "not in data.feature_fields") for c in columns if c not in features}
    strings = [c for c in columns if c not in reasons and is_text(types[c])]
    judged = _judge_strings(ds, path, strings) if strings else {}
    features, left_out = [], {}
    for c in columns:
        if c in reasons:
            left_out[c] = reasons[c]
        elif is_numeric(types[c]):
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
    sample = run_data_action(f"reading {path}", lambda: ds.select_columns([*columns, PATH_COLUMN]).take(SAMPLE_ROWS))
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
        found = run_data_action(f"reading {path}", lambda: ds.select_columns([column, PATH_COLUMN]).map_batches(
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


def is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):  # a categorical column (pandas "category") holds its values as strings
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def compatible_types(a: pa.DataType, b: pa.DataType) -> bool:
    if a == b:
        return True
    if is_numeric(a) and is_numeric(b):
        return True
    return pa.types.is_null(a) or pa.types.is_null(b) or (is_text(a) and is_text(b))


def is_number(value: Any) -> bool:
    """Whether a stored value reads as a float ("1.5", "2", " -3e4 "): how a string column is judged."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def columns_summary(feature_fields: Sequence[str], left_out: Mapping[str, str], named: int = 6) -> str:
    """The columns part of the run's data line: the feature columns (first..last when there are more
    than ``named``, so 300 pixels stay one short phrase) and every column left out with its reason,
    in full: a column that silently drops out is what this line exists to prevent. '' if neither."""
    phrases = []
    if feature_fields:
        n = len(feature_fields)
        names = ", ".join(feature_fields) if n <= named else f"{feature_fields[0]}..{feature_fields[-1]}"
        phrases.append(f"{n} feature column{'s' if n != 1 else ''} ({names})")
    if left_out:
        phrases.append("left out: " + ", ".join(f"{c} ({why})" for c, why in left_out.items()))
    return "; ".join(phrases)

