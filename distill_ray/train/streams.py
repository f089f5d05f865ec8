"""How a Ray Train worker reads its part of the training data: its own stream, kept or streamed.

The driver gives each rank a Dataset of its own rows (``stages.rank_stream``: rows whose id hashes
to the rank), so DDP workers read disjoint data and a restarted worker gets the same rows again.
Each worker then either

- keeps its shard (``KeptShard``): reads it once from ``ray.train.get_dataset_shard`` into tensors
  sorted by id; every epoch is a seeded permutation of it. Fast (as fast as a plain PyTorch loop),
  and used when the shard fits ``train.memory_budget_mb``; or
- streams it (``StreamedShard``): every epoch iterates the Ray Data stream again, in a fixed order
  (``preserve_order``) with Ray's seeded local shuffle, so a resumed epoch can skip exactly the
  batches already trained. Memory stays at the stream's buffers, whatever the data size. The
  curriculum ranks the shard's index (ids and difficulty columns only) and the stream's epoch stage
  drops what it holds back (``stages.EpochStage``).

Both give the loop batches as ``{column: tensor}`` of exactly ``batch_size`` rows.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from distill_ray.kd import curriculum
from distill_ray.data.rows import id_uniform

RANK_SALT = 7  # the id hash that assigns rows to ranks is independent of the split hash
DIFFICULTY_PREFIX = "difficulty/"


def rank_of(ids: np.ndarray, world: int) -> np.ndarray:
    """The rank that owns each sample id (a seeded hash, so shards are balanced and fixed)."""
    return np.minimum((id_uniform(ids, 0, salt=RANK_SALT) * world).astype(np.int64), world - 1)


def fused_difficulty(measures: dict[str, torch.Tensor], names: Sequence[str], rrf_k: int) -> torch.Tensor | None:
    """One difficulty per row from the configured measures (reciprocal-rank fusion when several)."""
    # float64: a rank-fused measure (reference_rouge_loss) separates neighbours by ~1/N^2, below float32's resolution.
    found = [measures[n].double() for n in names if n in measures]
    if not found:
        return None
    return found[0] if len(found) == 1 else curriculum.reciprocal_rank_fusion(*found, k=rrf_k)


def _to_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in batch.items()}


class KeptShard:
    """A worker's shard read once into tensors, sorted by id (so a restart rebuilds the same order)."""

    def __init__(self, iterator, read_batch_rows: int = 2048, allow_empty: bool = False):
        parts: dict[str, list[np.ndarray]] = {}
        for batch in iterator.iter_batches(batch_size=read_batch_rows, batch_format="numpy", prefetch_batches=2):
            for key, value in batch.items():
                parts.setdefault(key, []).append(np.asarray(value))
        if not parts and allow_empty:
            self.columns = {"id": torch.zeros(0, dtype=torch.long)}
            return
        if not parts:
            raise ValueError("this worker's shard of the training data is empty; use fewer train.num_workers")
        columns = {k: np.concatenate(v) for k, v in parts.items()}
        order = np.argsort(columns["id"], kind="stable")
        self.columns = {k: torch.from_numpy(np.array(v[order])) for k, v in columns.items()}

    def __len__(self) -> int:
        return len(self.columns["id"])

    def measures(self) -> dict[str, torch.Tensor]:
        return {k[len(DIFFICULTY_PREFIX):]: v for k, v in self.columns.items() if k.startswith(DIFFICULTY_PREFIX)}

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.columns.items() if not k.startswith(DIFFICULTY_PREFIX)}

    def all_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every row once, in id order, the last batch partial (validation)."""
        for i in range(0, len(self), batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.columns.items()}

    def epoch_batches(self, order: torch.Tensor, batch_size: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``order`` (positions into the shard), from batch ``start`` on; the last partial
        batch is dropped, as every epoch's is."""
        for b in range(start, len(order) // batch_size):
            yield self.rows(order[b * batch_size:(b + 1) * batch_size])


class StreamedShard:
    """A worker's shard streamed from Ray Data every epoch, in a fixed, seeded order."""

    def __init__(self, iterator, index_iterator, shuffle_buffer_rows: int, read_batch_rows: int = 256):
        self.iterator, self.index_iterator = iterator, index_iterator
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.read_batch_rows = read_batch_rows
        self._ids: np.ndarray | None = None
        self._measures: dict[str, torch.Tensor] | None = None

    def _scan(self) -> None:
        """One pass over the shard's index (ids and difficulty measures: a few numbers per row)."""
        ids, measures = [], {}
        for batch in self.index_iterator.iter_batches(batch_size=4096, batch_format="numpy"):
            ids.append(np.asarray(batch["id"]))
            for k, v in batch.items():
                if k.startswith(DIFFICULTY_PREFIX):
                    measures.setdefault(k[len(DIFFICULTY_PREFIX):], []).append(np.asarray(v))
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(all_ids, kind="stable")
        self._ids = all_ids[order]
        self._measures = {k: torch.as_tensor(np.concatenate(v)[order]) for k, v in measures.items()}

    def __len__(self) -> int:
        if self._ids is None:
            self._scan()
        return len(self._ids)

    def measures(self) -> dict[str, torch.Tensor]:
        if self._measures is None:
            self._scan()
        return self._measures

    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._scan()
        return self._ids

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This epoch's batches: the stream (whose epoch stage already dropped the rows the curriculum
        holds back) shuffled with a buffer seeded by (seed, epoch), re-cut into ``batch_size`` rows;
        batches before ``start`` are read and skipped, not trained."""
        pending: dict[str, list[np.ndarray]] = {}
        pending_rows, emitted = 0, 0
        stream = self.iterator.iter_batches(
            batch_size=self.read_batch_rows, batch_format="numpy", prefetch_batches=2,
            local_shuffle_buffer_size=self.shuffle_buffer_rows or None,
            local_shuffle_seed=(seed * 1_000_003 + epoch) % (2**31) if self.shuffle_buffer_rows else None)
        for batch in stream:
            batch = {k: v for k, v in batch.items() if not k.startswith(DIFFICULTY_PREFIX)}
            for k, v in batch.items():
                pending.setdefault(k, []).append(np.asarray(v))
            pending_rows += len(batch["id"])
            while pending_rows >= batch_size:
                merged = {k: np.concatenate(v) for k, v in pending.items()}
                out = {k: v[:batch_size] for k, v in merged.items()}
                pending = {k: [v[batch_size:]] for k, v in merged.items()}
                pending_rows -= batch_size
                if emitted >= start:
                    yield _to_tensors(out)
                emitted += 1


def open_ids_for(ids: np.ndarray, difficulty: torch.Tensor | None, fraction: float, seed: int) -> np.ndarray | None:
    """Sorted ids of the rows a curriculum stage opens: the easiest ``fraction`` by difficulty (a
    seeded random part when nothing ranks the data); None when everything is open."""
    if fraction >= 1.0 or len(ids) == 0:
        return None
    order = curriculum.difficulty_order(difficulty) if difficulty is not None else \
        torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    count = min(max(math.ceil(fraction * len(ids)), 1), len(ids))
    return np.sort(ids[order[:count].numpy()])
