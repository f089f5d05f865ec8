"""Which columns of a table are model inputs: the label column, the tabular feature columns (numeric
ones, or ``data.feature_fields``), and string columns judged on a sample of the train file as text or as
numbers stored as strings (an error naming a bad value). Every column left out is named with why, so
none drops out in silence; ``columns_summary`` is how the run's data line says it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import ray.data

from distill_ray.config import PRESETS
from distill_ray.data.readers import run_data_action
from distill_ray.data.rows import PATH_COLUMN, DataError

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

