"""The transfer set made from train rows (data.transfer): pure numpy, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from distill_ray.data.rows import DataError
from distill_ray.data.transfer import NOISE_STD, resolve_transfer, transfer_ids, transfer_inputs, with_transfer_rows


def _batch(x, splits, labels=None):
    n = len(x)
    return {"id": np.arange(100, 100 + n, dtype=np.int64), "x": np.asarray(x),
            "label": np.asarray(labels if labels is not None else np.arange(n) % 3, dtype=np.int64),
            "split": np.asarray(splits)}


def test_auto_adds_rows_only_when_unlabeled_rows_are_few():
    assert resolve_transfer("auto", "tabular", "classification", labeled=1000, unlabeled=0) == "none"
    assert resolve_transfer("auto", "image", "classification", labeled=1000, unlabeled=999) == "none"
    assert resolve_transfer("auto", "text", "classification", labeled=1000, unlabeled=10) == "augment"
    assert resolve_transfer("auto", "image", "classification", labeled=5000, unlabeled=49000) == "none"
    assert resolve_transfer("auto", "tokens", "causal_lm", labeled=100, unlabeled=0) == "none"
    assert resolve_transfer("none", "tabular", "classification", labeled=10, unlabeled=0) == "none"


def test_a_kind_that_does_not_fit_the_data_names_the_key_and_the_choices():
    with pytest.raises(DataError, match=r"data.transfer: 'mixup' does not apply to text inputs; choose from: "
                                        r"auto, none, augment"):
        resolve_transfer("mixup", "text", "classification", labeled=10, unlabeled=0)
    with pytest.raises(DataError, match="data.transfer: 'noise' makes inputs for classifiers"):
        resolve_transfer("noise", "tokens", "causal_lm", labeled=10, unlabeled=0)


def test_transfer_rows_come_from_train_rows_only_unlabeled_with_fresh_stable_ids():
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    batch = _batch(x, ["train", "val", "train", "test", "train", "train"])
    out = with_transfer_rows(dict(batch), "noise", "tabular", copies=3, seed=0)
    assert len(out["id"]) == 6 + 4 * 3
    np.testing.assert_array_equal(out["x"][:6], x)  # the real rows come first, unchanged
    new = slice(6, None)
    assert (out["label"][new] == -1).all() and (out["split"][new] == "train").all()
    assert len(set(out["id"].tolist())) == len(out["id"])  # no id collides with a real row or another copy
    again = with_transfer_rows(dict(batch), "noise", "tabular", copies=3, seed=0)
    np.testing.assert_array_equal(out["id"], again["id"])
    np.testing.assert_array_equal(out["x"], again["x"])  # seeded by id: the same rows every run
    assert not np.array_equal(with_transfer_rows(dict(batch), "noise", "tabular", 3, seed=1)["x"], out["x"])
    assert (transfer_ids(batch["id"], 1) >= 0).all()


def test_no_train_rows_or_kind_none_leaves_the_batch_alone():
    batch = _batch(np.zeros((2, 3), np.float32), ["val", "test"])
    assert with_transfer_rows(batch, "mixup", "tabular", 4, 0) is batch
    batch = _batch(np.zeros((2, 3), np.float32), ["train", "train"])
    assert with_transfer_rows(batch, "none", "tabular", 4, 0) is batch


def test_noise_has_the_documented_scale():
    x = np.zeros((4000, 8), np.float32)
    out = transfer_inputs("noise", "tabular", x, np.arange(4000), seed=0)
    assert abs(out.std() - NOISE_STD) < 0.01 and abs(out.mean()) < 0.01


def test_mixup_is_a_convex_pair_of_two_different_rows():
    x = np.eye(5, dtype=np.float32)  # row i is one-hot at i: a mix shows its two parents and weights
    out = transfer_inputs("mixup", "tabular", x, np.arange(5) + 7, seed=0)
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-6)
    for i, row in enumerate(out):
        parents = np.flatnonzero(row > 0)
        assert i in parents or row[i] == 0
        assert 1 <= len(parents) <= 2 and (row >= 0).all()
    partners = [sorted(set(np.flatnonzero(r > 1e-6)) - {i}) for i, r in enumerate(out)]
    assert all(len(p) == 1 for p in partners if p)  # exactly one partner, never the row itself


def test_image_shift_moves_the_picture_without_changing_it():
    img = np.zeros((1, 1, 16, 16), np.float32)
    img[0, 0, 6:10, 6:10] = 1.0  # a 4x4 square away from the border: a shift of <= 2 keeps it whole
    outs = np.concatenate([transfer_inputs("augment", "image", img, np.array([i]), seed=0) for i in range(40)])
    assert (outs.sum(axis=(1, 2, 3)) == 16).all()  # every copy holds the whole square
    offsets = {tuple(np.argwhere(o[0] == 1).min(0) - 6) for o in outs}
    assert len(offsets) > 5 and all(max(abs(d) for d in off) <= 2 for off in offsets)  # 16 / 8 = 2 pixels


def test_token_masking_keeps_special_and_pad_tokens_and_masks_or_drops_some_real_ones():
    pad, cls, sep, mask = 0, 101, 102, 103
    real = np.arange(1000, 1060)
    row = np.concatenate([[cls], real, [sep], np.full(3, pad)])[None]
    tokens = {"pad_id": pad, "mask_id": mask, "special_ids": [cls, sep, mask]}
    out = np.concatenate([transfer_inputs("augment", "text", row, np.array([i]), 0, tokens) for i in range(50)])
    assert (out[:, 0] == cls).all() and out.shape == (50, row.shape[1])
    touched = [(np.isin(o, real).sum()) for o in out]
    assert 60 * 0.75 < np.mean(touched) < 60 * 0.95  # about 15% of the 60 real tokens masked or dropped
    assert (out == mask).any() and (np.array([(o != pad).sum() for o in out]) < 62).any()  # both happen
    assert all((o == sep).sum() == 1 for o in out)


def test_the_first_copies_of_every_row_can_be_kept_from_a_larger_transfer_set():
    from distill_ray.data.transfer import first_copies

    batch = _batch(np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32), ["train"] * 5)
    out = with_transfer_rows(dict(batch), "mixup", "tabular", copies=8, seed=0)
    for k in (0, 2, 8):
        kept = first_copies(dict(out), k)
        assert len(kept["id"]) == 5 + 5 * k
        np.testing.assert_array_equal(kept["id"], with_transfer_rows(dict(batch), "mixup", "tabular", 8, 0)["id"]
                                      [np.r_[0:5, 5:5 + 5 * k]])  # copies 1..k of every row, in order
    with pytest.raises(ValueError, match="copy must be within 1..15"):
        transfer_ids(batch["id"], 16)
