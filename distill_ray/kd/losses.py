"""Distillation losses as pure functions on tensors.

Shape conventions: logits are ``[B, C]`` (one prediction per row) or ``[B, S, V]`` (one per
token); a ``mask`` is ``[B, S]`` (bool or 0/1 float) for the token case, or ``[B]`` for rows.
Every divergence is computed per position and then *batch-meaned*: averaged over rows, or over
unmasked tokens. A fully masked batch gives exactly 0 (not NaN) and a zero gradient.

Teacher inputs are detached inside every function, so gradients only ever reach the student
(and learned projectors). Everything is computed in at least float32 (``compute_dtype``): fp16/bf16
inputs are upcast, float64 inputs stay float64. ``feature_losses`` (hints, attention transfer) and
``labels`` (label smoothing, MixUp, CutMix) follow the same conventions.

It is long because it is a library: the divergences between distributions (dense, top-k, across
tokenizers, focal, margin-weighted, decoupled) share these conventions and private helpers; each is
tested against a float64 reference in tests/test_losses.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from distill_ray.config import KD_KINDS

__all__ = [
    "KD_KINDS",
    "kd_divergence",
    "kd_divergence_to_probs",
    "teacher_topk",
    "topk_kd_divergence",
    "topk_generalized_jsd",
    "generalized_jsd",
    "uld_divergence",
    "topk_label_logprobs",
    "dense_from_topk",
    "focal_kd",
    "margin_kd",
    "dkd",
    "dkd_parts",
    "compute_dtype",
    "masked_mean",
]

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


def masked_mean(per_position: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``per_position`` over the positions where ``mask`` is nonzero (all if None)."""
    if mask is None:
        return per_position.mean()
    if mask.shape != per_position.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(per_position.shape)}")
    unmasked = mask.to(per_position.device) != 0
    # where (not multiply) so that inf/NaN at masked positions cannot leak into the sum.
    total = torch.where(unmasked, per_position, torch.zeros((), dtype=per_position.dtype, device=per_position.device))
    return total.sum() / unmasked.sum().clamp_min(1)


def _reduce(per_position: torch.Tensor, mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """``mean`` over the kept positions (see :func:`masked_mean`), or ``none``: per position, 0 where masked."""
    if reduction == "mean":
        return masked_mean(per_position, mask)
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
    _check_skew_alpha(skew_alpha)


def _check_skew_alpha(skew_alpha: float) -> None:
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
        _check_skew_alpha(skew_alpha)
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


def _topk_buckets(student_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(student log q, teacher log p) over the k stored classes plus one tail bucket, both tempered
    (see :func:`topk_kd_divergence`); shapes ``[..., k + 1]`` (``[..., k]`` when k is the vocabulary)."""
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
        return student_top, F.log_softmax(teacher_weights, dim=-1)
    in_topk = torch.zeros_like(student_full, dtype=torch.bool).scatter(-1, indices, True)
    student_tail = student_full.masked_fill(in_topk, float("-inf")).logsumexp(-1, keepdim=True)
    # fp16 storage can make the stored mass exceed 1 slightly: the tail is then empty (-inf).
    tail_mass = (1.0 - teacher_top.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    log_num_tail = math.log(num_tail)
    tail_weight = log_num_tail + (tail_mass.log() - log_num_tail) / temperature
    return torch.cat([student_top, student_tail], dim=-1), \
        F.log_softmax(torch.cat([teacher_weights, tail_weight], dim=-1), dim=-1)


def generalized_jsd(student_logq: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per position over the last dim, as TRL's GKD defines it:
    with M = beta * P_teacher + (1 - beta) * Q_student, ``beta * KL(P || M) + (1 - beta) * KL(Q || M)``
    for 0 < beta < 1; ``beta = 0`` is forward KL(P || Q) and ``beta = 1`` reverse KL(Q || P) (the two
    limits up to scale). beta = 0.5 is the Jensen-Shannon divergence."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    teacher_p, teacher_logp = teacher_logp.exp(), teacher_logp.clamp_min(_LOG_PROB_FLOOR)
    if beta == 0.0:
        return _divergence_per_position(student_logq, teacher_p, teacher_logp, "forward_kl", 0.0)
    if beta == 1.0:
        return _divergence_per_position(student_logq, teacher_p, teacher_logp, "reverse_kl", 0.0)
    log_m = _log_mixture(teacher_logp, student_logq, beta)
    return beta * (teacher_p * (teacher_logp - log_m)).sum(-1) + \
        (1.0 - beta) * (student_logq.exp() * (student_logq - log_m)).sum(-1)


def topk_generalized_jsd(
    student_logits: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`generalized_jsd` between the student and a teacher known by its top-k log-probs, over the
    k + 1 buckets of :func:`topk_kd_divergence` (exact when k is the vocabulary), times T**2, meaned
    over unmasked positions. On-policy distillation scores the student's own samples with it."""
    student_logq, teacher_logp = _topk_buckets(student_logits, topk_logprobs, topk_indices, temperature)
    return masked_mean(generalized_jsd(student_logq, teacher_logp, beta) * temperature**2, mask)


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
    student_logq, teacher_logp = _topk_buckets(student_logits, topk_logprobs, topk_indices, temperature)
    per_position = _divergence_per_position(
        student_logq, teacher_logp.exp(), teacher_logp.clamp_min(_LOG_PROB_FLOOR), kind, skew_alpha
    )
    return masked_mean(per_position * temperature**2, mask)


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


def margin_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    gamma: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL with each position weighted by the teacher's confidence margin, times T**2.

    The margin is ``m = p_(1) - p_(2)``, the gap between the teacher's two largest probabilities of
    p = softmax(teacher / T): the "margin" of margin-based uncertainty sampling (Scheffer, Decomain
    and Wrobel, "Active Hidden Markov Models for Information Extraction", IDA 2001). We found no
    established KD loss of this form to follow, so the weighting is this package's choice: the
    weight is ``m ** gamma``, normalised so the weights of the kept positions average to 1, and
    the loss is the batch-mean of ``weight * KL(p || q) * T**2``.

    Large margins are *up*-weighted. A small margin means the teacher is torn between two
    classes: its top-1 is then less often right, and the student would copy a doubtful target
    at full weight. A large margin marks a row the teacher is sure of, whose soft target is the
    more reliable. This is the reasoning of confidence-aware KD, which weights teacher
    predictions by their reliability (e.g. Zhang, Chen and Wang, "Confidence-Aware Multi-Teacher
    Knowledge Distillation", ICASSP 2022, arXiv:2201.00007, which judges it against the labels);
    the margin needs no label, so unlabeled and transfer rows are weighted too. ``gamma`` sets
    how strongly: 0 gives exactly forward KL (every weight is 1), larger values concentrate the
    batch on the confident rows.

    The weights are computed from the detached teacher alone, so no gradient flows through
    them: the student's gradient is each position's forward-KL gradient times its weight. They
    are normalised over the positions passed in (this batch, or this rank's shard of it), so the
    loss keeps forward KL's scale and ``loss.alpha`` its meaning. A batch whose teacher ties on
    every kept position (all margins 0, gamma > 0) gets uniform weights, the limit of equal small
    margins, rather than 0 / 0.

    Args:
        student_logits: ``[B, C]`` or ``[B, S, V]``, C >= 2.
        teacher_logits: same shape; detached inside.
        temperature: T > 0; the margin is that of the tempered teacher.
        gamma: margin exponent >= 0.
        mask: ``[B, S]`` (or ``[B]``), bool or 0/1; masked positions neither count nor weigh in
            the normalisation.
        reduction: ``mean`` (a scalar) or ``none`` (per position, 0 where masked; the weights are
            still normalised over the batch, so the mean of the kept positions is the scalar).

    Returns:
        Scalar tensor: batch-mean of ``weight * KL_pos * T**2``, or per position.
    """
    _check_temperature(temperature)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    _check_same_shape(student_logits, teacher_logits, "teacher logits")
    if student_logits.shape[-1] < 2:
        raise ValueError(f"margin_kd needs at least 2 classes, got {student_logits.shape[-1]}")
    dtype = compute_dtype(student_logits, teacher_logits)
    teacher_logp = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    student_logq = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_p = teacher_logp.exp()
    kl = _divergence_per_position(student_logq, teacher_p, teacher_logp, "forward_kl", 0.0)
    top2 = teacher_p.topk(2, dim=-1).values
    weight = (top2[..., 0] - top2[..., 1]).pow(gamma)  # 0 ** 0 == 1: gamma 0 weighs every position 1
    mean_weight = masked_mean(weight, mask)
    weight = torch.where(mean_weight > 0, weight / mean_weight, torch.ones_like(weight))
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
