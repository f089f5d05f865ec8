"""The student's own labels: cross-entropy against label-smoothed targets, and MixUp / CutMix, which mix
a batch's inputs and their one-hot labels with a permuted partner (the teacher targets are mixed the
same way by the caller). Seeded from a ``torch.Generator`` without touching the global RNG. No Ray.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from distill_ray.kd.losses import compute_dtype, masked_mean

__all__ = ["label_smoothing_ce", "mixup", "cutmix", "sample_beta"]


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
    counted = labels != ignore_index
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match labels {tuple(labels.shape)}")
        counted = counted & (mask.to(counted.device) != 0)
    # skipped positions may hold ignore_index, which gather cannot index with.
    safe_labels = labels.masked_fill(~counted, 0).long().unsqueeze(-1)
    nll = -logprobs.gather(-1, safe_labels).squeeze(-1)
    uniform_ce = -logprobs.mean(-1)
    return masked_mean((1.0 - smoothing) * nll + smoothing * uniform_ce, counted)


def sample_beta(alpha: float, generator: Optional[torch.Generator]) -> float:
    """One Beta(alpha, alpha) draw from numpy's sampler, seeded from ``generator`` (torch.distributions
    cannot take a generator; this keeps mixup/cutmix reproducible per generator without touching the
    global RNG); 1.0 when alpha <= 0."""
    if alpha <= 0:
        return 1.0
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=_device_of(generator)).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _device_of(generator: Optional[torch.Generator]) -> torch.device | str:
    """Where ``generator`` draws (the global CPU RNG without one)."""
    return generator.device if generator is not None else "cpu"


def _lam_and_permutation(lam: Optional[float], alpha: float, generator: Optional[torch.Generator],
                         batch: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The draws mixup and cutmix share, in this order: lam ~ Beta(alpha, alpha) (unless given), then a
    permutation of the batch's rows (on the batch's device)."""
    if lam is None:
        lam = sample_beta(alpha, generator)
    permutation = torch.randperm(batch.shape[0], generator=generator, device=_device_of(generator)).to(batch.device)
    return lam, permutation


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
    lam, permutation = _lam_and_permutation(lam, alpha, generator, inputs)
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
    lam, permutation = _lam_and_permutation(lam, alpha, generator, images)
    cut_ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    centre_y = int(torch.randint(height, (), generator=generator, device=_device_of(generator)))
    centre_x = int(torch.randint(width, (), generator=generator, device=_device_of(generator)))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y - cut_h // 2 + cut_h, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x - cut_w // 2 + cut_w, width)

    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = images[permutation, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, _mixed_one_hot(labels, num_classes, permutation, lam), permutation, lam

