"""Feature distillation: the student's hidden features and attention maps matched to a teacher's
(FitNets hints through a learned projector, attention transfer). Batch-meaned like every loss in
``losses``, teacher inputs detached, computed in at least float32. No Ray.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill_ray.kd.losses import compute_dtype, masked_mean

__all__ = ["HintProjector", "hint_loss", "attention_map", "attention_transfer", "attention_map_distance"]


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
    return masked_mean(per_position, mask)


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

