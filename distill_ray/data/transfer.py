"""A transfer set made from the train rows (``data.transfer``): extra inputs for the teachers to label.

When every train row is labeled and the teachers trained on those same rows, their soft targets on
those rows say little that the labels do not: the teachers fit them. Distillation pays on inputs the
teachers did not train on (Hinton et al. 2015 distilled MNIST on jittered digits; Buciluǎ et al. 2006
labelled synthetic points). These functions make such inputs from each train row:

- ``mixup``: a convex pair ``lam * x_i + (1 - lam) * x_j`` with a partner from the same batch and
  ``lam ~ U(0, 1)`` (tables, images);
- ``noise``: Gaussian noise of ``NOISE_STD`` per feature; tabular inputs are standardised by then, so
  it is per-feature scaled (tables, images);
- ``augment``: what keeps an input's meaning for its kind: shifts and crops for images (up to 1/8 of
  the side, zero-filled), 15% of the tokens masked (a mask token) or dropped for text, noise for tables.

A transfer row gets label -1 (KD only, like any unlabeled row), split ``train`` and an id derived from
its source row's id and its copy number, so it is the same row in every run; every draw is seeded by
that id. Pure numpy: the Ray Data stage in ``data/sources.py`` calls ``with_transfer_rows`` per batch.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from distill_ray.config import TRANSFER_KINDS
from distill_ray.data.rows import DataError, mix64

NOISE_STD = 0.3        # standard deviations of a standardised feature (or of a [0, 1] pixel)
SHIFT_FRACTION = 1 / 8  # images: the largest shift, as a share of the side
TOKEN_DROP = 0.15       # text: share of the real tokens masked or dropped
ROW_KINDS = tuple(k for k in TRANSFER_KINDS if k not in ("auto", "none"))
"""The transfer sets that make rows (``data.transfer`` less auto and none)."""
KINDS_FOR = {"tabular": ROW_KINDS, "image": ROW_KINDS, "text": ("augment",)}
AUTO_KIND = {"tabular": "none", "image": "none", "text": "augment"}
"""``data.transfer: auto`` (the default) per kind of input: what measured best on fully labeled project data
(docs/defaults.md: token masking paid on text, MixUp cost more often than it paid on tables and images)."""


def resolve_transfer(requested: str, kind: str, task: str, labeled: int, unlabeled: int) -> str:
    """The transfer kind a run uses: ``none`` or one of ``KINDS_FOR[kind]``.

    ``auto`` adds none when the train split already has at least as many unlabeled rows as labeled ones
    (they are the transfer set) and for language models (a window's labels are its own tokens)."""
    if requested == "none":
        return "none"
    if task != "classification" or kind not in KINDS_FOR:
        if requested == "auto":
            return "none"
        raise DataError(f"data.transfer: {requested!r} makes inputs for classifiers of tables, images or text; "
                        f"this data is {kind} for {task}; set data.transfer=none")
    if requested == "auto":
        return "none" if unlabeled >= labeled else AUTO_KIND[kind]
    if requested not in KINDS_FOR[kind]:
        raise DataError(f"data.transfer: {requested!r} does not apply to {kind} inputs; choose from: "
                        f"{', '.join(('auto', 'none') + KINDS_FOR[kind])}")
    return requested


MAX_COPIES = 15  # the copy number lives in an id's low 4 bits


def transfer_ids(ids: np.ndarray, copy: int) -> np.ndarray:
    """The id of copy ``copy`` (1..MAX_COPIES) of each source row: a fixed scramble of (id, copy),
    non-negative, whose low 4 bits are ``copy``, so the first k copies of every row can be kept from a
    cache built with more (``first_copies``: the built-in search tries several sizes on one cache)."""
    if not 1 <= copy <= MAX_COPIES:
        raise ValueError(f"copy must be within 1..{MAX_COPIES}, got {copy}")
    with np.errstate(over="ignore"):
        key = np.asarray(ids).astype(np.int64).view(np.uint64) + np.uint64(copy) * np.uint64(0x9E3779B97F4A7C15)
    scrambled = (mix64(key) >> np.uint64(5)) << np.uint64(4)
    return (scrambled | np.uint64(copy)).astype(np.int64)


def first_copies(batch: dict[str, np.ndarray], copies: int) -> dict[str, np.ndarray]:
    """The labeled rows and the first ``copies`` transfer copies of ``batch`` (a Ray Data stage). Every
    unlabeled row is taken for a transfer row: use it only on data whose unlabeled rows all are."""
    kept = (np.asarray(batch["label"]) >= 0) | ((np.asarray(batch["id"]) & MAX_COPIES) <= copies)
    return {k: v[kept] for k, v in batch.items()}


def _row_rngs(ids: np.ndarray, seed: int) -> list[np.random.Generator]:
    return [np.random.default_rng([int(i) & 0xFFFFFFFF, int(i) >> 32, seed]) for i in np.asarray(ids).astype(np.uint64)]


def _mixup(x: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
    if len(x) < 2:
        return x.copy()
    order = np.argsort(mix64(np.asarray(ids).astype(np.uint64) ^ np.uint64(seed + 1)), kind="stable")
    partner = np.empty(len(x), dtype=np.int64)
    partner[order] = np.roll(order, 1)  # each row's partner is the next one in a seeded order: never itself
    lam = np.array([r.random() for r in _row_rngs(ids, seed)], dtype=np.float32)
    lam = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    return (lam * x + (1 - lam) * x[partner]).astype(x.dtype)


def _noise(x: np.ndarray, ids: np.ndarray, seed: int, clip: bool) -> np.ndarray:
    noise = np.stack([r.standard_normal(x.shape[1:]) for r in _row_rngs(ids, seed)]) if len(x) else 0.0
    out = (x + NOISE_STD * noise).astype(x.dtype)
    return np.clip(out, 0.0, 1.0) if clip else out


def _shift_images(x: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
    """A random shift of up to SHIFT_FRACTION of each side, zero-filled (a crop of the padded image)."""
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    max_dy, max_dx = max(1, int(h * SHIFT_FRACTION)), max(1, int(w * SHIFT_FRACTION))
    for i, r in enumerate(_row_rngs(ids, seed)):
        dy, dx = int(r.integers(-max_dy, max_dy + 1)), int(r.integers(-max_dx, max_dx + 1))
        src = x[i][..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        out[i][..., max(0, dy):max(0, dy) + src.shape[-2], max(0, dx):max(0, dx) + src.shape[-1]] = src
    return out


def _mask_tokens(x: np.ndarray, ids: np.ndarray, seed: int, pad_id: int, mask_id: int | None,
                 special_ids: tuple[int, ...]) -> np.ndarray:
    """TOKEN_DROP of each row's real tokens masked (half of them, when there is a mask token) or dropped."""
    out = np.full_like(x, pad_id)
    keep_fixed = np.isin(x, np.asarray(special_ids + (pad_id,), dtype=x.dtype))
    for i, r in enumerate(_row_rngs(ids, seed)):
        hit = (r.random(x.shape[1]) < TOKEN_DROP) & ~keep_fixed[i]
        mask = hit & (r.random(x.shape[1]) < 0.5) if mask_id is not None else np.zeros_like(hit)
        row = np.where(mask, mask_id if mask_id is not None else pad_id, x[i])
        kept = row[~(hit & ~mask)]
        out[i, :len(kept)] = kept
    return out


def transfer_inputs(kind: str, data_kind: str, x: np.ndarray, ids: np.ndarray, seed: int,
                    tokens: Mapping[str, object] | None = None) -> np.ndarray:
    """One draw of ``kind`` for each input of ``x`` (``[B, ...]``), seeded by ``ids`` (the new rows' ids)."""
    if kind == "mixup":
        return _mixup(x, ids, seed)
    if kind == "noise" or (kind == "augment" and data_kind == "tabular"):
        return _noise(x, ids, seed, clip=data_kind == "image")
    if kind == "augment" and data_kind == "image":
        return _shift_images(x, ids, seed)
    if kind == "augment" and data_kind == "text":
        tokens = tokens or {}
        return _mask_tokens(x, ids, seed, int(tokens.get("pad_id", 0)), tokens.get("mask_id"),
                            tuple(tokens.get("special_ids", ())))
    raise ValueError(f"no {kind!r} transfer for {data_kind} inputs")


def with_transfer_rows(batch: dict[str, np.ndarray], kind: str, data_kind: str, copies: int, seed: int,
                       tokens: Mapping[str, object] | None = None) -> dict[str, np.ndarray]:
    """``batch`` (columns id, x, label, split) followed by ``copies`` transfer rows per train row."""
    train = np.asarray(batch["split"]) == "train"
    if kind == "none" or not train.any():
        return batch
    x, ids = np.asarray(batch["x"])[train], np.asarray(batch["id"])[train]
    new_x, new_ids = [], []
    for copy in range(1, copies + 1):
        copy_ids = transfer_ids(ids, copy)
        new_ids.append(copy_ids)
        new_x.append(transfer_inputs(kind, data_kind, x, copy_ids, seed, tokens))
    n = len(ids) * copies
    out = {"id": np.concatenate([batch["id"], *new_ids]),
           "x": np.concatenate([np.asarray(batch["x"]), *new_x]),
           "label": np.concatenate([np.asarray(batch["label"]), np.full(n, -1, dtype=np.int64)]),
           "split": np.concatenate([np.asarray(batch["split"]).astype(str), np.full(n, "train")])}
    extra = set(batch) - set(out)
    if extra:
        raise ValueError(f"transfer rows cannot fill columns {sorted(extra)}")
    return out
