"""Learning-rate schedules as a factor of the base rate, and the KD warm-up: pure functions of the step or epoch.

The loop sets ``lr = train.lr * lr_factor(...)`` before every step, so a resumed run (or a Population
Based Training segment with a perturbed ``train.lr``) continues the same curve from its step count,
with nothing to restore from the optimizer.
"""

from __future__ import annotations

import math

from distill_ray.config import LR_SCHEDULES

# One-cycle's start and end as fractions of the peak (torch's OneCycleLR defaults: div_factor=25,
# final_div_factor=1e4).
ONECYCLE_START = 1 / 25
ONECYCLE_END = ONECYCLE_START / 1e4
ONECYCLE_DEFAULT_WARMUP = 0.3


def lr_factor(kind: str, step: int, total_steps: int, warmup_fraction: float = 0.0) -> float:
    """Factor of the base learning rate at ``step`` (0-based) of ``total_steps``.

    A linear warm-up from ~0 over the first ``warmup_fraction`` of the steps, then ``constant`` 1,
    ``cosine`` decay to 0, ``linear`` decay to 0, or ``onecycle`` (warm-up from peak/25 over
    ``warmup_fraction``, 0.3 if unset, then cosine down to peak/2.5e5, as torch's OneCycleLR)."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; valid: {', '.join(LR_SCHEDULES)}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    total = max(1, total_steps)
    step = min(max(0, step), total)
    if kind == "onecycle":
        warmup = max(1, round((warmup_fraction or ONECYCLE_DEFAULT_WARMUP) * total))
        if step < warmup:
            return ONECYCLE_START + (1 - ONECYCLE_START) * step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return ONECYCLE_END + (1 - ONECYCLE_END) * 0.5 * (1 + math.cos(math.pi * progress))
    warmup = round(warmup_fraction * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def kd_active(epoch: int, warmup_epochs: int) -> bool:
    """Whether the KD term is on at ``epoch`` (0-based): off for the first ``loss.kd_warmup_epochs``, task
    loss alone, so a student that will teach itself (self-distillation) has something worth teaching."""
    if warmup_epochs < 0:
        raise ValueError(f"kd_warmup_epochs must be >= 0, got {warmup_epochs}")
    return epoch >= warmup_epochs
