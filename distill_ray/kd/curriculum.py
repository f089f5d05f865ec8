"""Curriculum for distillation (POCL-style): how hard each sample is, which samples are open, and
how temperature/alpha move over training.

Difficulty convention: larger = harder. Measurers are pure functions returning a float tensor
``[N]``; several are fused by reciprocal rank (:func:`reciprocal_rank_fusion`).

Everything here is a pure function of ``(step, epoch, stage, seed, rank)`` and its inputs, so Ray
Tune can search the knobs, every DDP worker computes identical boundaries without talking to the
others, and a checkpoint only needs the counters to restore the curriculum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from distill_ray.config import SCHEDULE_KINDS, SCHEDULER_KINDS, STAGE_UNITS
from distill_ray.kd.losses import compute_dtype

__all__ = [
    "MEASURERS",
    "SCHEDULE_KINDS",
    "SCHEDULER_KINDS",
    "DIFFICULTY_SCHEDULERS",
    "ensemble_entropy",
    "teacher_disagreement",
    "teacher_ce",
    "student_loss",
    "sequence_length",
    "measurer",
    "reciprocal_rank_fusion",
    "reference_rouge_loss",
    "difficulty_order",
    "difficulty_buckets",
    "schedule_value",
    "LinearRamp",
    "MultiStage",
    "ConfidenceSampling",
    "SCHEDULERS",
    "make_scheduler",
    "open_subset",
    "shard_for_rank",
    "sample_for_rank",
]

# The schedulers that open the easiest rows first: the only ones a difficulty measure decides anything
# for (none opens every row; confidence ranks by the student's own confidence, live).
DIFFICULTY_SCHEDULERS = ("linear_ramp", "multi_stage")

# Slack for float boundaries: 0.3 * 10 is 3.0000000000000004 and 3 / 0.1 is 29.999999999999996;
# without it a ceil/floor would open one sample too many or change stage one step late.
_BOUNDARY_EPS = 1e-9


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def _teacher_log_probs(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[K, N, C]`` logits -> log-softmax ``[K, N, C]`` in at least float32, detached."""
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [K, N, C], got shape {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = teacher_logits.detach().to(compute_dtype(teacher_logits))
    return torch.log_softmax(logits / temperature, dim=-1)


def _log_mean_probs(log_p: torch.Tensor) -> torch.Tensor:
    """log of the mean teacher distribution, ``[K, N, C] -> [N, C]``, in log space."""
    return torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy over the last dim from log-probabilities (finite, so 0 * log 0 cannot arise)."""
    return -(log_p.exp() * log_p).sum(-1)


# --------------------------------------------------------------------------------------------
# difficulty measurers (larger = harder)


def ensemble_entropy(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the mean teacher distribution: ``[K, N, C] -> [N]``. High where the teachers,
    together, are unsure."""
    return _entropy(_log_mean_probs(_teacher_log_probs(teacher_logits, temperature)))


def teacher_disagreement(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence among the teachers: ``H(mean_k p_k) - mean_k H(p_k)``,
    ``[K, N, C] -> [N]``. Zero when all teachers agree, however unsure they are."""
    log_p = _teacher_log_probs(teacher_logits)
    divergence = _entropy(_log_mean_probs(log_p)) - _entropy(log_p).mean(0)
    return divergence.clamp_min(0.0)  # >= 0 by concavity of H; rounding can dip below


def teacher_ce(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the mean teacher distribution on the label: ``-log mean_k p_k[y]``,
    ``[K, N, C], [N] -> [N]``."""
    log_mean = _log_mean_probs(_teacher_log_probs(teacher_logits))
    labels = labels.reshape(-1).to(log_mean.device)
    num_classes = log_mean.shape[-1]
    if labels.shape[0] != log_mean.shape[0]:
        raise ValueError(f"labels must be [N] with N = {log_mean.shape[0]}, got shape {tuple(labels.shape)}")
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"teacher_ce needs labels in [0, {num_classes}) for every sample")
    return -log_mean.gather(-1, labels.view(-1, 1)).squeeze(-1)


def student_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the student, ``[N, C], [N] -> [N]`` (needs a student pass)."""
    logits = student_logits.detach().to(compute_dtype(student_logits))
    return F.cross_entropy(logits, labels.reshape(-1).to(logits.device), reduction="none")


def sequence_length(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of real tokens per sequence, ``[N, S] -> [N]`` float: longer counts as harder."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [N, S], got shape {tuple(attention_mask.shape)}")
    return (attention_mask != 0).sum(-1).to(torch.float32)


# --------------------------------------------------------------------------------------------
# ordering and fusion


def difficulty_order(difficulty: torch.Tensor) -> torch.Tensor:
    """Indices sorted easy -> hard, ``[N] -> LongTensor [N]``; ties keep index order (stable sort)."""
    if difficulty.dim() != 1:
        raise ValueError(f"difficulty must be [N], got shape {tuple(difficulty.shape)}")
    return torch.sort(difficulty, stable=True).indices


def _ranks_easy_to_hard(difficulty: torch.Tensor) -> torch.Tensor:
    """Rank of each sample, 1 = easiest, ``[N] -> LongTensor [N]``; ties by index."""
    order = difficulty_order(difficulty)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1, device=order.device)
    return ranks


def _average_ranks(difficulty: torch.Tensor) -> torch.Tensor:
    """Rank of each sample, 1 = easiest, ``[N] -> float64 [N]``; tied values share the mean of the
    ranks they span (fractional ranking: ``[5, 7, 7, 9] -> [1, 2.5, 2.5, 4]``), so a score depends on
    values only, never on row order."""
    ordered, order = torch.sort(difficulty.to(torch.float64), stable=True)
    _, counts = torch.unique_consecutive(ordered, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each tie group's last member
    mean_rank = last - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty(len(order), dtype=torch.float64, device=difficulty.device)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


TIES = ("first", "average")


def reciprocal_rank_fusion(*difficulties: torch.Tensor, k: int = 60, ties: str = "first") -> torch.Tensor:
    """Fuse several difficulty measures by reciprocal rank (Cormack et al., 2009; used by POCL).

    Each measure ranks the samples easy -> hard (rank 1 = easiest); a sample's easiness score is
    ``sum_m 1 / (k + rank_m)``. Returns ``-score`` (float64, ``[N]``) so that, as everywhere here,
    larger = harder. Ranks make measures on different scales comparable, and ``k`` damps the
    influence of any single measure's extreme ranks. Tied values are ranked by index
    (``ties="first"``) or share their mean rank (``ties="average"``, see :func:`_average_ranks`).
    """
    if not difficulties:
        raise ValueError("reciprocal_rank_fusion needs at least one difficulty measure")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    _check_choice("tie rule", ties, TIES)
    sizes = {tuple(d.shape) for d in difficulties}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise ValueError(f"every difficulty must be the same [N] shape, got {sorted(sizes)}")
    device = difficulties[0].device
    score = torch.zeros(difficulties[0].shape[0], dtype=torch.float64, device=device)
    for difficulty in difficulties:
        difficulty = difficulty.to(device)
        ranks = _average_ranks(difficulty) if ties == "average" else _ranks_easy_to_hard(difficulty).to(torch.float64)
        score += 1.0 / (k + ranks)
    return -score


def reference_rouge_loss(rouge_l: torch.Tensor, loss: torch.Tensor, k: int = 60) -> torch.Tensor:
    """POCL's difficulty (``[N], [N] -> float64 [N]``, larger = harder): reciprocal-rank fusion of a
    reference model's ROUGE-L against each sample's reference response (lower = harder) and its mean
    token loss on that response (higher = harder). Tied values share their mean rank, so the result
    depends on the values alone, not on row order. Ranks are over all ``N`` samples, so this runs on a
    whole split, not per batch (``lm/reference.py`` gathers the two measures first). NaN has no rank and
    is refused."""
    rouge_l, loss = (torch.as_tensor(v).detach().to(torch.float64) for v in (rouge_l, loss))
    for name, values in (("rouge_l", rouge_l), ("loss", loss)):
        if bool(torch.isnan(values).any()):
            raise ValueError(f"score {name!r} has NaN values; every sample needs a value to be ranked")
    return reciprocal_rank_fusion(-rouge_l, loss, k=k, ties="average")


MEASURERS = {
    "ensemble_entropy": ensemble_entropy,
    "teacher_disagreement": teacher_disagreement,
    "teacher_ce": teacher_ce,
    "student_loss": student_loss,
    "sequence_length": sequence_length,
    "reference_rouge_loss": reference_rouge_loss,
}


def measurer(name: str):
    """The measurer function called ``name`` (ValueError listing :data:`MEASURERS` otherwise)."""
    _check_choice("difficulty measurer", name, tuple(MEASURERS))
    return MEASURERS[name]


def difficulty_buckets(difficulty: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket id ``0..B-1`` per sample, easy -> hard by position in :func:`difficulty_order`,
    ``[N] -> LongTensor [N]``. Bucket sizes differ by at most 1."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    ranks0 = _ranks_easy_to_hard(difficulty) - 1
    return torch.div(ranks0 * num_buckets, max(len(ranks0), 1), rounding_mode="floor")


# --------------------------------------------------------------------------------------------
# value schedules (temperature, alpha)


def schedule_value(
    kind: str,
    step: int,
    total_steps: int,
    start: float,
    end: float,
    stage: int = 0,
    stage_values: Optional[Sequence[float]] = None,
) -> float:
    """A scheduled hyperparameter at ``step``:

    * ``constant``: ``start``.
    * ``linear``: ``start -> end`` over ``total_steps``, held at ``end`` afterwards.
    * ``cosine``: ``start + (end - start) * (1 - cos(pi t)) / 2`` with ``t = step / total_steps``
      clamped to [0, 1] (slow at both ends, the midpoint is the mean).
    * ``stage``: ``stage_values[stage]``, the last value for later stages.
    """
    _check_choice("schedule kind", kind, SCHEDULE_KINDS)
    if kind == "constant":
        return float(start)
    if kind == "stage":
        if not stage_values:
            raise ValueError("schedule kind 'stage' needs stage_values")
        return float(stage_values[min(max(int(stage), 0), len(stage_values) - 1)])
    progress = 1.0 if total_steps <= 0 else min(max(step / total_steps, 0.0), 1.0)
    if kind == "linear":
        return float(start + (end - start) * progress)
    return float(start + (end - start) * (1.0 - math.cos(math.pi * progress)) / 2.0)


# --------------------------------------------------------------------------------------------
# schedulers: which data is open when


@dataclass(frozen=True)
class LinearRamp:
    """Open the easiest ``start_fraction`` at epoch 0, growing linearly to all data at ``full_at_epoch``."""

    start_fraction: float = 0.3
    full_at_epoch: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 < self.start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in (0, 1], got {self.start_fraction}")
        if not self.full_at_epoch > 0:
            raise ValueError(f"full_at_epoch must be > 0, got {self.full_at_epoch}")

    def open_fraction(self, epoch: float) -> float:
        progress = min(max(epoch / self.full_at_epoch, 0.0), 1.0)
        return self.start_fraction + (1.0 - self.start_fraction) * progress


@dataclass(frozen=True)
class MultiStage:
    """POCL's multi-stage curriculum: ``num_stages`` difficulty buckets open one per stage, easy
    first, while the temperature (and optionally alpha) moves per stage.

    Stage ``s`` starts at progress ``s * stage_length``, with progress counted in ``unit``
    (``"epoch"`` or ``"step"``). POCL's default: 4 stages, T = 1, 1.33, 1.67, 2. ``alphas=None``
    keeps the caller's base alpha.
    """

    num_stages: int = 4
    stage_length: float = 1.0
    unit: str = "epoch"
    temperatures: tuple[float, ...] = (1.0, 1.33, 1.67, 2.0)
    alphas: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        _check_choice("stage unit", self.unit, STAGE_UNITS)
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if not self.stage_length > 0:
            raise ValueError(f"stage_length must be > 0, got {self.stage_length}")
        # Tuples, so the frozen dataclass stays hashable when built from YAML lists.
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        if self.alphas is not None:
            object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        for name, values in (("temperatures", self.temperatures), ("alphas", self.alphas)):
            if values is not None and len(values) != self.num_stages:
                raise ValueError(f"{name} has {len(values)} values but num_stages is {self.num_stages}")
        if any(not t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must all be > 0, got {self.temperatures}")

    def _clamp(self, stage: int) -> int:
        return min(max(int(stage), 0), self.num_stages - 1)

    def stage_at(self, progress: float) -> int:
        """Stage ``0..num_stages-1`` at ``progress`` (epochs or steps, per ``unit``)."""
        return self._clamp(math.floor(progress / self.stage_length + _BOUNDARY_EPS))

    def open_fraction(self, stage: int) -> float:
        """Fraction of the data open in ``stage``: buckets ``0..stage`` of ``num_stages``."""
        return (self._clamp(stage) + 1) / self.num_stages

    def temperature(self, stage: int) -> float:
        return self.temperatures[self._clamp(stage)]

    def alpha(self, stage: int, base_alpha: float) -> float:
        return float(base_alpha) if self.alphas is None else self.alphas[self._clamp(stage)]


@dataclass(frozen=True)
class ConfidenceSampling:
    """Self-paced sampling (Kumar, Packer & Koller, 2010, "Self-Paced Learning for Latent Variable
    Models"): samples the student already handles are drawn more often while it is weak.

    ``weight_i ∝ max(confidence_i, floor) ** (1 / tau)``, where confidence is the student's max
    softmax probability. As the student improves, more samples become confident and the
    distribution widens by itself. ``floor`` keeps every sample reachable; smaller ``tau`` favours
    confident samples more strongly, larger ``tau`` approaches uniform. Stateless: the loop
    recomputes confidences from the student each epoch, so there is nothing to checkpoint.
    """

    tau: float = 1.0
    floor: float = 0.05

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {self.floor}")

    def sampling_weights(self, student_confidence: torch.Tensor) -> torch.Tensor:
        """Sampling probabilities ``[N]`` (float64, sum 1), non-decreasing in confidence."""
        confidence = student_confidence.detach().to(torch.float64).reshape(-1)
        # In log space: floor ** (1 / tau) underflows for small tau.
        log_weight = confidence.clamp_min(self.floor).log() / self.tau
        return torch.softmax(log_weight, dim=0)


SCHEDULERS = {
    "none": None,
    "linear_ramp": LinearRamp,
    "multi_stage": MultiStage,
    "confidence": ConfidenceSampling,
}


def make_scheduler(kind: str, **options):
    """The scheduler object for ``kind`` built from ``options`` (None for ``"none"``)."""
    _check_choice("curriculum scheduler", kind, SCHEDULER_KINDS)
    scheduler_class = SCHEDULERS[kind]
    return None if scheduler_class is None else scheduler_class(**options)


# --------------------------------------------------------------------------------------------
# opening, sharding and sampling, identical on every rank


def open_subset(order: torch.Tensor, fraction: float) -> torch.Tensor:
    """The first ``ceil(fraction * N)`` indices of an easy -> hard ``order`` (at least 1, at most N)."""
    total = order.shape[0]
    if total == 0:
        raise ValueError("open_subset needs a non-empty order")
    count = min(max(math.ceil(fraction * total - _BOUNDARY_EPS), 1), total)
    return order[:count]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch): the same stream on every rank, a new one per epoch."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def shard_for_rank(
    indices: torch.Tensor, epoch: int, seed: int, rank: int, world_size: int, drop_last: bool = True
) -> torch.Tensor:
    """This rank's share of ``indices [M]`` for ``epoch``: a shuffle seeded by (seed, epoch), then
    every ``world_size``-th element from ``rank``.

    ``drop_last=True`` first truncates the shuffle to a multiple of ``world_size``: shards are
    disjoint, equally sized (``M // world_size``) and together are the truncated subset.
    ``drop_last=False`` instead pads by wrapping around the shuffle (like DistributedSampler), so
    nothing is dropped but up to ``world_size - 1`` samples appear twice. Equal sizes matter: DDP
    ranks must run the same number of steps.
    """
    _check_rank(rank, world_size)
    indices = indices.reshape(-1)
    total = indices.shape[0]
    permutation = torch.randperm(total, generator=_epoch_generator(seed, epoch)).to(indices.device)
    shuffled = indices[permutation]
    if drop_last:
        shuffled = shuffled[: total - total % world_size]
    elif total % world_size and total > 0:
        padded = math.ceil(total / world_size) * world_size
        shuffled = shuffled.repeat(math.ceil(padded / total))[:padded]
    return shuffled[rank::world_size]


def sample_for_rank(
    weights: torch.Tensor, num_samples: int, epoch: int, seed: int, rank: int, world_size: int
) -> torch.Tensor:
    """Confidence-based sampling: every rank draws the same global sample of ``num_samples`` indices
    (with replacement, ``P(i) ∝ weights[i]``, generator seeded by (seed, epoch)), truncated to a
    multiple of ``world_size``, and keeps every ``world_size``-th from ``rank``. ``LongTensor
    [num_samples // world_size]``."""
    _check_rank(rank, world_size)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    probabilities = weights.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if probabilities.numel() == 0 or bool((probabilities < 0).any()) or not probabilities.sum() > 0:
        raise ValueError("weights must be non-negative with a positive sum")
    if num_samples == 0:
        return torch.zeros(0, dtype=torch.long, device=weights.device)
    drawn = torch.multinomial(probabilities, num_samples, replacement=True, generator=_epoch_generator(seed, epoch))
    drawn = drawn[: num_samples - num_samples % world_size]
    return drawn[rank::world_size].to(weights.device)
