"""Distillation losses as pure functions on tensors.

Shape conventions: logits are ``[B, C]`` (one prediction per row) or ``[B, S, V]`` (one per
token); a ``mask`` is ``[B, S]`` (bool or 0/1 float) for the token case, or ``[B]`` for rows.
Every divergence is computed per position and then *batch-meaned*: averaged over rows, or over
unmasked tokens. A fully masked batch gives exactly 0 (not NaN) and a zero gradient.

Teacher inputs are detached inside every function, so gradients only ever reach the student
(and learned projectors). Everything is computed in at least float32: fp16/bf16 inputs are
upcast, float64 inputs stay float64.

It is long because it is a library: a dozen independent, documented losses sharing these
conventions and private helpers; each is tested against a float64 reference in tests/test_losses.py.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "KD_KINDS",
    "kd_divergence",
    "kd_divergence_to_probs",
    "teacher_topk",
    "topk_kd_divergence",
    "uld_divergence",
    "topk_label_logprobs",
    "dense_from_topk",
    "focal_kd",
    "dkd",
    "dkd_parts",
    "HintProjector",
    "hint_loss",
    "attention_map",
    "attention_transfer",
    "label_smoothing_ce",
    "mixup",
    "cutmix",
]

KD_KINDS = ("forward_kl", "reverse_kl", "js", "tvd", "skew_kl", "skew_reverse_kl", "mse_logits", "soft_ce")

# Floor for log(prob) of probability targets: exact zeros (an empty top-k tail, a teacher that
# rules a class out) would otherwise give 0 * -inf = NaN, and reverse KL an infinite penalty.
_PROB_FLOOR = 1e-12
_LOG_PROB_FLOOR = math.log(_PROB_FLOOR)


# --------------------------------------------------------------------------------------------
# helpers


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32, float64 if any input is: the dtype every loss, blend and measure computes in."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_kind(kind: str) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD kind {kind!r}; valid kinds: {', '.join(KD_KINDS)}")


def _check_same_shape(student_logits: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student_logits.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and {what} {tuple(teacher.shape)} differ")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _masked_mean(per_position: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``per_position`` over the positions where ``mask`` is nonzero (all if None)."""
    if mask is None:
        return per_position.mean()
    if mask.shape != per_position.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(per_position.shape)}")
    keep = mask.to(per_position.device) != 0
    # where (not multiply) so that inf/NaN at masked positions cannot leak into the sum.
    total = torch.where(keep, per_position, torch.zeros((), dtype=per_position.dtype, device=per_position.device))
    return total.sum() / keep.sum().clamp_min(1)


def _reduce(per_position: torch.Tensor, mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """``mean`` over the kept positions (see :func:`_masked_mean`), or ``none``: per position, 0 where masked."""
    if reduction == "mean":
        return _masked_mean(per_position, mask)
    if reduction != "none":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if mask is None:
        return per_position
    return torch.where(mask.to(per_position.device) != 0, per_position, torch.zeros_like(per_position))


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _divergence_per_position(
    student_logq: torch.Tensor,
    teacher_p: torch.Tensor,
    teacher_logp: torch.Tensor,
    kind: str,
    skew_alpha: float,
) -> torch.Tensor:
    """Divergence over the last dim between student q and teacher p, without the T^2 factor.

    ``teacher_p`` is passed separately from ``teacher_logp`` so an exact zero probability stays
    exactly zero while its log is floored to a finite number. Shapes ``[..., C]`` -> ``[...]``.
    """
    student_q = student_logq.exp()
    if kind == "forward_kl":
        return (teacher_p * (teacher_logp - student_logq)).sum(-1)
    if kind == "reverse_kl":
        return (student_q * (student_logq - teacher_logp)).sum(-1)
    if kind == "js":
        log_m = torch.logaddexp(teacher_logp, student_logq) - math.log(2.0)
        return 0.5 * (teacher_p * (teacher_logp - log_m)).sum(-1) + 0.5 * (student_q * (student_logq - log_m)).sum(-1)
    if kind == "tvd":
        return 0.5 * (teacher_p - student_q).abs().sum(-1)
    if kind == "skew_kl":
        log_mix = _log_mixture(teacher_logp, student_logq, skew_alpha)
        return (teacher_p * (teacher_logp - log_mix)).sum(-1)
    if kind == "skew_reverse_kl":
        log_mix = _log_mixture(student_logq, teacher_logp, skew_alpha)
        return (student_q * (student_logq - log_mix)).sum(-1)
    if kind == "soft_ce":
        return -(teacher_p * student_logq).sum(-1)
    raise ValueError(f"KD kind {kind!r} is not a divergence between distributions")


def _check_prob_kind(kind: str, skew_alpha: float, where: str) -> None:
    _check_kind(kind)
    if kind == "mse_logits":
        raise ValueError(
            f"{where} does not support 'mse_logits': it compares raw logits and the teacher is only "
            "known as probabilities here (use kd_divergence with teacher logits)"
        )
    if not 0.0 <= skew_alpha <= 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1], got {skew_alpha}")


# --------------------------------------------------------------------------------------------
# logit / probability distillation


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    *,
    skew_alpha: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Batch-mean divergence between tempered student and teacher distributions, times ``T**2``.

    Args:
        student_logits: ``[B, C]`` or ``[B, S, V]``.
        teacher_logits: same shape as ``student_logits``; detached inside.
        kind: one of ``KD_KINDS``. With p = softmax(teacher/T), q = softmax(student/T):
            ``forward_kl`` KL(p||q); ``reverse_kl`` KL(q||p); ``js`` Jensen-Shannon;
            ``tvd`` 0.5 * sum |p - q|; ``skew_kl`` KL(p || a p + (1-a) q);
            ``skew_reverse_kl`` KL(q || a q + (1-a) p) (DistiLLM, a = ``skew_alpha``);
            ``mse_logits`` mean over classes of (s/T - t/T)^2; ``soft_ce`` -sum p log q, the
            cross-entropy, which equals forward_kl + H(p) and so is *not* 0 when q == p.
        temperature: T > 0, applied to both sides; the result is scaled by T**2 (Hinton et al.)
            so gradient magnitudes are comparable across temperatures.
        mask: ``[B, S]`` (or ``[B]`` for ``[B, C]`` inputs), bool or 0/1; zeros are excluded.
        reduction: ``mean`` (a scalar) or ``none`` (per position ``[B]`` / ``[B, S]``, 0 where masked).

    Returns:
        Scalar tensor (float32, or float64 for float64 inputs), or per position.
    """
    _check_kind(kind)
    _check_temperature(temperature)
    _check_same_shape(student_logits, teacher_logits, "teacher logits")
    dtype = compute_dtype(student_logits, teacher_logits)
    student = student_logits.to(dtype) / temperature
    teacher = teacher_logits.detach().to(dtype) / temperature
    if kind == "mse_logits":
        per_position = (student - teacher).pow(2).mean(-1)
    else:
        if not 0.0 <= skew_alpha <= 1.0:
            raise ValueError(f"skew_alpha must be in [0, 1], got {skew_alpha}")
        teacher_logp = F.log_softmax(teacher, dim=-1)
        per_position = _divergence_per_position(
            F.log_softmax(student, dim=-1), teacher_logp.exp(), teacher_logp, kind, skew_alpha
        )
    return _reduce(per_position * temperature**2, mask, reduction)


def kd_divergence_to_probs(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    *,
    skew_alpha: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Like :func:`kd_divergence`, but the teacher is an already-tempered distribution.

    Use it for targets built elsewhere, e.g. a weighted mixture of several teachers'
    softmax(z/T). ``kd_divergence(s, t, k, T)`` equals
    ``kd_divergence_to_probs(s, softmax(t / T), k, T)`` (same per-position core).

    Args:
        student_logits: ``[B, C]`` or ``[B, S, V]``; divided by ``temperature``.
        teacher_probs: same shape, rows summing to 1, *not* re-tempered here; detached inside.
            Its log is floored at log(1e-12) so zero-probability classes stay finite.
        kind: any of ``KD_KINDS`` except ``mse_logits`` (no teacher logits to compare).
        temperature, mask, skew_alpha, reduction: as in :func:`kd_divergence`.

    Returns:
        Scalar tensor, or per position.
    """
    _check_prob_kind(kind, skew_alpha, "kd_divergence_to_probs")
    _check_temperature(temperature)
    _check_same_shape(student_logits, teacher_probs, "teacher probs")
    dtype = compute_dtype(student_logits, teacher_probs)
    teacher_p = teacher_probs.detach().to(dtype)
    teacher_logp = teacher_p.clamp_min(_PROB_FLOOR).log()
    student_logq = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    per_position = _divergence_per_position(student_logq, teacher_p, teacher_logp, kind, skew_alpha)
    return _reduce(per_position * temperature**2, mask, reduction)


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely classes, for compact soft-target storage.

    Args:
        teacher_logits: ``[..., V]``.
        k: 1 <= k <= V.

    Returns:
        ``(logprobs, indices)``: float32 log-probabilities at temperature 1 of the *full*
        distribution, ``[..., k]`` in descending order, and int64 class indices ``[..., k]``.
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] for {vocab} classes, got {k}")
    logprobs = F.log_softmax(teacher_logits.detach().to(compute_dtype(teacher_logits)), dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return values.to(torch.float32), indices


def dense_from_topk(topk_logprobs: torch.Tensor, topk_indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full log-probabilities rebuilt from a top-k teacher, for blending teachers into one target.

    The k stored classes keep their log-probs; the tail mass ``1 - sum(exp(logp))`` is spread
    evenly over the other ``V - k`` classes (the same assumption ``topk_kd_divergence`` makes), so
    ``softmax(dense / T)`` is the tempered teacher under that assumption. Exact when k = V.

    Args:
        topk_logprobs: ``[..., k]`` float log-probabilities (temperature 1).
        topk_indices: ``[..., k]`` int class indices.
        num_classes: V.

    Returns:
        ``[..., V]`` float32 log-probabilities.
    """
    logp = topk_logprobs.float()
    k = logp.shape[-1]
    if k == num_classes:
        return torch.empty(*logp.shape[:-1], num_classes).scatter_(-1, topk_indices.long(), logp)
    tail = (1.0 - logp.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / (num_classes - k)
    dense = tail.log().expand(*logp.shape[:-1], num_classes).clone()
    return dense.scatter_(-1, topk_indices.long(), logp)


def topk_label_logprobs(topk_logprobs: torch.Tensor, topk_indices: torch.Tensor, labels: torch.Tensor,
                        num_classes: int) -> torch.Tensor:
    """A top-k teacher's log-probability of each label: the stored value when the label is among its
    top k, else its tail mass spread evenly over the ``num_classes - k`` other classes (the same
    assumption as :func:`dense_from_topk`, without building the dense ``[..., C]`` tensor).

    Args:
        topk_logprobs, topk_indices: ``[..., k]``.
        labels: ``[...]`` class ids; negative ids (``ignore_index``) give 0 (mask them out).

    Returns:
        ``[...]`` float32 log-probabilities.
    """
    logp = topk_logprobs.float()
    k = logp.shape[-1]
    safe = labels.clamp_min(0).long().unsqueeze(-1)
    hit = topk_indices.long() == safe
    in_topk = (logp.masked_fill(~hit, float("-inf"))).logsumexp(-1)
    if k == num_classes:
        out = in_topk
    else:
        tail = (1.0 - logp.exp().sum(-1)).clamp_min(1e-12) / (num_classes - k)
        out = torch.where(hit.any(-1), in_topk, tail.log())
    return out.masked_fill(labels < 0, 0.0)


def topk_kd_divergence(
    student_logits: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    *,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Divergence to a teacher known only by its top-k log-probs, over k + 1 buckets, times T**2.

    Both distributions are collapsed to the k stored classes plus one *tail* bucket holding the
    rest of the mass. Student: its tempered probabilities at the k indices, plus its exact
    remaining mass. Teacher: softmax(z/T)_i is proportional to p_i ** (1/T), so the stored
    log-probs give tempered log-weights ``logp_i / T``; the tail mass ``1 - sum(exp(logp))`` is
    assumed spread evenly over the V - k tail classes, giving log-weight
    ``log(V-k) + (log(tail_mass) - log(V-k)) / T``; the k + 1 weights are then renormalised.
    Exact at T = 1, and for any T when k = V (then there is no tail bucket).

    Args:
        student_logits: ``[B, C]`` or ``[B, S, V]``.
        topk_logprobs: ``[..., k]`` teacher log-probs at T = 1 (fp16 accepted); detached inside.
        topk_indices: ``[..., k]`` distinct class indices per position (int32 accepted).
        kind: any of ``KD_KINDS`` except ``mse_logits``.
        temperature, mask, skew_alpha: as in :func:`kd_divergence`.

    Returns:
        Scalar tensor.
    """
    _check_prob_kind(kind, skew_alpha, "topk_kd_divergence")
    _check_temperature(temperature)
    vocab, k = student_logits.shape[-1], topk_indices.shape[-1]
    if topk_logprobs.shape != topk_indices.shape or topk_indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k log-probs {tuple(topk_logprobs.shape)} and indices {tuple(topk_indices.shape)} must both be "
            f"student logits {tuple(student_logits.shape)} with the last dim replaced by k"
        )
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] for {vocab} classes, got {k}")

    dtype = compute_dtype(student_logits)
    indices = topk_indices.to(device=student_logits.device, dtype=torch.long)
    teacher_top = topk_logprobs.detach().to(device=student_logits.device, dtype=dtype)
    student_full = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    student_top = student_full.gather(-1, indices)
    teacher_weights = teacher_top / temperature

    num_tail = vocab - k
    if num_tail == 0:
        # No tail: its bucket would hold exactly zero mass on both sides and only add 0 * -inf.
        student_logq = student_top
    else:
        in_topk = torch.zeros_like(student_full, dtype=torch.bool).scatter(-1, indices, True)
        student_tail = student_full.masked_fill(in_topk, float("-inf")).logsumexp(-1, keepdim=True)
        student_logq = torch.cat([student_top, student_tail], dim=-1)
        # fp16 storage can make the stored mass exceed 1 slightly: the tail is then empty (-inf).
        tail_mass = (1.0 - teacher_top.exp().sum(-1, keepdim=True)).clamp_min(0.0)
        log_num_tail = math.log(num_tail)
        tail_weight = log_num_tail + (tail_mass.log() - log_num_tail) / temperature
        teacher_weights = torch.cat([teacher_weights, tail_weight], dim=-1)

    teacher_logp = F.log_softmax(teacher_weights, dim=-1)
    teacher_p = teacher_logp.exp()
    per_position = _divergence_per_position(
        student_logq, teacher_p, teacher_logp.clamp_min(_LOG_PROB_FLOOR), kind, skew_alpha
    )
    return _masked_mean(per_position * temperature**2, mask)


def uld_divergence(
    student_logits: torch.Tensor,
    teacher_sorted_logprobs: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    *,
    teacher_vocab: Optional[int] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al., 2024): L1 distance between the *sorted* probability
    vectors of teacher and student, times T**2. It needs no vocabulary mapping, so it is the fallback
    for a teacher whose tokenizer differs from the student's (only the shape of its belief transfers,
    not which token it believes in).

    Both sides keep their k largest probabilities (the teacher's are all that is stored); the shorter
    is padded with zeros, as the paper pads the smaller vocabulary. The teacher is tempered the way
    :func:`topk_kd_divergence` tempers a top-k (its tail mass spread evenly over ``teacher_vocab - k``
    classes, exact at T = 1 or when k = ``teacher_vocab``); the student is ``softmax(z / T)``.

    Args:
        student_logits: ``[..., V]``.
        teacher_sorted_logprobs: ``[..., k]`` teacher log-probs at T = 1, descending (fp16 accepted);
            detached inside.
        temperature: T > 0.
        mask: ``[...]`` positions to keep (bool or 0/1).
        teacher_vocab: the teacher's vocabulary size (tail tempering); None = no tail (k is all of it).
        reduction: ``mean`` over kept positions, or ``none`` (per position, 0 where masked).

    Returns:
        Scalar tensor, or per position.
    """
    _check_temperature(temperature)
    k = teacher_sorted_logprobs.shape[-1]
    if teacher_sorted_logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher sorted log-probs {tuple(teacher_sorted_logprobs.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ before the last dim")
    dtype = compute_dtype(student_logits)
    teacher = teacher_sorted_logprobs.detach().to(device=student_logits.device, dtype=dtype)
    weights = teacher / temperature
    num_tail = 0 if teacher_vocab is None else teacher_vocab - k
    if num_tail < 0:
        raise ValueError(f"k={k} exceeds teacher_vocab={teacher_vocab}")
    if num_tail:
        tail_mass = (1.0 - teacher.exp().sum(-1, keepdim=True)).clamp_min(0.0)
        tail = math.log(num_tail) + (tail_mass.log() - math.log(num_tail)) / temperature
        teacher_p = F.softmax(torch.cat([weights, tail], dim=-1), dim=-1)[..., :k]
    else:
        teacher_p = F.softmax(weights, dim=-1)
    student_p = F.softmax(student_logits.to(dtype) / temperature, dim=-1)
    student_p = student_p.topk(min(k, student_p.shape[-1]), dim=-1).values
    width = max(k, student_p.shape[-1])
    per_position = (F.pad(teacher_p, (0, width - k)) - F.pad(student_p, (0, width - student_p.shape[-1]))).abs().sum(-1)
    return _reduce(per_position * temperature**2, mask, reduction)


def focal_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    gamma: float = 2.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL with each position weighted by ``(1 - exp(-KL_pos)) ** gamma``, times T**2.

    KL_pos is the per-position KL(p || q) at temperature T (before the T**2 factor), so the
    weight lies in [0, 1): positions the student already matches are down-weighted, as in focal
    loss. The weight is *not* detached, so its gradient also pushes towards agreement.
    ``gamma = 0`` gives plain forward KL.

    Args:
        student_logits: ``[B, C]`` or ``[B, S, V]``.
        teacher_logits: same shape; detached inside.
        temperature: T > 0.
        gamma: focusing exponent >= 0.
        mask: ``[B, S]`` (or ``[B]``), bool or 0/1.

    Returns:
        Scalar tensor: batch-mean of ``weight * KL_pos * T**2``.
    """
    _check_temperature(temperature)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    _check_same_shape(student_logits, teacher_logits, "teacher logits")
    dtype = compute_dtype(student_logits, teacher_logits)
    teacher_logp = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    student_logq = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    kl = _divergence_per_position(student_logq, teacher_logp.exp(), teacher_logp, "forward_kl", 0.0)
    # Clamp above 0, not at 0: rounding can make KL slightly negative (a negative base breaks
    # pow), and for gamma < 1 the derivative of x**gamma at exactly 0 is inf, giving 0 * inf = NaN.
    weight = (-torch.expm1(-kl)).clamp_min(torch.finfo(kl.dtype).tiny).pow(gamma)
    return _reduce(weight * kl * temperature**2, mask, reduction)


def dkd_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD terms of Decoupled KD (Zhao et al., CVPR 2022), each times T**2.

    TCKD is the KL between the binary (target, non-target) distributions; NCKD is the KL between
    the distributions over the non-target classes only (the target is masked out exactly).
    They decompose the classic loss: ``TCKD + (1 - p_t) * NCKD == KL(p || q) * T**2`` per sample,
    where p_t is the teacher's tempered probability of the target class.

    Args:
        student_logits: ``[B, C]``, C >= 2.
        teacher_logits: ``[B, C]``; detached inside.
        labels: ``[B]`` integer class indices.
        temperature: T > 0.

    Returns:
        ``(tckd, nckd)``, each ``[B]``.
    """
    _check_temperature(temperature)
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"dkd expects [B, C] logits of equal shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"dkd needs at least 2 classes, got {num_classes}")
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B] for logits {tuple(student_logits.shape)}")

    dtype = compute_dtype(student_logits, teacher_logits)
    student = student_logits.to(dtype) / temperature
    teacher = teacher_logits.detach().to(dtype) / temperature
    target = labels.to(device=student.device, dtype=torch.long).unsqueeze(-1)
    is_target = torch.zeros_like(student, dtype=torch.bool).scatter(-1, target, True)

    def binary_logprobs(scaled_logits: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(scaled_logits, dim=-1)
        # logsumexp of the rest rather than log(1 - p_t): stays accurate when p_t is near 1.
        non_target = logp.masked_fill(is_target, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([logp.gather(-1, target), non_target], dim=-1)

    def non_target_logprobs(scaled_logits: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(scaled_logits.masked_fill(is_target, float("-inf")), dim=-1)
        # 0 instead of -inf at the target, so 0 * (-inf - -inf) cannot produce NaN.
        return logp.masked_fill(is_target, 0.0)

    teacher_bin = binary_logprobs(teacher)
    tckd = _divergence_per_position(binary_logprobs(student), teacher_bin.exp(), teacher_bin, "forward_kl", 0.0)
    teacher_nt = non_target_logprobs(teacher)
    teacher_nt_p = teacher_nt.exp().masked_fill(is_target, 0.0)
    nckd = _divergence_per_position(non_target_logprobs(student), teacher_nt_p, teacher_nt, "forward_kl", 0.0)
    return tckd * temperature**2, nckd * temperature**2


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Decoupled KD: batch-mean of ``alpha * TCKD + beta * NCKD`` (see :func:`dkd_parts`).

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]``; detached inside.
        labels: ``[B]`` integer class indices.
        alpha, beta: weights of the target-class and non-target-class terms.
        temperature: T > 0.

    Returns:
        Scalar tensor.
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, temperature)
    return _reduce(alpha * tckd + beta * nckd, None, reduction)


# --------------------------------------------------------------------------------------------
# feature distillation


class HintProjector(nn.Module):
    """Learned linear map from the student's feature width to the teacher's (FitNets regressor).

    ``forward``: ``[..., student_dim]`` -> ``[..., teacher_dim]``.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_features: torch.Tensor) -> torch.Tensor:
        return self.linear(student_features)


def hint_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    projector: Optional[nn.Module] = None,
    kind: str = "mse",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Feature-matching (hint) loss between projected student features and teacher features.

    Args:
        student_features: ``[B, Ds]`` or ``[B, S, Ds]``.
        teacher_features: ``[B, Dt]`` or ``[B, S, Dt]``; detached inside.
        projector: applied to the student side (e.g. :class:`HintProjector`); may be None when
            Ds == Dt. Gradients reach the student features and the projector.
        kind: ``"mse"`` (mean over dims of the squared error) or ``"cosine"`` (1 - cosine
            similarity), per position.
        mask: ``[B, S]`` (or ``[B]``), bool or 0/1.

    Returns:
        Scalar tensor: batch-mean over (unmasked) positions.
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"unknown hint kind {kind!r}; valid kinds: mse, cosine")
    projected = projector(student_features) if projector is not None else student_features
    if projected.shape != teacher_features.shape:
        raise ValueError(
            f"student features {tuple(projected.shape)} (after projector) and teacher features "
            f"{tuple(teacher_features.shape)} differ; pass a HintProjector when widths differ"
        )
    dtype = compute_dtype(projected, teacher_features)
    student = projected.to(dtype)
    teacher = teacher_features.detach().to(dtype)
    if kind == "mse":
        per_position = (student - teacher).pow(2).mean(-1)
    else:
        per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    return _masked_mean(per_position, mask)


def attention_map(features: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (2017).

    Args:
        features: ``[B, C, ...]`` activations, e.g. CNN maps ``[B, C, H, W]`` or transformer
            attention probabilities ``[B, heads, S, S]`` (heads play the channel role).
        p: exponent applied to ``|x|`` before averaging over channels.

    Returns:
        ``[B, N]``, N = product of the dims after the channel dim, L2-normalised per sample.
    """
    if features.ndim < 3:
        raise ValueError(f"attention_map expects [B, C, ...] (at least one spatial dim), got {tuple(features.shape)}")
    energy = features.to(compute_dtype(features)).abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(energy, p=2, dim=1)


def attention_transfer(student_maps: torch.Tensor, teacher_maps: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Attention-transfer loss: batch-mean of ``||a_s - a_t||_2^2`` over attention maps.

    Args:
        student_maps: ``[B, Cs, ...]`` student activations (not yet reduced; see
            :func:`attention_map`).
        teacher_maps: ``[B, Ct, ...]`` teacher activations; channel counts may differ but the
            batch and spatial dims must match. Detached inside.
        p: exponent of :func:`attention_map`.

    Returns:
        Scalar tensor.
    """
    if (
        student_maps.ndim < 3
        or student_maps.ndim != teacher_maps.ndim
        or student_maps.shape[0] != teacher_maps.shape[0]
        or student_maps.shape[2:] != teacher_maps.shape[2:]
    ):
        raise ValueError(
            f"attention transfer needs matching batch and spatial sizes [B, C, ...]: student "
            f"{tuple(student_maps.shape)} vs teacher {tuple(teacher_maps.shape)}"
        )
    return attention_map_distance(attention_map(student_maps, p), attention_map(teacher_maps, p))


def attention_map_distance(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Batch-mean ``||a_s - a_t||_2^2`` between reduced attention maps ``[B, P]`` (teacher detached):
    the core of :func:`attention_transfer`, for teachers that send their map already reduced."""
    return (student_map - teacher_map.detach().to(student_map.dtype)).pow(2).sum(-1).mean()


# --------------------------------------------------------------------------------------------
# hard and mixed labels


def label_smoothing_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    smoothing: float = 0.0,
    mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy against ``(1 - eps) * one_hot + eps / C``, batch-meaned.

    Matches ``F.cross_entropy(logits, labels, label_smoothing=eps, ignore_index=...)`` on
    ``[B, C]``.

    Args:
        logits: ``[B, C]`` or ``[B, S, V]``.
        labels: ``[B]`` or ``[B, S]`` integer classes; ``ignore_index`` entries are skipped.
        smoothing: eps in [0, 1].
        mask: same shape as ``labels``, bool or 0/1; zeros are skipped.
        ignore_index: label value that marks a position to skip.

    Returns:
        Scalar tensor: mean over counted positions, 0 if none is counted.
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be logits {tuple(logits.shape)} without the class dim")
    logprobs = F.log_softmax(logits.to(compute_dtype(logits)), dim=-1)
    labels = labels.to(logprobs.device)
    keep = labels != ignore_index
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match labels {tuple(labels.shape)}")
        keep = keep & (mask.to(keep.device) != 0)
    # skipped positions may hold ignore_index, which gather cannot index with.
    safe_labels = labels.masked_fill(~keep, 0).long().unsqueeze(-1)
    nll = -logprobs.gather(-1, safe_labels).squeeze(-1)
    uniform_ce = -logprobs.mean(-1)
    return _masked_mean((1.0 - smoothing) * nll + smoothing * uniform_ce, keep)


def _sample_beta(alpha: float, generator: Optional[torch.Generator]) -> float:
    """One Beta(alpha, alpha) draw from numpy's sampler, seeded from ``generator`` (torch.distributions
    cannot take a generator; this keeps mixup/cutmix reproducible per generator without touching the
    global RNG); 1.0 when alpha <= 0."""
    if alpha <= 0:
        return 1.0
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _randperm(n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    source = generator.device if generator is not None else "cpu"
    return torch.randperm(n, generator=generator, device=source).to(device)


def _mixed_one_hot(labels: torch.Tensor, num_classes: int, permutation: torch.Tensor, lam: float) -> torch.Tensor:
    one_hot = F.one_hot(labels.long(), num_classes).to(torch.float32)
    return lam * one_hot + (1.0 - lam) * one_hot[permutation.to(one_hot.device)]


def mixup(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float = 0.2,
    generator: Optional[torch.Generator] = None,
    *,
    lam: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al., 2018): blend each sample with a randomly permuted partner.

    Random draws, in order, all from ``generator`` (the global RNG if None), so a seeded
    generator reproduces the result exactly: lam ~ Beta(alpha, alpha) (as X / (X + Y) with
    X, Y ~ Gamma(alpha), sampled by Marsaglia-Tsang since torch.distributions takes no
    generator; alpha <= 0 means lam = 1), then ``permutation = randperm(B)``.

    Args:
        inputs: ``[B, ...]`` floating-point batch.
        labels: ``[B]`` integer classes.
        num_classes: C, for the one-hot encoding.
        alpha: Beta concentration.
        generator: torch.Generator for reproducibility.
        lam: skip the Beta draw and use this mixing weight.

    Returns:
        ``(mixed, soft_labels, permutation, lam)``: ``mixed = lam * x + (1 - lam) * x[perm]``
        ``[B, ...]``; ``soft_labels = lam * onehot(y) + (1 - lam) * onehot(y[perm])`` float32
        ``[B, C]``; ``permutation`` int64 ``[B]``; ``lam`` a float. Apply the same
        ``(permutation, lam)`` to teacher targets to mix them identically.
    """
    if lam is None:
        lam = _sample_beta(alpha, generator)
    permutation = _randperm(inputs.shape[0], generator, inputs.device)
    mixed = lam * inputs + (1.0 - lam) * inputs[permutation]
    return mixed, _mixed_one_hot(labels, num_classes, permutation, lam), permutation, lam


def cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float = 1.0,
    generator: Optional[torch.Generator] = None,
    *,
    lam: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al., 2019): paste a random box from a permuted partner into each image.

    Draws, in order, from ``generator``: lam ~ Beta(alpha, alpha) (as in :func:`mixup`), the
    permutation, then the box centre (row, column). The box has side fractions
    ``sqrt(1 - lam)`` and is clipped at the borders, so lam is recomputed afterwards as
    1 - (actual box area) / (H * W), and the soft labels use that lam.

    Args:
        images: ``[B, C, H, W]``.
        labels: ``[B]`` integer classes.
        num_classes: C, for the one-hot encoding.
        alpha: Beta concentration.
        generator: torch.Generator for reproducibility.
        lam: skip the Beta draw and use this target mixing weight.

    Returns:
        ``(mixed, soft_labels, permutation, lam)`` as in :func:`mixup`.
    """
    if images.ndim != 4:
        raise ValueError(f"cutmix expects [B, C, H, W] images, got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if lam is None:
        lam = _sample_beta(alpha, generator)
    permutation = _randperm(images.shape[0], generator, images.device)
    cut_ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    device = generator.device if generator is not None else "cpu"
    centre_y = int(torch.randint(height, (), generator=generator, device=device))
    centre_x = int(torch.randint(width, (), generator=generator, device=device))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y - cut_h // 2 + cut_h, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x - cut_w // 2 + cut_w, width)

    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = images[permutation, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, _mixed_one_hot(labels, num_classes, permutation, lam), permutation, lam
