"""Long-tail distillation for classifiers, as pure tensor functions: per-class weights on the KD term,
hotter temperatures for rare classes, and logit adjustment of the hard-label loss.

Everything here starts from the train split's labeled rows per class, ``counts [C]``. The practice:

* ``class_weights``: each row's KD term weighed by its class's weight, ``inverse_frequency`` (1 / n_c)
  or ``effective_number`` ((1 - beta) / (1 - beta^n_c), Cui et al., "Class-Balanced Loss Based on
  Effective Number of Samples", CVPR 2019), normalised so that the weights average 1 over the train
  rows (see :func:`class_weights` for why not over the classes, as Cui et al. do).
* ``class_temperatures``: a multiplier of the KD temperature per class, 1 for the most frequent class
  and ``factor`` for the rarest, between them linear in log-frequency; a row's KD term is then taken at
  its own temperature (:func:`row_temperature_kd`), times that temperature squared.
* ``logit_adjusted_cross_entropy``: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021:
  cross-entropy on ``logits + tau * log prior`` while training; predictions use the raw logits.

A row's class (for its weight and its temperature, one rule for both, ``row_classes``) is its label
when it has one, else the blended teachers' top class. The label is ground truth, and the counts are
counts of labels; a teacher that leans to the head classes would class a tail row as a head row and
take from it exactly the weight the reweighting exists to give. Unlabeled and transfer rows have no
label: the blended teacher's top class is what their KD term teaches, so they are classed by it. A
MixUp/CutMix row is classed by the teacher too: the teachers answer the mixed input itself, either
label describes only part of it.

A class with no labeled train rows is treated as the rarest class that has some: its weight is the
largest weight, its temperature multiplier ``factor``, its prior that of the rarest class (an
unlabeled row the teachers put there still gets a finite weight, and the prior no ``-inf``).

Shapes: ``counts [C]``, student logits ``[B, C]``, teacher logits ``[K, B, C]``, blend weights ``[B, K]``,
labels ``[B]`` (-1 = unlabeled). No Ray; ``LongTail`` carries the per-class tensors a run's loss needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from distill_ray.config import CLASS_WEIGHT_KINDS
from distill_ray.kd.losses import _PROB_FLOOR, _check_prob_kind, _divergence_per_position, compute_dtype

__all__ = [
    "CLASS_WEIGHT_KINDS",
    "DEFAULT_BETA",
    "class_weights",
    "class_temperatures",
    "log_prior",
    "row_classes",
    "row_temperature_kd",
    "logit_adjusted_cross_entropy",
    "LongTail",
]

# Cui et al.'s largest beta, their best for softmax cross-entropy on long-tailed CIFAR-10.
DEFAULT_BETA = 0.9999


def _counts(counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``counts`` as float64 ``[C]``, checked: non-negative, at least one class with rows."""
    c = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    if c.numel() == 0 or bool((c < 0).any()) or not bool((c > 0).any()):
        raise ValueError(f"class counts must be >= 0 with some class > 0, got {c.tolist()}")
    return c


def class_weights(counts: Sequence[int] | torch.Tensor, kind: str, beta: float = DEFAULT_BETA) -> torch.Tensor:
    """Per-class weights of the KD term from the train split's labeled rows per class: ``[C] -> [C]`` (float64).

    ``none``: ones. ``inverse_frequency``: proportional to ``1 / n_c``. ``effective_number``: proportional
    to ``(1 - beta) / (1 - beta^n_c)``, the inverse of the class's effective number of samples (Cui et
    al. 2019; beta -> 1 approaches inverse frequency, beta = 0 gives equal weights).

    Normalised so that the weights average 1 over the train *rows*: ``sum_c n_c w_c = sum_c n_c``. The
    weighted KD term then keeps the plain one's scale on the train distribution, and ``loss.alpha`` its
    meaning. Cui et al. normalise over the *classes* (``sum_c w_c = C``), which under heavy imbalance
    makes the average row's weight small (0.16 for 10 classes at imbalance 100 with 1 / n_c) and so
    shrinks the KD term against the task term. Both keep the ratio between classes, which is what the
    reweighting is. A class with no rows gets the largest weight (it is treated as the rarest class).
    """
    if kind not in CLASS_WEIGHT_KINDS:
        raise ValueError(f"unknown class weight kind {kind!r}; choose one of: {', '.join(CLASS_WEIGHT_KINDS)}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = _counts(counts)
    if kind == "none":
        return torch.ones_like(n)
    present = n > 0
    safe = n.clamp_min(1.0)
    if kind == "inverse_frequency":
        raw = 1.0 / safe
    else:  # 1 - beta^n as -expm1(n log beta): exact for beta near 1
        raw = (1.0 - beta) / -torch.expm1(safe * math.log(beta)) if beta > 0 else torch.ones_like(n)
    raw = torch.where(present, raw, raw[present].max())
    return raw * n.sum() / (n * raw).sum()


def class_temperatures(counts: Sequence[int] | torch.Tensor, factor: float) -> torch.Tensor:
    """Per-class multipliers of the KD temperature, ``[C] -> [C]`` (float64): 1 for the most frequent
    class, ``factor`` for the rarest, linear in ``log n_c`` between them:
    ``1 + (factor - 1) * (log n_max - log n_c) / (log n_max - log n_min)``.

    ``factor`` 1 gives ones (plain KD); so does data whose classes are all equally frequent. A class
    with no rows gets ``factor``. A hotter target spreads a rare class's teacher probability over the
    other classes, so the student learns more of how the teacher relates it to them from its few rows.
    """
    if not factor >= 1.0:
        raise ValueError(f"factor must be >= 1, got {factor}")
    n = _counts(counts)
    present = n > 0
    log_n = n.clamp_min(1.0).log()
    high, low = log_n[present].max(), log_n[present].min()
    if factor == 1.0 or high == low:
        return torch.where(present, torch.ones_like(n), torch.full_like(n, factor))
    share = torch.where(present, (high - log_n) / (high - low), torch.ones_like(n))
    return 1.0 + (factor - 1.0) * share


def log_prior(counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """log of each class's share of the labeled train rows, ``[C] -> [C]`` (float64); a class with no
    rows counts as many as the rarest class that has some (a finite log prior)."""
    n = _counts(counts)
    n = torch.where(n > 0, n, n[n > 0].min())
    return n.log() - n.sum().log()


def row_classes(labels: Optional[torch.Tensor], target_probs: torch.Tensor) -> torch.Tensor:
    """Each row's class for its weight and temperature, ``[B]`` (long): the label where it is >= 0,
    else the top class of the blended teachers' distribution ``target_probs [B, C]``; ``labels`` None
    classes every row by the teachers (MixUp/CutMix rows)."""
    predicted = target_probs.argmax(-1)
    if labels is None:
        return predicted
    labels = labels.to(predicted.device).long()
    return torch.where(labels >= 0, labels, predicted)


def row_temperature_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                       temperatures: torch.Tensor, kind: str = "forward_kl", skew_alpha: float = 0.1) -> torch.Tensor:
    """KD with a temperature per row: ``D(p_i, q_i) * T_i**2`` for each row i, ``[B]``, where
    ``p_i = sum_k w_ik softmax(z_ki / T_i)`` is the teachers' mixture at the row's own temperature and
    ``q_i = softmax(s_i / T_i)``.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[K, B, C]``; detached inside.
        weights: blend weights ``[B, K]`` on the simplex; detached inside.
        temperatures: ``[B]``, each > 0; detached inside (no gradient flows to them).
        kind, skew_alpha: as :func:`distill_ray.kd.losses.kd_divergence_to_probs` (any ``KD_KINDS`` but
            ``mse_logits``), whose per-row values this equals when every row has the same temperature.

    Returns:
        ``[B]``, in float32 or float64 (for float64 inputs).
    """
    _check_prob_kind(kind, skew_alpha, "row_temperature_kd")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [B, C], got {tuple(student_logits.shape)}")
    num_rows, num_classes = student_logits.shape
    if teacher_logits.dim() != 3 or teacher_logits.shape[1:] != (num_rows, num_classes):
        raise ValueError(f"teacher_logits must be [K, {num_rows}, {num_classes}], got {tuple(teacher_logits.shape)}")
    if weights.shape != (num_rows, teacher_logits.shape[0]):
        raise ValueError(f"weights must be [{num_rows}, {teacher_logits.shape[0]}], got {tuple(weights.shape)}")
    if temperatures.shape != (num_rows,) or not bool((temperatures > 0).all()):
        raise ValueError(f"temperatures must be [{num_rows}] and > 0, got {temperatures.tolist()}")
    dtype = compute_dtype(student_logits, teacher_logits, weights)
    t = temperatures.detach().to(device=student_logits.device, dtype=dtype)
    teacher_p = torch.einsum("bk,kbc->bc", weights.detach().to(dtype),
                             torch.softmax(teacher_logits.detach().to(dtype) / t[None, :, None], dim=-1))
    teacher_logp = teacher_p.clamp_min(_PROB_FLOOR).log()
    student_logq = F.log_softmax(student_logits.to(dtype) / t[:, None], dim=-1)
    return _divergence_per_position(student_logq, teacher_p, teacher_logp, kind, skew_alpha) * t**2


def logit_adjusted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, tau: float,
                                 label_smoothing: float = 0.0, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy of ``logits + tau * log_prior`` (Menon et al. 2021's logit-adjusted loss), per row
    ``[B]`` (``reduction="none"``) or its mean.

    ``logits [B, C]``, ``labels [B]`` class indices, ``log_prior [C]`` (:func:`log_prior`), ``tau >= 0``.
    Adding the log prior while training makes a frequent class's logit carry its prior, so the raw
    logits the model predicts with leave it out: predictions move towards the rare classes. ``tau`` 0
    is ``F.cross_entropy`` on the logits exactly (the prior is not added)."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if tau > 0:
        if log_prior.shape != logits.shape[-1:]:
            raise ValueError(f"log_prior must be [{logits.shape[-1]}], got {tuple(log_prior.shape)}")
        logits = logits + tau * log_prior.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing)


@dataclass(frozen=True, eq=False)
class LongTail:
    """A run's long-tail terms, built once from the train split's class counts (``from_counts``):
    ``weights [C]`` of the KD term (None: every row weighs 1), ``temperatures [C]`` multiplying the
    KD temperature (None: the one temperature), and ``log_prior [C]`` with ``tau`` for the task loss
    (tau 0: plain cross-entropy). float32 tensors; ``to(device)`` moves them."""

    weights: Optional[torch.Tensor]
    temperatures: Optional[torch.Tensor]
    log_prior: torch.Tensor
    tau: float

    @classmethod
    def from_counts(cls, counts: Sequence[int], class_weights_kind: str = "none", class_temperature: float = 1.0,
                    logit_adjustment: float = 0.0, beta: float = DEFAULT_BETA) -> Optional["LongTail"]:
        """The terms ``loss.class_weights``, ``loss.class_temperature`` and ``loss.logit_adjustment`` ask
        for, from labeled train rows per class; None when all three are off (the plain loss, untouched)."""
        if class_weights_kind == "none" and class_temperature == 1.0 and logit_adjustment == 0.0:
            return None
        weights = class_weights(counts, class_weights_kind, beta).float() if class_weights_kind != "none" else None
        temperatures = class_temperatures(counts, class_temperature).float() if class_temperature != 1.0 else None
        return cls(weights, temperatures, log_prior(counts).float(), float(logit_adjustment))

    @property
    def shapes_kd(self) -> bool:
        """Whether the KD term changes (class weights or per-class temperatures)."""
        return self.weights is not None or self.temperatures is not None

    def to(self, device) -> "LongTail":
        def moved(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)

        return LongTail(moved(self.weights), moved(self.temperatures), self.log_prior.to(device), self.tau)
