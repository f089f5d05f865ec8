"""Combine K frozen teachers' distributions into one distillation target.

Shapes: teacher logits are one tensor ``[K, N, C]`` (K teachers, N positions: rows or flattened
tokens, C classes or vocabulary). Blend weights are ``[N, K]`` on the simplex (each row >= 0,
summing to 1); a ``[K]`` vector means the same weights at every position.

The blended target is the mixture ``sum_k w_k softmax(z_k / T)``: a distribution, not a logit
average, so one teacher's confident mistake is diluted rather than amplified.

Learned weights are fit to *ground truth* (:meth:`TeacherBlend.weight_loss`, the blended
teachers' cross-entropy on the labels), never to the student's KD loss: minimising KD over the
weights would reward whichever teacher the student already imitates, not the teacher that is
right. The training loop steps a separate optimizer on ``weight_loss`` and uses
``blend(...).detach()`` as the KD target.

Everything is computed in at least float32 (fp16/bf16 teacher logits are upcast).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from distill_ray.config import BLEND_KINDS, CONFIDENCE_KINDS, LM_BLEND_KINDS
from distill_ray.kd.losses import compute_dtype

__all__ = [
    "BLEND_KINDS",
    "CONFIDENCE_KINDS",
    "LEARNED_KINDS",
    "uniform_weights",
    "confidence_weights",
    "blend_probs",
    "TeacherBlend",
]

LEARNED_KINDS = ("learned_global", "learned_per_class", "learned_gate")


# --------------------------------------------------------------------------------------------
# helpers


def _check_teacher_logits(teacher_logits: torch.Tensor) -> None:
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [K, N, C], got shape {tuple(teacher_logits.shape)}")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


# --------------------------------------------------------------------------------------------
# fixed weights


def uniform_weights(num_teachers: int, num_positions: int, device=None) -> torch.Tensor:
    """Equal weight on every teacher: ``[N, K]`` filled with ``1 / K``."""
    if num_teachers < 1:
        raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
    return torch.full((num_positions, num_teachers), 1.0 / num_teachers, device=device)


def _confidence_log_weights(teacher_logits: torch.Tensor, kind: str, sharpness: float) -> torch.Tensor:
    """log of :func:`confidence_weights`, ``[K, N, C] -> [N, K]`` (no gradient)."""
    _check_choice("confidence kind", kind, CONFIDENCE_KINDS)
    _check_teacher_logits(teacher_logits)
    if not sharpness > 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness}")
    with torch.no_grad():
        logits = teacher_logits.detach().to(compute_dtype(teacher_logits))
        log_p = torch.log_softmax(logits, dim=-1)  # [K, N, C]
        if kind == "entropy":
            # Shannon entropy H_1 = -sum p log p; xlogy-free form is safe since log_p is finite.
            uncertainty = -(log_p.exp() * log_p).sum(-1)
        else:
            # Min-entropy H_inf = -log max_c p_c.
            uncertainty = -log_p.max(dim=-1).values
        return torch.log_softmax(-uncertainty.transpose(0, 1) / sharpness, dim=-1)


def confidence_weights(teacher_logits: torch.Tensor, kind: str = "entropy", sharpness: float = 1.0) -> torch.Tensor:
    """Per-position weights favouring the more confident teachers: ``[K, N, C] -> [N, K]``.

    Both kinds are ``softmax_k(-H_k / sharpness)`` over one entropy of teacher k's softmax (at
    temperature 1), so lower entropy means higher weight:

    * ``"entropy"``: Shannon entropy, so ``w_k ∝ perplexity_k ** (-1 / sharpness)``; a teacher
      that is effectively choosing among 2 classes outweighs one spread over 8 four to one.
    * ``"max_prob"``: min-entropy ``-log max_c p_c``, so ``w_k ∝ max_prob_k ** (1 / sharpness)``,
      i.e. the teachers' max-probabilities normalised over teachers (at sharpness 1).

    Larger ``sharpness`` flattens the weights towards uniform. Computed without gradient: the
    weights are a fixed heuristic, not something to learn through.
    """
    return _confidence_log_weights(teacher_logits, kind, sharpness).exp()


def blend_probs(teacher_logits: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mixture of the teachers' tempered distributions: ``sum_k w_k softmax(z_k / T)``.

    ``teacher_logits [K, N, C]``, ``weights [N, K]`` or ``[K]`` (on the simplex) -> ``[N, C]``.
    Rows sum to 1 when the weights do. Gradients flow to both inputs (callers decide what to detach).
    """
    _check_teacher_logits(teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_teachers, num_positions, _ = teacher_logits.shape
    if weights.dim() == 1:
        weights = weights.unsqueeze(0).expand(num_positions, -1)
    if weights.shape != (num_positions, num_teachers):
        raise ValueError(
            f"weights must be [N, K] = [{num_positions}, {num_teachers}] or [K], got shape {tuple(weights.shape)}"
        )
    dtype = compute_dtype(teacher_logits, weights)
    probs = torch.softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # [K, N, C]
    return torch.einsum("nk,knc->nc", weights.to(device=probs.device, dtype=dtype), probs)


# --------------------------------------------------------------------------------------------
# the module the training loop holds


class TeacherBlend(nn.Module):
    """Blend weights of one kind from :data:`BLEND_KINDS`, with the parameters to learn them.

    * ``uniform``: ``1 / K`` everywhere. ``confidence``: :func:`confidence_weights`.
    * ``learned_global``: one logit per teacher, ``[K]`` (zeros = uniform at init).
    * ``learned_per_class``: logits ``[C, K]``; a position uses the row of the class the uniform
      teacher ensemble predicts there (argmax of the mean teacher softmax at T = 1), so no label is
      needed at use time, while the table itself is learned from labels.
    * ``learned_gate``: MLP ``features [N, F] -> gate_hidden -> K``; its last layer starts at
      zero, so the gate also starts uniform.

    Learned kinds are trained only through :meth:`weight_loss`. On unlabeled batches
    (``labeled=False``) they fall back to confidence weights of ``confidence_kind``, since labels
    are what they were fit to. Teacher logits are always detached: teachers are frozen.
    """

    def __init__(
        self,
        kind: str,
        num_teachers: int,
        num_classes: Optional[int] = None,
        gate_in_features: Optional[int] = None,
        gate_hidden: int = 32,
        confidence_kind: str = "entropy",
    ) -> None:
        super().__init__()
        _check_choice("blend kind", kind, BLEND_KINDS)
        _check_choice("confidence kind", confidence_kind, CONFIDENCE_KINDS)
        if num_teachers < 1:
            raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
        self.kind = kind
        self.num_teachers = num_teachers
        self.num_classes = num_classes
        self.confidence_kind = confidence_kind
        if kind == "learned_global":
            self.global_logits = nn.Parameter(torch.zeros(num_teachers))
        elif kind == "learned_per_class":
            if not num_classes or num_classes < 1:
                raise ValueError("blend kind 'learned_per_class' needs num_classes >= 1")
            self.class_logits = nn.Parameter(torch.zeros(num_classes, num_teachers))
        elif kind == "learned_gate":
            if not gate_in_features or gate_in_features < 1:
                raise ValueError("blend kind 'learned_gate' needs gate_in_features >= 1")
            if gate_hidden < 1:
                raise ValueError(f"gate_hidden must be >= 1, got {gate_hidden}")
            self.gate = nn.Sequential(
                nn.Linear(gate_in_features, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, num_teachers)
            )
            nn.init.zeros_(self.gate[-1].weight)
            nn.init.zeros_(self.gate[-1].bias)
        # What mean_weights() reports for kinds whose weights vary per position; not a parameter,
        # not checkpointed (it is recomputed on the next step).
        self._last_weights: Optional[torch.Tensor] = None

    @property
    def is_learned(self) -> bool:
        return self.kind in LEARNED_KINDS

    def _check(self, teacher_logits: torch.Tensor) -> None:
        _check_teacher_logits(teacher_logits)
        if teacher_logits.shape[0] != self.num_teachers:
            raise ValueError(f"teacher_logits has {teacher_logits.shape[0]} teachers, blend expects {self.num_teachers}")

    def _log_weights(
        self, teacher_logits: torch.Tensor, features: Optional[torch.Tensor], labeled: bool
    ) -> torch.Tensor:
        """log of the blend weights ``[N, K]``; differentiable w.r.t. the blend parameters only."""
        self._check(teacher_logits)
        num_teachers, num_positions, num_classes = teacher_logits.shape
        teacher_logits = teacher_logits.detach()
        if self.kind == "uniform":
            return torch.full((num_positions, num_teachers), -math.log(num_teachers),
                              device=teacher_logits.device, dtype=compute_dtype(teacher_logits))
        if self.kind == "confidence" or not labeled:
            return _confidence_log_weights(teacher_logits, self.confidence_kind, 1.0)
        if self.kind == "learned_global":
            return torch.log_softmax(self.global_logits, dim=-1).unsqueeze(0).expand(num_positions, -1)
        if self.kind == "learned_per_class":
            if num_classes != self.num_classes:
                raise ValueError(f"teacher_logits has {num_classes} classes, blend was built for {self.num_classes}")
            with torch.no_grad():
                ensemble = torch.softmax(teacher_logits.to(compute_dtype(teacher_logits)), dim=-1).mean(0)
                predicted_class = ensemble.argmax(dim=-1)  # [N]
            return torch.log_softmax(self.class_logits, dim=-1)[predicted_class]
        # learned_gate
        if features is None:
            raise ValueError("blend kind 'learned_gate' needs features [N, F]; got features=None")
        if features.dim() != 2 or features.shape[0] != num_positions:
            raise ValueError(f"features must be [N, F] with N = {num_positions}, got shape {tuple(features.shape)}")
        first = self.gate[0]
        gate_in = features.detach().to(device=first.weight.device, dtype=first.weight.dtype)
        return torch.log_softmax(self.gate(gate_in), dim=-1)

    def weights(
        self, teacher_logits: torch.Tensor, features: Optional[torch.Tensor] = None, labeled: bool = True
    ) -> torch.Tensor:
        """Blend weights ``[N, K]`` for teacher logits ``[K, N, C]`` (features ``[N, F]`` for the gate)."""
        weights = self._log_weights(teacher_logits, features, labeled).exp()
        self._last_weights = weights.detach().mean(0)
        return weights

    def forward(
        self,
        teacher_logits: torch.Tensor,
        temperature: float = 1.0,
        features: Optional[torch.Tensor] = None,
        labeled: bool = True,
    ) -> torch.Tensor:
        """Blended teacher distribution ``[N, C]`` at ``temperature`` with the current weights.

        The result still carries the blend parameters' graph; callers use ``.detach()`` as the KD
        target so that the student's loss never trains the blend.
        """
        return blend_probs(teacher_logits.detach(), self.weights(teacher_logits, features, labeled), temperature)

    def weight_loss(
        self,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        features: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Mean cross-entropy of the blended teachers (T = 1) on the labels: the loss that trains the weights.

        ``reduction="none"`` gives it per position ``[N]`` (0 where skipped), for mixed batches whose
        rows weigh two labels each.

        ``-log sum_k w_k softmax(z_k)[y]`` per position, computed as ``-logsumexp_k(log w_k +
        log_softmax(z_k)[y])``; ``labels [N]``, positions with ``ignore_index`` skipped (all skipped
        -> 0). Teacher logits are detached, so only blend parameters get gradient. Non-learned kinds
        have nothing to fit and return a zero scalar that does not require grad.
        """
        self._check(teacher_logits)
        labels = labels.reshape(-1)
        num_teachers, num_positions, num_classes = teacher_logits.shape
        if labels.shape[0] != num_positions:
            raise ValueError(f"labels must be [N] with N = {num_positions}, got shape {tuple(labels.shape)}")
        if not self.is_learned:
            return torch.zeros((), device=teacher_logits.device)
        labeled = labels != ignore_index
        if not bool(labeled.any()):
            # Zero that still touches the parameters, so backward()/DDP all-reduce see a graph.
            return sum(p.sum() for p in self.parameters()) * 0.0
        log_w = self._log_weights(teacher_logits, features, labeled=True)  # [N, K]
        self._last_weights = log_w.detach().exp().mean(0)
        logits = teacher_logits.detach()[:, labeled]
        dtype = torch.promote_types(compute_dtype(logits), log_w.dtype)
        logits = logits.to(dtype)
        safe_labels = labels[labeled].to(logits.device)
        if bool(((safe_labels < 0) | (safe_labels >= num_classes)).any()):
            raise ValueError(f"labels must be in [0, {num_classes}) or ignore_index={ignore_index}")
        label_logit = logits.gather(-1, safe_labels.view(1, -1, 1).expand(num_teachers, -1, 1)).squeeze(-1)
        log_p_label = (label_logit - torch.logsumexp(logits, dim=-1)).transpose(0, 1)  # [M, K]
        log_blend_label = torch.logsumexp(log_w[labeled].to(dtype) + log_p_label, dim=-1)
        if reduction == "none":
            return torch.zeros(num_positions, dtype=dtype, device=log_w.device).masked_scatter(labeled, -log_blend_label)
        return -log_blend_label.mean()

    def weight_loss_from_label_logprobs(self, label_logprobs: torch.Tensor) -> torch.Tensor:
        """:meth:`weight_loss` when only each teacher's log-probability of the label is known
        (``[K, M]``, e.g. from top-k targets of a language model): ``-log sum_k w_k p_k(y)``.
        Position-independent kinds only (uniform, learned_global): the others need full logits."""
        if label_logprobs.dim() != 2 or label_logprobs.shape[0] != self.num_teachers:
            raise ValueError(f"label_logprobs must be [K={self.num_teachers}, M], got {tuple(label_logprobs.shape)}")
        if self.kind not in LM_BLEND_KINDS:
            raise ValueError(f"blend kind {self.kind!r} needs full teacher logits; with label log-probs only "
                             "(top-k language-model targets) use uniform or learned_global")
        if not self.is_learned:
            return torch.zeros((), device=label_logprobs.device)
        if label_logprobs.shape[1] == 0:
            return self.global_logits.sum() * 0.0
        log_w = torch.log_softmax(self.global_logits, dim=-1)
        return -torch.logsumexp(log_w.unsqueeze(1) + label_logprobs.detach().to(log_w.dtype), dim=0).mean()

    def mean_weights(self) -> torch.Tensor:
        """Weights to log, ``[K]`` (detached): the learned global or class-averaged weights, else
        the position-mean of the last computed weights (uniform before any call)."""
        if self.kind == "learned_global":
            return torch.softmax(self.global_logits.detach(), dim=-1)
        if self.kind == "learned_per_class":
            return torch.softmax(self.class_logits.detach(), dim=-1).mean(0)
        if self._last_weights is None:
            return torch.full((self.num_teachers,), 1.0 / self.num_teachers)
        return self._last_weights

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_teachers={self.num_teachers}, confidence_kind={self.confidence_kind!r}"


def fit_blend(
    blend: TeacherBlend,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    features: Optional[torch.Tensor] = None,
    *,
    lr: float = 0.05,
    steps: int = 200,
    average_grads=None,
) -> float:
    """Fit a learned blend to labels the teachers did not train on (held-out rows), before the
    student trains: ``steps`` full-batch Adam steps on :meth:`TeacherBlend.weight_loss`.

    ``teacher_logits [K, N, C]``, ``labels [N]`` (-1 = skip), ``features [N, F]`` for the gate.
    ``average_grads(blend)``, if given, runs between backward and step (DDP ranks average their
    gradients so every rank ends with the same weights). Returns the final blended loss (0 for a
    non-learned kind, which has nothing to fit)."""
    params = [p for p in blend.parameters() if p.requires_grad]
    if not blend.is_learned or not params:
        return float(blend.weight_loss(teacher_logits, labels, features, ignore_index=-1))
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = blend.weight_loss(teacher_logits, labels, features, ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if average_grads is not None:
            average_grads(blend)
        optimizer.step()
    with torch.no_grad():
        return float(blend.weight_loss(teacher_logits, labels, features, ignore_index=-1))

