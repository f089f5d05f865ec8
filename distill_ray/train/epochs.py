"""Which rows a worker trains each epoch: this rank's train shard (kept in memory or streamed every
epoch, ``streams``), its validation rows, and per epoch the curriculum's choice, returned as an
``EpochSelection`` (stage, open fraction, a kept shard's order) together with the epoch's batches.

A streamed epoch is posted to the driver's ``EpochPlan`` first: its Ray Data epoch stage
(curriculum, mixing) and the online teachers downstream of it work on exactly the rows this epoch
trains. Difficulty measures only matter while the curriculum holds data back (a streamed shard scans
its index once, on first use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import ray
import ray.train
import torch

from distill_ray.kd import curriculum as cur
from distill_ray.kd.objectives import stage_and_fraction
from distill_ray.models import forward_logits, unwrap_model
from distill_ray.train.streams import KeptShard, StreamedShard, fused_difficulty, open_ids_for

if TYPE_CHECKING:
    from distill_ray.train.options import WorkerOptions


@dataclass(frozen=True, eq=False)
class EpochSelection:
    """What an epoch trains: its curriculum stage, the fraction of (easiest) rows open and, for a
    kept shard, the order of its rows (positions into the shard; None when streamed)."""

    stage: int = 0
    fraction: float = 1.0
    order: torch.Tensor | None = None


class RankData:
    """This rank's rows: its train shard, its validation split, and each epoch's selection."""

    def __init__(self, opts: WorkerOptions, rank: int, per_rank_batch: int):
        self.cfg, self.opts, self.rank, self.per_rank_batch = opts.config, opts, rank, per_rank_batch
        self.keep = opts.keep_shard
        self.val_iterator = ray.train.get_dataset_shard(f"val_{rank}")
        if self.keep:
            self.shard = KeptShard(ray.train.get_dataset_shard(f"train_{rank}"))
            self.val_kept = KeptShard(self.val_iterator, allow_empty=True)  # read once, like the train shard
        else:
            self.shard = StreamedShard(ray.train.get_dataset_shard(f"train_{rank}"),
                                       ray.train.get_dataset_shard(f"index_{rank}"), self.cfg.train.shuffle_buffer_rows)

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        size = 256 if self.opts.causal else 1024
        return self.val_kept.all_batches(size) if self.keep else \
            self.val_iterator.iter_torch_batches(batch_size=size, device="cpu")

    def _student_scores(self, model, device, kind: str) -> torch.Tensor:
        """Per row of a kept shard: the student's loss (``loss``) or confidence, live."""
        x_all, y_all = self.shard.columns["x"], self.shard.columns["label"].long()
        with torch.no_grad():
            logits = torch.cat([forward_logits(unwrap_model(model), x_all[i:i + 1024].to(device)).float().cpu()
                                for i in range(0, len(x_all), 1024)])
        return cur.student_loss(logits, y_all) if kind == "loss" else logits.softmax(-1).max(-1).values

    def epoch(self, epoch: int, step: int, start: int, model, device,
              resumed: EpochSelection | None = None) -> tuple[EpochSelection, Iterator[dict[str, torch.Tensor]]]:
        """The selection for ``epoch`` (at run step ``step``) and its batches from batch ``start`` on.
        ``resumed``: a kept shard's mid-epoch checkpoint, whose selection the epoch finishes."""
        c, seed = self.cfg.curriculum, self.cfg.train.seed
        stage, fraction = stage_and_fraction(self.cfg, epoch, step)
        measures = self.shard.measures() if self.opts.use_teachers and (self.keep or fraction < 1.0) else {}
        if not self.keep:
            difficulty = fused_difficulty(measures, c.measurers, c.rrf_k)
            open_ids = open_ids_for(self.shard.ids(), difficulty, fraction, seed) if fraction < 1.0 else None
            if self.opts.epoch_plan is not None:
                ray.get(self.opts.epoch_plan.set.remote(self.rank, epoch, open_ids))
            return EpochSelection(stage, fraction), \
                self.shard.epoch_batches(epoch, seed + self.rank, self.per_rank_batch, start=start)
        if resumed is not None:
            selection = resumed
        elif c.scheduler == "confidence":
            weights = cur.ConfidenceSampling(tau=c.confidence_tau).sampling_weights(
                self._student_scores(model, device, "confidence"))
            selection = EpochSelection(stage, fraction, cur.sample_for_rank(weights, len(self.shard), epoch,
                                                                            seed + self.rank, 0, 1))
        else:
            if "student_loss" in c.measurers and fraction < 1.0:
                measures = {**measures, "student_loss": self._student_scores(model, device, "loss")}
            difficulty = fused_difficulty(measures, c.measurers, c.rrf_k)
            # Nothing ranks the data (the baseline has no teachers): a stage opens a seeded random part
            # of it, not the first rows in storage order.
            ranked = cur.difficulty_order(difficulty) if difficulty is not None else torch.arange(len(self.shard)) \
                if fraction >= 1.0 else torch.randperm(len(self.shard), generator=torch.Generator().manual_seed(seed))
            order = cur.shard_for_rank(cur.open_subset(ranked, fraction), epoch, seed + self.rank, 0, 1)
            selection = EpochSelection(stage, fraction, order)
        return selection, self.shard.epoch_batches(selection.order, self.per_rank_batch, start=start)
