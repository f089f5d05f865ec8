"""The Ray Data stages between a split and a Train worker: one rank's stream, built on the driver.

A rank's training stream is ``rows of the rank -> EpochStage -> one stage per teacher (online mode)
-> the worker``. Everything upstream of the worker is Ray Data, so the teachers answer while the
student trains (by construction: the stream is pulled ahead of the step), and the student gets
targets, hint and attention features as columns of its batch, exactly as it gets them from the cache
in cached mode. A teacher stage only asks the teacher's service (``teachers/service.py``), started
once per run: the teachers are loaded once, whatever the number of epochs.

Ray Data starts a dataset's actor stages anew for every execution, that is for every epoch a worker
streams. ``EpochPlan`` (a tiny actor owned by the driver) is where a worker posts, before it starts
an epoch, which epoch it is and which rows its curriculum opens; the ``EpochStage`` actor of that
execution reads the plan when it starts. So the rows a curriculum holds back never reach a teacher,
and MixUp/CutMix draws fresh pairs every epoch, reproducibly (a function of seed, rank, epoch and
the rows of the batch), upstream of the teachers: they see exactly the mixed rows the student trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from distill_ray.kd.labels import cutmix, mixup
from distill_ray.train.streams import rank_of
from distill_ray.teachers.service import TeacherService, ask_teacher

MIX_BATCH_ROWS = 256  # rows mixed with each other (pairs are drawn inside one such batch)
ASK_CPUS = 0.1  # a teacher stage's task: it waits on the teacher's service, which holds the teacher's CPUs


@dataclass(frozen=True)
class MixSettings:
    mixup_alpha: float
    cutmix_alpha: float
    num_classes: int
    seed: int

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@ray.remote(num_cpus=0)
class EpochPlan:
    """Per rank: the epoch it is about to stream and the sorted ids its curriculum opens (None: all)."""

    def __init__(self):
        self.plans: dict[int, tuple[int, Any]] = {}

    def set(self, rank: int, epoch: int, open_ids: np.ndarray | None) -> None:
        self.plans[rank] = (epoch, open_ids)

    def get(self, rank: int) -> tuple[int, Any]:
        return self.plans.get(rank, (0, None))


def mix_generator(seed: int, rank: int, epoch: int, batch: int) -> torch.Generator:
    """The MixUp/CutMix generator of one batch: a function of (seed, rank, epoch, batch) only, so a
    resumed run mixes every batch exactly as an uninterrupted one (nothing to checkpoint)."""
    entropy = np.random.SeedSequence([seed % 2**32, rank, epoch, batch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def mix_batch(mixup_alpha: float, cutmix_alpha: float, x: torch.Tensor, y: torch.Tensor, num_classes: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """One batch mixed by MixUp (``mixup_alpha``) or CutMix (``cutmix_alpha``; with both on, a coin
    flip per batch): ``(x, y_a, y_b, lam)``, the task loss being ``lam * CE(y_a) + (1 - lam) * CE(y_b)``.
    Without mixing: ``(x, y, None, 1.0)``."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, y, None, 1.0
    if not x.is_floating_point():
        raise ValueError("loss.mixup_alpha / loss.cutmix_alpha mix images; these inputs are token ids")
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=generator).item() < 0.5)
    fn, alpha = (cutmix, cutmix_alpha) if use_cutmix else (mixup, mixup_alpha)
    # Unlabeled rows (-1) still mix their inputs; only their task loss is skipped.
    mixed, _, permutation, lam = fn(x, y.clamp_min(0), num_classes, alpha, generator)
    return mixed, y, y[permutation], lam


def _batch_key(ids: np.ndarray) -> int:
    """A number fixed by the rows of a batch (not by when or where it was cut): seeds its mixing."""
    return int(np.bitwise_xor.reduce(np.asarray(ids, dtype=np.int64).view(np.uint64)) % np.uint64(2**63))


class EpochStage:
    """Ray Data callable: keeps the rows this epoch opens and mixes them (adds ``label_b``, ``mix_lam``)."""

    def __init__(self, plan, rank: int, mix: MixSettings | None):
        self.rank, self.mix = rank, mix
        self.epoch, self.open_ids = ray.get(plan.get.remote(rank))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.open_ids is not None:
            ids = np.asarray(batch["id"])
            pos = np.minimum(np.searchsorted(self.open_ids, ids), max(len(self.open_ids) - 1, 0))
            keep = (self.open_ids[pos] == ids) if len(self.open_ids) else np.zeros(len(ids), bool)
            batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
        if self.mix is not None and self.mix.active:
            x, y = torch.as_tensor(np.array(batch["x"])), torch.as_tensor(np.asarray(batch["label"], np.int64))
            generator = mix_generator(self.mix.seed, self.rank, self.epoch, _batch_key(batch["id"]))
            if len(y):
                x, y, y_b, lam = mix_batch(self.mix.mixup_alpha, self.mix.cutmix_alpha, x, y, self.mix.num_classes,
                                           generator)
            else:
                y_b, lam = y, 1.0
            batch = {**batch, "x": x.numpy(), "label_b": y_b.numpy(), "mix_lam": np.full(len(y), lam, np.float32)}
        return batch


def with_teachers(ds, services: tuple[TeacherService, ...]):
    """``ds`` with one stage per teacher asking its service. The stage's tasks only wait on the replicas
    (a tenth of a CPU each); two per replica keep a replica's next batch queued while it computes."""
    for service in services:
        ds = ds.map_batches(ask_teacher, fn_kwargs={"service": service}, batch_format="numpy",
                            batch_size=service.spec.batch_size, num_cpus=ASK_CPUS,
                            compute=ray.data.TaskPoolStrategy(size=2 * len(service.replicas)))
    return ds


def _rows_of_rank(batch: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    mask = rank_of(batch["id"], world) == rank
    return {k: v[mask] for k, v in batch.items()}


def rows_of_rank(ds, rank: int, world: int):
    """The rows whose id hashes to ``rank``: disjoint per rank, fixed across restarts."""
    return ds if world == 1 else ds.map_batches(_rows_of_rank, fn_kwargs={"rank": rank, "world": world},
                                                batch_format="numpy")


def rank_stream(ds, rank: int, world: int, plan=None, mix: MixSettings | None = None,
                teachers: tuple[TeacherService, ...] = ()):
    """One rank's training stream: its rows, the epoch stage (when a plan is given), the teachers."""
    ds = rows_of_rank(ds, rank, world)
    if plan is not None:
        ds = ds.map_batches(EpochStage, fn_constructor_args=(plan, rank, mix), batch_format="numpy",
                            batch_size=MIX_BATCH_ROWS, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1)
    return with_teachers(ds, teachers)


