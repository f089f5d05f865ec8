"""What one training step optimises, as functions of tensors and the config: the curriculum's stage
and open fraction, temperature and alpha, the step budget, the teachers' signal from a batch's
columns (``TeacherSignal``), and ``batch_loss``: one batch's loss and its parts (KD and task per row,
token-level KD on sequences, hint and attention terms). The loop in ``train/loop.py`` composes them
and steps the optimizers; nothing here knows of Ray or steps an optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distill_ray.kd import curriculum as cur
from distill_ray.kd.blending import TeacherBlend, blend_probs
from distill_ray.config import ExperimentConfig
from distill_ray.kd.feature_losses import HintProjector, attention_map, attention_map_distance, hint_loss
from distill_ray.kd.labels import label_smoothing_ce
from distill_ray.kd.long_tail import LongTail, logit_adjusted_cross_entropy, row_classes, row_temperature_kd
from distill_ray.kd.losses import dense_from_topk, dkd, focal_kd, kd_divergence, kd_divergence_to_probs, \
    margin_kd, topk_generalized_jsd, topk_kd_divergence, topk_label_logprobs, uld_divergence
from distill_ray.models import forward_with_features, unwrap_model


def _allreduce_grads(module: torch.nn.Module, world_size: int) -> None:
    """Average the blend's gradients over ranks so every rank keeps identical blend weights."""
    if world_size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size


def stage_and_fraction(cfg: ExperimentConfig, epoch: int, step: int) -> tuple[int, float]:
    """Curriculum stage and fraction of (easiest) data open, the same on every rank."""
    c = cfg.curriculum
    if c.scheduler == "multi_stage":
        # No stage_length: the stages share the run evenly (POCL's 4 stages x 8 epochs layout).
        length = c.stage_length if c.stage_length is not None else cfg.train.epochs / c.num_stages
        sched = cur.MultiStage(num_stages=c.num_stages, stage_length=length, unit=c.stage_unit,
                               temperatures=c.stage_temperatures or (cfg.loss.temperature,) * c.num_stages,
                               alphas=c.stage_alphas)
        stage = sched.stage_at(epoch if c.stage_unit == "epoch" else step)
        return stage, sched.open_fraction(stage)
    if c.scheduler == "linear_ramp":
        return 0, cur.LinearRamp(start_fraction=c.start_fraction, full_at_epoch=c.full_at_epoch).open_fraction(epoch)
    return 0, 1.0


def temperature_and_alpha(cfg: ExperimentConfig, step: int, total_steps: int, stage: int) -> tuple[float, float]:
    c, loss = cfg.curriculum, cfg.loss

    def kind(schedule: str) -> str:  # without stages, a per-stage value is the loss's constant one
        return "constant" if schedule == "stage" and c.scheduler != "multi_stage" else schedule

    temperature = cur.schedule_value(kind(c.temperature_schedule), step, total_steps, loss.temperature,
                                     c.temperature_end, stage=stage, stage_values=c.stage_temperatures)
    alpha = cur.schedule_value(kind(c.alpha_schedule), step, total_steps, loss.alpha, c.alpha_end,
                               stage=stage, stage_values=c.stage_alphas)
    return float(temperature), float(alpha)


def kd_loss(cfg: ExperimentConfig, student_logits: torch.Tensor, target_probs: torch.Tensor,
            labels: torch.Tensor | None, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """The configured KD term between the student and the (blended, detached) teacher distribution
    (``reduction="none"``: one value per row)."""
    kind = cfg.loss.kind
    if kind in ("focal_kd", "margin_kd", "dkd"):
        # Logits whose softmax at T is exactly the blended target: T * log p.
        teacher_logits = temperature * torch.log(target_probs.clamp_min(1e-12))
        if kind == "focal_kd":
            return focal_kd(student_logits, teacher_logits, temperature=temperature, gamma=cfg.loss.focal_gamma,
                            reduction=reduction)
        if kind == "margin_kd":
            # Per row ("none") the weights are still normalised over the whole batch, so the loop's row
            # mean is margin_kd's batch mean.
            return margin_kd(student_logits, teacher_logits, temperature=temperature, gamma=cfg.loss.margin_gamma,
                             reduction=reduction)
        if labels is None:
            raise ValueError("loss.kind 'dkd' needs labels; use a divergence for unlabeled data")
        return dkd(student_logits, teacher_logits, labels, alpha=cfg.loss.dkd_alpha, beta=cfg.loss.dkd_beta,
                   temperature=temperature, reduction=reduction)
    return kd_divergence_to_probs(student_logits, target_probs, kind=kind, temperature=temperature,
                                  skew_alpha=cfg.loss.skew_alpha, reduction=reduction)


def classifier_kd(cfg: ExperimentConfig, blend: TeacherBlend, student_logits: torch.Tensor, teacher: torch.Tensor,
                  x: torch.Tensor, y: torch.Tensor, temperature: float, long_tail: LongTail | None = None,
                  mixed: bool = False) -> torch.Tensor:
    """Per row ``[B]``: the configured KD term against the blended teachers ``[K, B, C]`` (weights
    fit before training, detached: the student's loss never moves them); with class weights or
    per-class temperatures, ``long_tail_kd``."""
    if long_tail is not None and long_tail.shapes_kd:
        return long_tail_kd(cfg, blend, student_logits, teacher, x, y, temperature, long_tail, mixed)
    if cfg.loss.kind == "mse_logits":
        # Logit matching needs logits, not a mixture of distributions: blend logits linearly.
        weights = blend.weights(teacher, features=x.flatten(1)).detach()
        target_logits = torch.einsum("nk,knc->nc", weights, teacher)
        return kd_divergence(student_logits, target_logits, kind="mse_logits", temperature=temperature,
                             reduction="none")
    target = blend(teacher, temperature=temperature, features=x.flatten(1)).detach()
    return kd_loss(cfg, student_logits, target, y, temperature, reduction="none")


def long_tail_kd(cfg: ExperimentConfig, blend: TeacherBlend, student_logits: torch.Tensor, teacher: torch.Tensor,
                 x: torch.Tensor, y: torch.Tensor, temperature: float, long_tail: LongTail, mixed: bool) -> torch.Tensor:
    """Per row ``[B]``: the KD term of ``classifier_kd`` at the row's class temperature
    (``temperature * long_tail.temperatures[class]``, ``long_tail.row_temperature_kd``), times the
    class's weight. A row's class is its label, or (unlabeled rows; every row of a ``mixed`` batch)
    the top class of the blended teachers at T = 1 (``long_tail.row_classes``)."""
    weights = blend.weights(teacher, features=x.flatten(1)).detach()
    classes = row_classes(None if mixed else y, blend_probs(teacher.detach(), weights, temperature=1.0))
    if cfg.loss.kind == "mse_logits":  # temperature-free: only the class weights apply (config refuses the rest)
        kd = kd_divergence(student_logits, torch.einsum("nk,knc->nc", weights, teacher), kind="mse_logits",
                           temperature=temperature, reduction="none")
    elif long_tail.temperatures is not None:
        kd = row_temperature_kd(student_logits, teacher, weights, temperature * long_tail.temperatures[classes],
                                kind=cfg.loss.kind, skew_alpha=cfg.loss.skew_alpha)
    else:
        kd = kd_loss(cfg, student_logits, blend_probs(teacher.detach(), weights, temperature), y, temperature,
                     reduction="none")
    return kd if long_tail.weights is None else kd * long_tail.weights[classes].to(kd.dtype)


def task_loss(student_logits: torch.Tensor, y: torch.Tensor, y_b: torch.Tensor | None, lam: torch.Tensor | None,
              smoothing: float, causal: bool, long_tail: LongTail | None = None) -> torch.Tensor:
    """The supervised term: per row ``[B]`` for classifiers (a mixed row weighs its two labels by
    ``lam``; unlabeled rows get a value the caller discards), the token mean for a language model.
    ``long_tail`` with ``tau > 0``: the logit-adjusted cross-entropy (``long_tail.logit_adjusted_cross_entropy``)."""
    if causal:
        return label_smoothing_ce(student_logits, y, smoothing=smoothing)

    def rows(labels: torch.Tensor) -> torch.Tensor:
        if long_tail is not None and long_tail.tau > 0:
            return logit_adjusted_cross_entropy(student_logits, labels.clamp_min(0), long_tail.log_prior,
                                                long_tail.tau, label_smoothing=smoothing)
        return F.cross_entropy(student_logits, labels.clamp_min(0), reduction="none", label_smoothing=smoothing)

    return rows(y) if y_b is None else lam * rows(y) + (1 - lam) * rows(y_b)


def long_tail_terms(cfg: ExperimentConfig, class_counts: tuple[int, ...], num_classes: int) -> LongTail | None:
    """The run's long-tail terms (``loss.class_weights``, ``loss.class_temperature``,
    ``loss.logit_adjustment``) from the labeled train rows per class (``DataInfo.class_counts``; classes
    past its end have none); None when none is asked for or for a language model."""
    loss = cfg.loss
    asked = loss.class_weights != "none" or loss.class_temperature != 1.0 or loss.logit_adjustment != 0.0
    if cfg.data.task == "causal_lm" or not asked:
        return None
    if not any(class_counts) or len(class_counts) > num_classes:
        raise ValueError(f"loss.class_weights, loss.class_temperature and loss.logit_adjustment need the train split's "
                         f"labeled rows for each of the {num_classes} classes; got {list(class_counts)}")
    counts = tuple(class_counts) + (0,) * (num_classes - len(class_counts))
    return LongTail.from_counts(counts, loss.class_weights, loss.class_temperature, loss.logit_adjustment)


def planned_steps(cfg: ExperimentConfig, rows: int, world: int) -> int:
    """Optimizer steps a run takes over ``rows`` (each epoch trains the part its curriculum stage
    opens); what learning-rate schedules span and what the baseline's step budget matches."""
    per_rank_batch = max(1, cfg.train.batch_size // world)
    total = 0
    for epoch in range(cfg.train.epochs):
        _, fraction = stage_and_fraction(cfg, epoch, total)
        total += max(1, int(rows * fraction) // world // per_rank_batch)
    return total


@dataclass(frozen=True, eq=False)
class DenseLogits:
    """Classifier teachers' targets: logits ``[K, B, C]`` (log-probs rebuilt from the top k, tail
    mass spread evenly, when the cache keeps only k)."""

    logits: torch.Tensor


@dataclass(frozen=True, eq=False)
class TokenTopK:
    """Causal-LM teachers' per-token top k: log-probs and vocabulary indices, each ``[K, B, L, k]``.

    A teacher with its own tokenizer marks positions it has no aligned answer for with NaN
    log-probs (``finite`` masks them)."""

    logprobs: torch.Tensor
    indices: torch.Tensor

    def cut(self, width: int) -> TokenTopK:
        """The first ``width`` positions (the student's input lost its all-padding columns)."""
        return TokenTopK(self.logprobs[:, :, :width], self.indices[:, :, :width])

    def finite(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs, aligned)``: NaN rows replaced by finite numbers (so that no NaN reaches a
        gradient through a masked branch) and ``aligned [K, B, L]``, where each teacher answers."""
        aligned = ~torch.isnan(self.logprobs[..., 0])
        uniform = torch.full_like(self.logprobs, -math.log(self.logprobs.shape[-1]))
        return torch.where(aligned.unsqueeze(-1), self.logprobs, uniform), aligned

    def aligned_share(self, labels: torch.Tensor) -> float | None:
        """The share of (teacher, trained position) pairs with an aligned answer; None when all are."""
        aligned, mask = ~torch.isnan(self.logprobs[..., 0]), labels >= 0
        if aligned.all():
            return None
        return (aligned & mask).sum().item() / max(mask.sum().item() * len(self.logprobs), 1)


# The teachers' signal for one batch: one value, its type says which kind (None: no teachers).
TeacherSignal = DenseLogits | TokenTopK


def token_blend_loss(blend: TeacherBlend, targets: TokenTopK, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """The learned teacher weights' own loss on a causal-LM batch (``-log sum_k w_k p_k(y)`` from each
    teacher's log-probability of the true next token, where every teacher answers), fit to ground
    truth like the classification blend. The caller steps the blend's optimizer on it."""
    logp, aligned = targets.finite()
    label_logp = topk_label_logprobs(logp, targets.indices, labels.unsqueeze(0).expand(len(logp), -1, -1), vocab)
    return blend.weight_loss_from_label_logprobs(label_logp[:, (labels >= 0) & aligned.all(0)])


def token_kd_loss(cfg: ExperimentConfig, blend: TeacherBlend, student_logits: torch.Tensor, targets: TokenTopK,
                  labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Token-level KD on sequences: causal-LM KD against per-token top-k teachers, labels ``[B, L]``
    (< 0 ignored), at the blend's current weights.

    The KD term is ``sum_k w_k D(teacher_k, student)``: for forward KL and soft CE its student
    gradient is exactly that of the divergence to the mixture ``sum_k w_k p_k`` (cross-entropy is
    linear in the target), without densifying a vocabulary-wide mixture per token; for the other
    divergences it is the weighted sum of per-teacher terms. A teacher's unaligned positions (NaN)
    are masked out of its term."""
    logp, aligned = targets.finite()
    idx, mask = targets.indices, labels >= 0
    uld = [t.tokenizer is not None and cfg.loss.cross_tokenizer == "uld" for t in cfg.teachers]
    weights = blend.mean_weights().to(student_logits.device)
    # Only positions that train (a response token some teacher answers) go through the vocabulary-wide
    # math: prompt and padding positions would cost each teacher's log-softmax and tail sums over the
    # whole vocabulary, forward and backward, for a term masked to zero. Each teacher's mean is over
    # the same positions as before (its aligned ones among them).
    keep = mask & aligned.any(0)
    student_kept, logp, idx, aligned = student_logits[keep], logp[:, keep], idx[:, keep], aligned[:, keep]
    # ULD's teacher tail is tempered as if spread over the student's vocabulary (the teacher's size is
    # not carried with the targets; exact at temperature 1, where the tail is not tempered).
    return sum(weights[k] * (uld_divergence(student_kept, logp[k], temperature, aligned[k],
                                            teacher_vocab=max(student_logits.shape[-1], logp.shape[-1])) if uld[k] else
                             topk_kd_divergence(student_kept, logp[k], idx[k], kind=cfg.loss.kind,
                                                temperature=temperature, mask=aligned[k],
                                                skew_alpha=cfg.loss.skew_alpha))
               for k in range(len(logp)))


def attention_loss(student_features: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Attention transfer against a teacher's already reduced map [N, P] (as the teachers send it):
    ``feature_losses.attention_map_distance`` of the student's map, after checking the grids match."""
    student_map = attention_map(student_features.float())
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"attention maps differ in size: the student's features {tuple(student_features.shape[1:])} "
                         f"give {student_map.shape[1]} positions, the teacher's map has {teacher_map.shape[1]}; "
                         "use a student and loss.hint_teacher with the same spatial (or token) grid")
    return attention_map_distance(student_map, teacher_map.float())


def hint_projector(model, probe: np.ndarray, shapes: dict, device, want_hint: bool,
                   want_attention: bool) -> HintProjector | None:
    """The projector from the student's hint width to the teacher's (``shapes``, asked of the teacher
    on the driver), sized before the optimizer exists so its parameters join it; mismatched attention
    grids fail here, before any step."""
    m = unwrap_model(model)
    was_training = m.training
    m.eval()  # no BatchNorm statistics from the probe
    with torch.no_grad():
        student = forward_with_features(m, torch.as_tensor(probe).to(device), want_hint, want_attention)
    m.train(was_training)
    if want_attention:
        attention_loss(student["attention"], torch.zeros((len(probe), *shapes["attention"])))
    return HintProjector(student["hint"].shape[-1], shapes["hint"][-1]).to(device) if want_hint else None


def teacher_signal(batch: dict[str, torch.Tensor], names: tuple[str, ...], num_classes: int, topk: int | None,
                   causal: bool, device) -> TeacherSignal:
    """The teachers' targets in a batch's columns: classification ``DenseLogits`` [K, B, C] (rebuilt
    from the top k when the cache keeps only k); causal LM ``TokenTopK``, the per-token top k."""
    if topk is None:
        return DenseLogits(torch.stack([batch[f"{n}/logits"].float() for n in names]).to(device))
    logp = torch.stack([batch[f"{n}/topk_logprobs"].float() for n in names])
    idx = torch.stack([batch[f"{n}/topk_indices"].long() for n in names])
    if causal:
        return TokenTopK(logp.to(device), idx.to(device))
    return DenseLogits(torch.stack([dense_from_topk(logp[k], idx[k], num_classes) for k in range(len(names))]).to(device))


# --- one batch's loss ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LossParts:
    """One batch's loss and what it is made of. ``total`` is what the student's optimizer minimises:
    ``mean_rows(where(labeled, alpha * kd + (1 - alpha) * task, kd)) + hint_weight * hint +
    attention_weight * attention``."""

    total: torch.Tensor
    kd: torch.Tensor  # classifier: per row [B]; causal LM: the token mean; no teachers: 0
    task: torch.Tensor  # classifier: per row [B] (unlabeled rows: a value never used); causal LM: the token mean
    labeled: torch.Tensor  # classifier: [B] bool, the rows the task term trains; causal LM: True
    hint: torch.Tensor | None = None
    attention: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """The step's loss parts as the history logs them."""
        return {"loss": self.total.item(), "kd_loss": self.kd.mean().item(),
                "task_loss": self.task[self.labeled].mean().item() if self.labeled.any() else 0.0,
                "labeled_share": self.labeled.float().mean().item()}

    def feature_metrics(self) -> dict[str, float]:
        """The hint and attention terms, where the step has them."""
        out = {"hint_loss": self.hint.item()} if self.hint is not None else {}
        return out | ({"attention_loss": self.attention.item()} if self.attention is not None else {})


def kd_term(cfg: ExperimentConfig, blend: TeacherBlend, student_logits: torch.Tensor, signal: TeacherSignal | None,
            x: torch.Tensor, y: torch.Tensor, temperature: float, long_tail: LongTail | None = None,
            mixed: bool = False) -> torch.Tensor:
    """The KD term for the teachers' signal: per row ``[B]`` for dense targets (class-weighted and at
    per-class temperatures with ``long_tail``), the token mean for a causal LM's per-token top k, zero
    without teachers."""
    if isinstance(signal, DenseLogits):
        return classifier_kd(cfg, blend, student_logits, signal.logits, x, y, temperature, long_tail, mixed)
    if isinstance(signal, TokenTopK):
        return token_kd_loss(cfg, blend, student_logits, signal, y, temperature)
    return torch.zeros((), device=student_logits.device)


def on_policy_loss(blend: TeacherBlend, student_logits: torch.Tensor, targets: TokenTopK, labels: torch.Tensor,
                   beta: float, temperature: float) -> LossParts:
    """The loss of an on-policy step: ``sum_k w_k GJSD_beta(teacher_k, student)`` over the k + 1
    buckets at the positions that predict the student's response tokens (``labels >= 0``), at the
    blend's current weights (learned on the references' off-policy steps, detached here). There is no
    task term: the labels are the student's own samples, not ground truth."""
    logp, aligned = targets.finite()
    keep = (labels >= 0) & aligned.any(0)
    if not keep.any():  # no response token: a zero that keeps the graph (DDP expects every parameter)
        kd = student_logits.sum() * 0.0
    else:
        weights = blend.mean_weights().detach().to(student_logits.device)
        student = student_logits[keep]
        kd = sum(weights[k] * topk_generalized_jsd(student, logp[k][keep], targets.indices[k][keep], beta=beta,
                                                   temperature=temperature, mask=aligned[k][keep])
                 for k in range(len(logp)))
    none = torch.zeros((), dtype=torch.bool, device=student_logits.device)
    return LossParts(kd, kd, torch.zeros((), device=student_logits.device), none)


def batch_loss(cfg: ExperimentConfig, blend: TeacherBlend, student_logits: torch.Tensor,
               signal: TeacherSignal | None, x: torch.Tensor, y: torch.Tensor, *, temperature: float, alpha: float,
               causal: bool, y_b: torch.Tensor | None = None, lam: torch.Tensor | None = None,
               features: dict[str, torch.Tensor] | None = None, projector: HintProjector | None = None,
               hint_target: torch.Tensor | None = None, attention_target: torch.Tensor | None = None,
               on_policy: bool = False, long_tail: LongTail | None = None) -> LossParts:
    """One batch's loss and its parts, computed from the student's output and the teachers' signal.

    Per row, a labeled row learns ``alpha * KD + (1 - alpha) * task``; an unlabeled one (label -1,
    or either label of a mixed pair ``y``/``y_b`` weighed by ``lam``) learns KD alone. A language
    model's labels are its own tokens (prompt and padding positions < 0 are left out of both terms).
    ``hint_target`` / ``attention_target`` (one teacher's features, online mode) add FitNets' hint
    term, through ``projector``, and attention transfer, on the student's ``features``. ``on_policy``:
    the batch is the student's own responses, scored by the teachers (``on_policy_loss``). ``long_tail``
    (classifiers; ``long_tail_terms``): the KD term class-weighted and at per-class temperatures, the
    task term logit-adjusted."""
    if on_policy:
        return on_policy_loss(blend, student_logits, signal, y, cfg.loss.on_policy.beta, temperature)
    long_tail = long_tail.to(student_logits.device) if long_tail is not None and not causal else None
    kd = kd_term(cfg, blend, student_logits, signal, x, y, temperature, long_tail, mixed=y_b is not None)
    task = task_loss(student_logits, y, y_b, lam, cfg.loss.label_smoothing, causal, long_tail)
    labeled = torch.ones((), dtype=torch.bool, device=student_logits.device) if causal else \
        (y >= 0) & (y_b >= 0 if y_b is not None else True)
    row_loss = torch.where(labeled, alpha * kd + (1 - alpha) * task, kd)
    hint = attention = None
    if hint_target is not None:  # FitNets: projected student features regress the hint teacher's
        hint = hint_loss(features["hint"].float(), hint_target.float(), projector, kind=cfg.loss.hint_kind)
    if attention_target is not None:  # attention transfer against the teacher's map
        attention = attention_loss(features["attention"], attention_target)
    zero = torch.zeros((), device=student_logits.device)
    total = row_loss.mean() + cfg.loss.hint_weight * (hint if hint is not None else zero) \
        + cfg.loss.attention_weight * (attention if attention is not None else zero)
    return LossParts(total, kd, task, labeled, hint, attention)
