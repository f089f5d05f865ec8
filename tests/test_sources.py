"""Your own data through Ray Data (distill_ray.data.sources): every format, ids, splits, label maps,
standardisation, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_ray.config import ConfigError, config_from_dict
from distill_ray.data.rows import DataError, split_by_id

pytestmark = pytest.mark.ray
TEACHERS = [{"name": "t", "source": "recipe", "recipe": "mlp"}]


def _cfg(tmp_path: Path, extra: dict | None = None, **data):
    data = {"transfer": "none", **data}  # the rows as read; test_transfer_rows_* add the transfer set
    return config_from_dict({"name": "own", "teachers": TEACHERS, "run_dir": str(tmp_path / "runs"),
                             "cache": {"dir": str(tmp_path / "cache")}, "data": data, **(extra or {})})


def _load(cfg):
    from distill_ray.data.sources import load_source

    return load_source(cfg)


def _table(n: int = 300, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    species = np.array(["setosa", "virginica", "versicolor"])[rng.integers(0, 3, n)]
    return {"sepal": rng.normal(5, 2, n), "petal": rng.normal(-3, 0.5, n), "count": rng.integers(0, 9, n),
            "species": species, "note": [f"row {i}" for i in range(n)]}


def _rows(ds) -> dict[str, np.ndarray]:
    frame = ds.to_pandas().sort_values("id")
    return {c: (np.stack(frame[c].to_numpy()) if isinstance(frame[c].iloc[0], np.ndarray) else frame[c].to_numpy())
            for c in frame.columns}


# --- formats -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tabular(ray_local, tmp_path_factory):
    """A Parquet table read in 3 files: string labels, numeric features, one text column."""
    root = tmp_path_factory.mktemp("tab")
    t = _table()
    folder = root / "table"
    folder.mkdir()
    for i, part in enumerate(np.array_split(np.arange(300), 3)):
        pq.write_table(pa.table({k: np.asarray(v)[part] for k, v in t.items()}), folder / f"part-{i}.parquet")
    cfg = _cfg(root, format="parquet", path=str(folder), label_field="species", val_fraction=0.2, test_fraction=0.2)
    return cfg, _load(cfg), t


def test_parquet_table_gives_standardised_features_sorted_label_names_and_id_splits(tabular):
    cfg, src, t = tabular
    info = src.info
    assert info.kind == "tabular" and info.feature_fields == ("sepal", "petal", "count")
    assert info.left_out == {"species": "label column", "note": "mostly text"}  # named, in column order
    assert info.class_names == ("setosa", "versicolor", "virginica") and info.num_classes == 3
    assert sum(info.counts.values()) == 300 and info.counts == info.labeled
    rows = {s: _rows(src.splits[s]) for s in ("train", "val", "test")}
    for s, r in rows.items():  # a row's split is a function of its id alone
        assert (split_by_id(r["id"], 0.2, 0.2, 0) == s).all()
        assert len(r["id"]) == info.counts[s]
    train_x = rows["train"]["x"]
    np.testing.assert_allclose(train_x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train_x.std(0), 1, atol=1e-4)
    mean, std = np.array(info.transform["mean"]), np.array(info.transform["std"])
    raw = np.stack([t["sepal"], t["petal"], t["count"]], 1).astype(np.float32)
    all_x = np.concatenate([r["x"] for r in rows.values()])
    np.testing.assert_allclose(np.sort(((raw - mean) / std).sum(1)), np.sort(all_x.sum(1)), atol=1e-3)
    names = {"setosa": 0, "versicolor": 1, "virginica": 2}
    assert sorted(np.concatenate([r["label"] for r in rows.values()]).tolist()) == sorted(names[v] for v in t["species"])


def test_ids_and_splits_do_not_depend_on_how_the_files_are_cut(tabular, tmp_path):
    cfg, src, t = tabular
    pq.write_table(pa.table(t), tmp_path / "one.parquet")
    again = _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "one.parquet"), label_field="species",
                       val_fraction=0.2, test_fraction=0.2))
    for s in ("train", "val", "test"):
        assert _rows(again.splits[s])["id"].tolist() == _rows(src.splits[s])["id"].tolist()


def test_jsonl_text_with_partial_labels_and_an_id_field(ray_local, tmp_path):
    path = tmp_path / "quotes.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            row = {"uid": f"q{i}", "quote": f"quote number {i} about {'cats' if i % 2 else 'dogs'}"}
            if i % 3:  # every third row has no label: KD only
                row["topic"] = "cats" if i % 2 else "dogs"
            f.write(json.dumps(row) + "\n")
    src = _load(_cfg(tmp_path, format="jsonl", path=str(path), text_field="quote", label_field="topic",
                     id_field="uid", max_length=16, tokenizer="minilm", transfer="none"))  # the rows as read
    info = src.info
    assert info.kind == "text" and info.input_shape == (16,) and info.class_names == ("cats", "dogs")
    assert info.left_out == {"uid": "id column", "topic": "label column"}
    assert sum(info.counts.values()) == 120 and sum(info.labeled.values()) == 80
    train = _rows(src.train)
    assert train["x"].shape[1] == 16 and train["x"].dtype == np.int64 and (train["x"][:, 0] == 101).all()  # [CLS]
    assert set(train["label"].tolist()) <= {-1, 0, 1} and (train["label"] == -1).any()


def test_csv_with_a_split_column(ray_local, tmp_path):
    t = _table(90)
    t["part"] = np.array(["train", "validation", "test"])[np.arange(90) % 3]
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.table({k: v for k, v in t.items() if k != "note"}), tmp_path / "t.csv")
    src = _load(_cfg(tmp_path, format="csv", path=str(tmp_path / "t.csv"), label_field="species",
                     split_field="part", feature_fields=["sepal", "petal"]))
    assert src.info.counts == {"train": 30, "val": 30, "test": 30}
    assert src.info.input_shape == (2,)


def test_separate_val_and_test_files(ray_local, tmp_path):
    for name, seed in (("train", 0), ("val", 1), ("test", 2)):
        pq.write_table(pa.table(_table(60 if name == "train" else 20, seed)), tmp_path / f"{name}.parquet")
    src = _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "train.parquet"),
                     val_path=str(tmp_path / "val.parquet"), test_path=str(tmp_path / "test.parquet"),
                     label_field="species"))
    assert src.info.counts == {"train": 60, "val": 20, "test": 20}


def test_image_folder_per_class(ray_local, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("circle", "square"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(rng.integers(0, 255, (10, 10), dtype=np.uint8), mode="L").save(
                tmp_path / "imgs" / cls / f"{i}.png")
    src = _load(_cfg(tmp_path, format="images", path=str(tmp_path / "imgs"), image_size=8))
    info = src.info
    assert info.kind == "image" and info.input_shape == (1, 8, 8) and info.class_names == ("circle", "square")
    assert sum(info.counts.values()) == 60 and info.labeled == info.counts
    x = _rows(src.train)["x"]
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0


def test_text_files_for_causal_lm_are_cut_into_windows(ray_local, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i}.txt").write_text(" ".join(f"word{i}_{j} and more text" for j in range(80)))
    lm = {"loss": {"topk": 8}, "student": {"arch": "hf_causal_lm"}, "blend": {"kind": "uniform"},
          "curriculum": {"scheduler": "none"}}
    src = _load(_cfg(tmp_path, lm, format="text", path=str(docs), task="causal_lm", max_length=16,
                     tokenizer="minilm", val_fraction=0.25, test_fraction=0.25))
    train = _rows(src.train)
    assert src.info.kind == "text" and train["x"].shape[1] == 16
    np.testing.assert_array_equal(train["x"][:, 1:], train["label"][:, :-1])  # labels are the next tokens
    assert min(src.info.counts.values()) > 0


# --- bad input: one clear error each ---------------------------------------------------------------------

def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match=f"data.path: {tmp_path / 'nope.parquet'} does not exist"):
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "nope.parquet")))


def test_an_unreadable_file_is_named(ray_local, tmp_path):
    good = tmp_path / "t"
    good.mkdir()
    pq.write_table(pa.table(_table(20)), good / "a.parquet")
    (good / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"b\.parquet: cannot be read as parquet"):
        _load(_cfg(tmp_path, format="parquet", path=str(good), label_field="species"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: cannot be read as jsonl"):
        _load(_cfg(tmp_path, format="jsonl", path=str(bad)))


def test_an_unknown_format_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="data.format: 'xlsx' is not valid; choose one of: parquet, jsonl, csv, "
                                          "text, images, fashion_mnist"):
        _cfg(tmp_path, format="xlsx", path="x")


def test_an_absent_column_lists_the_columns_that_exist(ray_local, tmp_path):
    pq.write_table(pa.table(_table(20)), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"data.feature_fields: \['sepla'\] not in .*its columns are: sepal, petal, "
                                        r"count, species, note"):
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "t.parquet"), label_field="species",
                   feature_fields=["sepla", "petal"]))
    with pytest.raises(DataError, match=r"data.text_field: column 'body' is not in .*its columns are"):
        _load(_cfg(tmp_path, format="jsonl", path=str(_jsonl(tmp_path, [{"text": "a", "label": 0}])),
                   text_field="body", feature_fields=None))


def _jsonl(tmp_path: Path, rows: list[dict], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_non_numeric_features_are_refused(ray_local, tmp_path):
    pq.write_table(pa.table(_table(20)), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"'note' \(string\).*not numeric"):
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "t.parquet"), label_field="species",
                   feature_fields=["sepal", "note"]))


def test_nan_and_mixed_labels_are_refused_naming_the_column(ray_local, tmp_path):
    t = _table(30)
    t["y"] = np.where(np.arange(30) == 7, np.nan, np.arange(30) % 3).astype(np.float64)
    pq.write_table(pa.table(t), tmp_path / "nan.parquet")
    with pytest.raises(DataError, match=r"nan\.parquet: column 'y' holds NaN"):
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "nan.parquet"), label_field="y",
                   feature_fields=["sepal"]))
    a = _jsonl(tmp_path, [{"text": f"t{i}", "label": i % 2} for i in range(20)], "a.jsonl")
    _jsonl(tmp_path, [{"text": f"u{i}", "label": "cat"} for i in range(20)], "b.jsonl")
    with pytest.raises(DataError, match=r"b\.jsonl: column 'label' holds 'cat' .* mixes numbers and strings"):
        _load(_cfg(tmp_path, format="jsonl", path=str(a.parent / "*.jsonl")))


def test_val_file_with_another_schema_is_refused(ray_local, tmp_path):
    pq.write_table(pa.table(_table(40)), tmp_path / "train.parquet")
    other = {k: v for k, v in _table(20).items() if k != "petal"}
    pq.write_table(pa.table(other), tmp_path / "val.parquet")
    with pytest.raises(DataError, match=r"data.val_path: .*val\.parquet does not match the train data's schema in "
                                        r"'petal'"):
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "train.parquet"),
                   val_path=str(tmp_path / "val.parquet"), test_path=str(tmp_path / "train.parquet"),
                   label_field="species"))


def test_an_empty_split_says_how_to_fill_it(ray_local, tmp_path):
    t = _table(30)
    t["part"] = np.array(["train", "test"])[np.arange(30) % 2]
    pq.write_table(pa.table(t), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"the val split is empty \(train: 15, val: 0, test: 15\); set "
                                        r"data.val_path"):
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "t.parquet"), label_field="species",
                   split_field="part"))


def test_the_cli_prints_one_line_and_exits_2_and_writes_nothing(tmp_path, capsys):
    from distill_ray.cli import main

    pq.write_table(pa.table(_table(20)), tmp_path / "t.parquet")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"name": "bad", "teachers": TEACHERS, "run_dir": str(tmp_path / "runs"),
                               "data": {"format": "parquet", "path": str(tmp_path / "t.parquet"),
                                        "label_field": "species", "feature_fields": ["nope"]}}))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distill-ray: data error: data.feature_fields: ['nope'] not in")
    assert not (tmp_path / "runs").exists()


def test_labels_kept_on_a_seeded_share_of_train_and_an_unlabeled_file_joins_train(ray_local, tmp_path):
    """data.labeled_fraction keeps labels on a seeded subset of the train rows (val and test keep
    theirs; max_labeled_samples sets the same share from a count); data.unlabeled_path adds train
    rows without labels."""
    t = _table(600)
    pq.write_table(pa.table(t), tmp_path / "labeled.parquet")
    extra = {k: v for k, v in _table(200, seed=1).items() if k != "species"}  # unlabeled: no label column needed
    pq.write_table(pa.table(extra), tmp_path / "more.parquet")
    base = dict(format="parquet", path=str(tmp_path / "labeled.parquet"), label_field="species",
                val_fraction=0.2, test_fraction=0.2)
    full = _load(_cfg(tmp_path, **base))
    part = _load(_cfg(tmp_path, **base, labeled_fraction=0.25))
    assert part.info.counts == full.info.counts and part.info.fingerprint != full.info.fingerprint
    assert part.info.labeled["val"] == full.info.counts["val"] and part.info.labeled["test"] == full.info.counts["test"]
    share = part.info.labeled["train"] / full.info.counts["train"]
    assert 0.17 < share < 0.33
    before, after = _rows(full.train), _rows(part.train)
    kept = after["label"] >= 0
    assert kept.sum() == part.info.labeled["train"]
    np.testing.assert_array_equal(after["label"][kept], before["label"][kept])  # kept labels unchanged

    joined = _load(_cfg(tmp_path, **base, unlabeled_path=str(tmp_path / "more.parquet")))
    assert joined.info.counts["train"] == full.info.counts["train"] + 200
    assert joined.info.labeled == full.info.labeled
    rows = _rows(joined.train)
    assert (rows["label"] == -1).sum() == 200
    assert joined.info.counts["val"] == full.info.counts["val"]  # the unlabeled file adds to train only


def test_transfer_rows_join_train_only_unlabeled_and_change_the_cache_key_but_not_the_teachers_key(tabular):
    cfg, src, t = tabular
    auto = _load(_cfg(Path(cfg.run_dir).parent, format="parquet", path=cfg.data.path, label_field="species",
                      val_fraction=0.2, test_fraction=0.2, transfer="mixup", transfer_size=3))
    info = auto.info
    assert info.transfer == "mixup" and info.transfer_rows == 3 * src.info.counts["train"]
    assert info.counts == {**src.info.counts, "train": 4 * src.info.counts["train"]} and info.labeled == src.info.labeled
    assert info.fingerprint != src.info.fingerprint and info.source_fingerprint == src.info.source_fingerprint
    train = _rows(auto.splits["train"])
    assert len(train["id"]) == info.counts["train"] and len(set(train["id"].tolist())) == len(train["id"])
    made = ~np.isin(train["id"], _rows(src.splits["train"])["id"])
    assert made.sum() == info.transfer_rows and (train["label"][made] == -1).all() and (train["label"][~made] >= 0).all()
    lo, hi = train["x"][~made].min(0), train["x"][~made].max(0)
    assert ((train["x"][made] >= lo - 1e-5) & (train["x"][made] <= hi + 1e-5)).all()  # mixes stay in the hull's box
    for split in ("val", "test"):
        np.testing.assert_array_equal(_rows(auto.splits[split])["id"], _rows(src.splits[split])["id"])
# --- columns: every one used or named, none left out in silence --------------------------------------

def _f3_table(n: int = 40, bad_row: int | None = 7) -> pa.Table:
    """f0..f2 numbers, f3 numbers stored as strings ('oops' at ``bad_row``), an int label."""
    rng = np.random.default_rng(0)
    f3 = [str(v) for v in np.round(rng.normal(size=n), 2)]
    if bad_row is not None:
        f3[bad_row] = "oops"
    return pa.table({"f0": rng.normal(size=n), "f1": rng.normal(size=n), "f2": rng.normal(size=n), "f3": f3,
                     "label": np.arange(n) % 2})


def test_a_string_column_of_mostly_numbers_is_refused_naming_the_bad_value(ray_local, tmp_path):
    pq.write_table(_f3_table(), tmp_path / "t.parquet")
    with pytest.raises(DataError) as err:
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "t.parquet")))
    assert str(err.value) == (f"{tmp_path / 't.parquet'}: column 'f3' holds numbers stored as strings, but 'oops' is "
                              "not a number; clean that value (and any like it) and store the column as numbers, or "
                              "leave the column out with data.feature_fields (the numeric columns to use)")
    # The same file with data.feature_fields leaving f3 out loads, and says what was left out and why.
    info = _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "t.parquet"),
                      feature_fields=["f0", "f1", "f2"])).info
    assert info.feature_fields == ("f0", "f1", "f2") and info.input_shape == (3,)
    assert info.left_out == {"f3": "not in data.feature_fields", "label": "label column"}


def test_a_bad_value_past_the_sample_is_found_by_the_workers(ray_local, tmp_path, monkeypatch):
    from distill_ray.data import columns

    monkeypatch.setattr(columns, "SAMPLE_ROWS", 10)  # the sample is all numbers; row 30 is not
    pq.write_table(_f3_table(bad_row=30), tmp_path / "late.parquet")
    with pytest.raises(DataError, match=r"late\.parquet: column 'f3' holds numbers stored as strings, but 'oops' is "
                                        r"not a number"):
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "late.parquet")))
    pq.write_table(_f3_table(bad_row=None), tmp_path / "clean.parquet")  # every value a number, as strings
    with pytest.raises(DataError) as err:
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "clean.parquet")))
    first = _f3_table(bad_row=None).column("f3")[0].as_py()
    assert str(err.value) == (f"{tmp_path / 'clean.parquet'}: column 'f3' holds numbers stored as strings "
                              f"(e.g. {first!r}); store it as a numeric column, or leave the column out with "
                              "data.feature_fields (the numeric columns to use)")


def test_a_label_field_that_is_not_a_column_is_named(ray_local, tmp_path):
    pq.write_table(_f3_table(), tmp_path / "t.parquet")
    with pytest.raises(DataError) as err:
        _load(_cfg(tmp_path, format="parquet", path=str(tmp_path / "t.parquet"), label_field="digit"))
    assert str(err.value) == (f"data.label_field: column 'digit' is not in {tmp_path / 't.parquet'}; its columns "
                              "are: f0, f1, f2, f3, label")


def test_the_data_line_shortens_many_features_and_names_every_column_left_out():
    from distill_ray.data.columns import columns_summary

    features = tuple(f"f{i}" for i in range(36) if i != 3)
    assert columns_summary(features, {"f3": "not in data.feature_fields", "label": "label column"}) == \
        "35 feature columns (f0..f35); left out: f3 (not in data.feature_fields), label (label column)"
    assert columns_summary(("sepal",), {}) == "1 feature column (sepal)"
    assert columns_summary(("a", "b", "c"), {"note": "mostly text"}) == \
        "3 feature columns (a, b, c); left out: note (mostly text)"
    assert columns_summary((), {"score": "not used"}) == "left out: score (not used)"
    assert columns_summary((), {}) == ""


def test_a_data_info_saved_before_left_out_existed_still_loads():
    from distill_ray.data.sources import DataInfo

    old = {"task": "classification", "kind": "tabular", "num_classes": 2, "class_names": ["a", "b"],
           "input_shape": [3], "counts": {"train": 1}, "labeled": {"train": 1}, "fingerprint": "x",
           "feature_fields": ["f0", "f1", "f2"]}
    info = DataInfo.from_dict(old)
    assert info.left_out == {} and info.feature_fields == ("f0", "f1", "f2")
    assert DataInfo.from_dict(info.to_dict()) == info
