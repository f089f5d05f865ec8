"""The bundled datasets as thin readers: each is written once as a Parquet table (id, inputs,
label, split) under the cache root, then read by ``sources.load_source`` like anyone's data.

The samples and splits are exactly those of the historical loaders in ``data/bundled.py`` (seeded, with
``max_*_samples`` subsets taken there), so results stay comparable across versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_ray.config import ExperimentConfig
from distill_ray.data.bundled import cache_root, load_fashion_mnist, load_fortunes, load_python_corpus, \
    load_python_functions

PRESET_VERSION = 1


def preset_table(cfg: ExperimentConfig) -> tuple[str, dict[str, Any]]:
    """(path of the preset's Parquet file, its metadata: kind, class_names), written on first use."""
    d = cfg.data
    params = {"format": d.format, "version": PRESET_VERSION, "split_seed": d.split_seed, "val_fraction": d.val_fraction,
              "max_train_samples": d.max_train_samples, "max_eval_samples": d.max_eval_samples}
    if d.format == "python_stdlib":
        params.update(max_length=d.max_length, tokenizer=d.tokenizer)
    if d.transfer_set:  # keyed only when set, so the tables written before it existed stay valid
        params.update(transfer_set=True)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / "presets" / f"{d.format}-{key}"
    table_path, meta_path = out / "data.parquet", out / "preset.json"
    if table_path.is_file() and meta_path.is_file():
        return str(table_path), json.loads(meta_path.read_text())
    table, metadata = _build(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".data.{uuid.uuid4().hex[:8]}.parquet"
    pq.write_table(table, tmp, row_group_size=4096)
    os.replace(tmp, table_path)  # readers never see a half-written table
    meta_path.write_text(json.dumps({**metadata, "params": params}, indent=2))
    return str(table_path), {**metadata, "params": params}


def _tensor(x: np.ndarray) -> pa.Array:
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(x))


def _table(data, inputs: dict[str, Any], label_tensor: bool = False) -> pa.Table:
    """One table over the loader's three splits: id, the input columns (``name -> fn(split) -> array``),
    label and split; every column is concatenated in train, val, test order."""
    splits = (("train", data.train), ("val", data.val), ("test", data.test))
    labels = np.concatenate([s.labels for _, s in splits])
    columns = {"id": np.concatenate([s.ids for _, s in splits])}
    for name, fn in inputs.items():
        values = [fn(s) for _, s in splits]
        columns[name] = _tensor(np.concatenate(values)) if isinstance(values[0], np.ndarray) else sum(values, [])
    columns.update(label=_tensor(labels) if label_tensor else labels,
                   split=[name for name, s in splits for _ in range(len(s))])
    return pa.table(columns)


def _build(cfg: ExperimentConfig) -> tuple[pa.Table, dict[str, Any]]:
    d = cfg.data
    if d.format == "fashion_mnist":
        data = load_fashion_mnist(val_fraction=d.val_fraction, split_seed=d.split_seed,
                                  max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples)
        table = _table(data, {"image": lambda s: np.rint(s.inputs[:, 0] * 255).astype(np.uint8)})
        return table, {"kind": "image", "class_names": list(data.class_names)}
    if d.format == "fortunes":
        data = load_fortunes(val_fraction=d.val_fraction, split_seed=d.split_seed, max_length=d.max_length,
                             tokenizer=d.tokenizer, max_train_samples=d.max_train_samples,
                             max_eval_samples=d.max_eval_samples, transfer_set=d.transfer_set)
        table = _table(data, {"text": lambda s: [str(t) for t in s.texts]})
        return table, {"kind": "text", "class_names": list(data.class_names)}
    if d.format == "python_stdlib":
        data = load_python_corpus(val_fraction=d.val_fraction, split_seed=d.split_seed, max_length=d.max_length,
                                  tokenizer=d.tokenizer, max_train_samples=d.max_train_samples,
                                  max_eval_samples=d.max_eval_samples)
        table = _table(data, {"x": lambda s: s.inputs}, label_tensor=True)
        return table, {"kind": "tokens", "class_names": []}
    if d.format == "python_functions":
        pairs = load_python_functions(val_fraction=d.val_fraction, split_seed=d.split_seed,
                                      max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples)
        rows = [(split, *pair) for split, split_pairs in pairs.items() for pair in split_pairs]
        table = pa.table({"id": np.array([r[1] for r in rows], np.int64), "prompt": [r[2] for r in rows],
                          "response": [r[3] for r in rows], "split": [r[0] for r in rows]})
        return table, {"kind": "text", "class_names": [], "prompt_field": "prompt", "response_field": "response"}
    raise ValueError(f"no preset named {d.format!r}")
