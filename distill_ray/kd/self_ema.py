"""Self-distillation's moving-average teacher: an exponential moving average of the student's weights.

No strong teacher at hand: the student's own weights, averaged over the last ~1 / (1 - decay) steps,
predict a little better than the student at any one step (mean teacher, Tarvainen & Valpola 2017), and
their soft targets are the KD term's target. The average changes every step, so its targets cannot be
cached: the Train worker keeps it beside the student and runs it on the same batch, without gradients.
Every DDP rank holds the same student weights after each step, so each holds the same average without
talking to the others. Pure PyTorch, no Ray.
"""

from __future__ import annotations

import copy

import torch


def ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The average at step 0: a frozen copy of the (unwrapped) student, in eval mode, no gradients."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """One step of ``ema = decay * ema + (1 - decay) * model`` on every parameter (in place, in the
    parameter's own dtype); buffers (batch-norm statistics, counters) are copied as they are."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema decay must be in (0, 1), got {decay}")
    for average, current in zip(ema.parameters(), model.parameters(), strict=True):
        average.mul_(decay).add_(current.detach(), alpha=1.0 - decay)
    for average, current in zip(ema.buffers(), model.buffers(), strict=True):
        average.copy_(current)

