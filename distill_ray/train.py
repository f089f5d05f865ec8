"""The distillation loop: one per-worker function that reads top to bottom, and the driver that runs it.

Per step: curriculum stage -> batch of this rank's shard -> soft targets (cached arrays, or the
teacher pool one batch ahead) -> blend with learned per-teacher weights (fit to labels, never to
the student's KD loss) -> ``alpha * KD + (1 - alpha) * task`` (+ weighted hint and attention terms
against one teacher's features, online mode) -> step. Online mode can MixUp/CutMix each batch before
the teachers see it. Checkpoints every N steps carry everything needed to resume mid-epoch: student,
optimizers, blend, hint projector, counters, RNG, history.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distill_ray import curriculum as cur
from distill_ray.blending import TeacherBlend
from distill_ray.config import ExperimentConfig, config_from_dict, config_to_dict
from distill_ray.evaluate import accuracy, agreement, expected_calibration_error
from distill_ray.losses import dense_from_topk, dkd, focal_kd, kd_divergence, kd_divergence_to_probs, label_smoothing_ce, \
    topk_kd_divergence, topk_label_logprobs
from distill_ray.losses import HintProjector, attention_map, cutmix, hint_loss, mixup
from distill_ray.models import build_model, forward_logits, forward_with_features, save_model

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
STUDENT_DIR = "student"


@dataclass
class DistillData:
    """Everything a worker needs, as numpy, placed once in the object store by the driver.

    ``teacher_logits`` are cached soft targets [K, N, C] for the train split (None in online mode),
    ``val_teacher_logits`` the same for validation (for agreement); ``difficulty`` [N] ranks the
    train split easy -> hard for the curriculum (larger = harder).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    teacher_names: tuple[str, ...]
    num_classes: int
    input_shape: tuple[int, ...]
    teacher_logits: np.ndarray | None = None
    val_teacher_logits: np.ndarray | None = None
    difficulty: np.ndarray | None = None
    teacher_handles: dict[str, list] | None = None  # online mode: actor handles of the pool
    use_teachers: bool = True  # False trains the same student from labels alone (the baseline)
    task: str = "classification"  # causal_lm: labels [N, L] are next tokens, targets are per-token top-k
    teacher_topk: tuple[np.ndarray, np.ndarray] | None = None  # causal_lm cache: log-probs, indices [K, N, L, k]
    val_teacher_topk: tuple[np.ndarray, np.ndarray] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain ints, so the checkpoint loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


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
        sched = cur.MultiStage(num_stages=c.num_stages, stage_length=c.stage_length, unit=c.stage_unit,
                               temperatures=c.stage_temperatures or (cfg.loss.temperature,) * c.num_stages,
                               alphas=c.stage_alphas)
        stage = sched.stage_at(epoch if c.stage_unit == "epoch" else step)
        return stage, sched.open_fraction(stage)
    if c.scheduler == "linear_ramp":
        return 0, cur.LinearRamp(start_fraction=c.start_fraction, full_at_epoch=c.full_at_epoch).open_fraction(epoch)
    return 0, 1.0


def temperature_and_alpha(cfg: ExperimentConfig, step: int, total_steps: int, stage: int) -> tuple[float, float]:
    c, loss = cfg.curriculum, cfg.loss
    temperature = cur.schedule_value(c.temperature_schedule, step, total_steps, loss.temperature, c.temperature_end,
                                     stage=stage, stage_values=c.stage_temperatures)
    alpha = cur.schedule_value(c.alpha_schedule, step, total_steps, loss.alpha, c.alpha_end,
                               stage=stage, stage_values=c.stage_alphas)
    return float(temperature), float(alpha)


def kd_loss(cfg: ExperimentConfig, student_logits: torch.Tensor, target_probs: torch.Tensor,
            labels: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """The configured KD term between the student and the (blended, detached) teacher distribution."""
    kind = cfg.loss.kind
    if kind in ("focal_kd", "dkd"):
        # Logits whose softmax at T is exactly the blended target: T * log p.
        teacher_logits = temperature * torch.log(target_probs.clamp_min(1e-12))
        if kind == "focal_kd":
            return focal_kd(student_logits, teacher_logits, temperature=temperature, gamma=cfg.loss.focal_gamma)
        if labels is None:
            raise ValueError("loss.kind 'dkd' needs labels; use a divergence for unlabeled data")
        return dkd(student_logits, teacher_logits, labels, alpha=cfg.loss.dkd_alpha, beta=cfg.loss.dkd_beta,
                   temperature=temperature)
    return kd_divergence_to_probs(student_logits, target_probs, kind=kind, temperature=temperature,
                                  skew_alpha=cfg.loss.skew_alpha)


def _difficulty_for_epoch(cfg: ExperimentConfig, data: DistillData, model, x_all: torch.Tensor,
                          y_all: torch.Tensor) -> torch.Tensor | None:
    """Difficulty [N] (None when nothing measures it): teacher-based measures are fixed (from the
    driver); student_loss is live."""
    measures = []
    for name in cfg.curriculum.measurers:
        if name == "student_loss":
            with torch.no_grad():
                logits = torch.cat([forward_logits(_unwrap(model), x_all[i:i + 1024]) for i in range(0, len(x_all), 1024)])
            measures.append(cur.student_loss(logits, y_all))
    if data.difficulty is not None:
        measures.insert(0, torch.as_tensor(data.difficulty, dtype=torch.float32))
    if not measures:
        return None
    return measures[0] if len(measures) == 1 else cur.reciprocal_rank_fusion(*measures, k=cfg.curriculum.rrf_k)


@torch.no_grad()
def _validate(model, data: DistillData, val_teacher: torch.Tensor | None) -> dict[str, float]:
    m = _unwrap(model)
    was_training = m.training
    m.eval()
    x = torch.as_tensor(data.val_x)
    logits = torch.cat([forward_logits(m, x[i:i + 1024]).float() for i in range(0, len(x), 1024)])
    m.train(was_training)
    metrics = {"val_accuracy": accuracy(logits, data.val_y),
               "val_loss": F.cross_entropy(logits, torch.as_tensor(data.val_y)).item(),
               "val_ece": expected_calibration_error(logits.softmax(-1), data.val_y)}
    if val_teacher is not None:
        for k, name in enumerate(data.teacher_names):
            metrics[f"agreement/{name}"] = agreement(logits, val_teacher[k])
    return metrics


@torch.no_grad()
def _validate_sequences(model, data: DistillData) -> dict[str, float]:
    """Causal LM: perplexity and next-token accuracy on validation, top-1 agreement with each teacher."""
    from distill_ray.evaluate import lm_label_logprobs, perplexity, token_accuracy

    m = _unwrap(model)
    x, y = torch.as_tensor(data.val_x), torch.as_tensor(data.val_y)
    label_logp, predicted = lm_label_logprobs(m, x, y)
    mask = y >= 0
    metrics = {"val_perplexity": perplexity(label_logp, y), "val_accuracy": token_accuracy(predicted, y),
               "val_loss": float(-label_logp[mask].mean())}
    if data.val_teacher_topk is not None:
        teacher_top1 = torch.as_tensor(data.val_teacher_topk[1])[..., 0]  # [K, N, L]
        for k, name in enumerate(data.teacher_names):
            metrics[f"agreement/{name}"] = (predicted == teacher_top1[k])[mask].float().mean().item()
    return metrics


def sequence_kd(cfg: ExperimentConfig, blend: TeacherBlend, blend_opt, student_logits: torch.Tensor,
                teacher_topk: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, temperature: float,
                world: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Causal-LM KD against per-token top-k teachers ``[K, B, L, k]``, labels ``[B, L]`` (< 0 ignored).

    The learned weights are fit to ground truth like the classification blend, from each teacher's
    log-probability of the true next token. The KD term is ``sum_k w_k D(teacher_k, student)``: for
    forward KL and soft CE its student gradient is exactly that of the divergence to the mixture
    ``sum_k w_k p_k`` (cross-entropy is linear in the target), without densifying a vocabulary-wide
    mixture per token; for the other divergences it is the weighted sum of per-teacher terms."""
    logp, idx = teacher_topk
    mask = labels >= 0
    parts: dict[str, float] = {}
    if blend_opt is not None:
        label_logp = topk_label_logprobs(logp, idx, labels.unsqueeze(0).expand(len(logp), -1, -1),
                                         student_logits.shape[-1])
        blend_loss = blend.weight_loss_from_label_logprobs(label_logp[:, mask])
        blend_opt.zero_grad(set_to_none=True)
        blend_loss.backward()
        _allreduce_grads(blend, world)
        blend_opt.step()
        parts["blend_loss"] = blend_loss.item()
    weights = blend.mean_weights().to(student_logits.device)
    kd = sum(weights[k] * topk_kd_divergence(student_logits, logp[k], idx[k], kind=cfg.loss.kind,
                                             temperature=temperature, mask=mask, skew_alpha=cfg.loss.skew_alpha)
             for k in range(len(logp)))
    return kd, parts


def _teacher_logits(answer: dict, num_classes: int) -> torch.Tensor:
    """One teacher's answer as [N, C] logits: full logits, or log-probs rebuilt from its top k."""
    if "logits" in answer:
        return torch.as_tensor(answer["logits"]).float()
    return dense_from_topk(torch.as_tensor(answer["topk_logprobs"]), torch.as_tensor(answer["topk_indices"]),
                           num_classes)


def _maybe_inject_failure(spec: dict | None, step: int, rank: int) -> None:
    """Fault injection for tests and drills: rank 0 dies once at ``spec['step']`` (a marker file
    remembers it happened, so the restarted worker carries on)."""
    if spec and rank == 0 and step == spec["step"] and not Path(spec["marker"]).exists():
        Path(spec["marker"]).write_text(str(step))
        raise RuntimeError(f"injected failure at step {step}")


def mix_generator(seed: int, rank: int, epoch: int, batch: int) -> torch.Generator:
    """The MixUp/CutMix generator of one batch: a function of (seed, rank, epoch, batch) only, so a
    resumed run mixes every batch exactly as an uninterrupted one (nothing to checkpoint)."""
    entropy = np.random.SeedSequence([seed % 2**32, rank, epoch, batch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def mix_batch(cfg: ExperimentConfig, x: torch.Tensor, y: torch.Tensor, num_classes: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """One batch as the student and the teachers see it: ``(x, y_a, y_b, lam)``, mixed by MixUp
    (``loss.mixup_alpha``) or CutMix (``loss.cutmix_alpha``; with both on, a coin flip per batch), the
    task loss being ``lam * CE(y_a) + (1 - lam) * CE(y_b)``. Without mixing: ``(x, y, None, 1.0)``."""
    if cfg.loss.mixup_alpha <= 0 and cfg.loss.cutmix_alpha <= 0:
        return x, y, None, 1.0
    if not x.is_floating_point():
        raise ValueError("loss.mixup_alpha / loss.cutmix_alpha mix images; these inputs are token ids")
    use_cutmix = cfg.loss.cutmix_alpha > 0 and (cfg.loss.mixup_alpha <= 0 or
                                                torch.rand((), generator=generator).item() < 0.5)
    fn, alpha = (cutmix, cfg.loss.cutmix_alpha) if use_cutmix else (mixup, cfg.loss.mixup_alpha)
    # Unlabeled rows (-1) still mix their inputs; only their task loss is skipped.
    mixed, _, permutation, lam = fn(x, y.clamp_min(0), num_classes, alpha, generator)
    return mixed, y, y[permutation], lam


def _mixed(loss_fn, y: torch.Tensor, y_b: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``loss_fn(y)``, or ``lam * loss_fn(y) + (1 - lam) * loss_fn(y_b)`` on a mixed batch."""
    return loss_fn(y) if y_b is None else lam * loss_fn(y) + (1 - lam) * loss_fn(y_b)


def attention_loss(student_features: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Attention transfer against a teacher's already reduced map [N, P] (as the teachers send it):
    batch mean of ``||attention_map(student) - teacher_map||^2``, as in ``losses.attention_transfer``."""
    student_map = attention_map(student_features.float())
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"attention maps differ in size: the student's features {tuple(student_features.shape[1:])} "
                         f"give {student_map.shape[1]} positions, the teacher's map has {teacher_map.shape[1]}; "
                         "use a student and loss.hint_teacher with the same spatial (or token) grid")
    return (student_map - teacher_map.detach().float()).pow(2).sum(-1).mean()


def _feature_widths(model, pool, teacher: str, x: torch.Tensor, device, want_hint: bool,
                    want_attention: bool) -> tuple[int, int]:
    """(student, teacher) hint widths from one probe forward of each, before the optimizer exists (so
    the projector's parameters join it); mismatched attention grids fail here, before any step."""
    m = _unwrap(model)
    was_training = m.training
    m.eval()  # no BatchNorm statistics from the probe
    with torch.no_grad():
        student = forward_with_features(m, x.to(device), want_hint, want_attention)
    m.train(was_training)
    teacher_shapes = pool.feature_shapes(teacher, x.numpy(), ("hint",) * want_hint + ("attention",) * want_attention)
    if want_attention:
        attention_loss(student["attention"], torch.zeros((len(x), *teacher_shapes["attention"])))
    return (student["hint"].shape[-1], teacher_shapes["hint"][-1]) if want_hint else (0, 0)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"])
    data: DistillData = ray.get(loop_config["data_ref"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = cfg.train
    if rank == 0 and loop_config.get("placement_group_file"):
        # Whoever stops this run from outside (a Tune scheduler) can then free its CPUs/GPUs.
        Path(loop_config["placement_group_file"]).write_text(ray.util.get_current_placement_group().id.hex())
    torch.manual_seed(t.seed)  # identical init on all ranks; DDP would broadcast rank 0's anyway
    np.random.seed(t.seed + rank)
    random.seed(t.seed + rank)

    # --- model, blend, optimizers -----------------------------------------------------------------
    student = build_model(cfg.student.arch, data.input_shape, data.num_classes, cfg.student.options)
    model = ray.train.torch.prepare_model(student)
    device = ray.train.torch.get_device()
    K = len(data.teacher_names)
    blend = TeacherBlend(cfg.blend.kind, K, num_classes=data.num_classes,
                         gate_in_features=int(np.prod(data.input_shape)), gate_hidden=cfg.blend.gate_hidden,
                         confidence_kind=cfg.blend.confidence_kind).to(device)
    blend_params = [p for p in blend.parameters() if p.requires_grad]
    blend_opt = torch.optim.Adam(blend_params, lr=cfg.blend.lr) if blend_params else None

    x_all = torch.as_tensor(data.train_x)
    y_all = torch.as_tensor(data.train_y)
    causal = data.task == "causal_lm"
    labeled = causal or bool((y_all >= 0).all())  # a language model's labels are its own next tokens
    teacher_all = torch.as_tensor(data.teacher_logits) if data.teacher_logits is not None else None
    topk_all = tuple(map(torch.as_tensor, data.teacher_topk)) if data.teacher_topk is not None else None
    val_teacher = torch.as_tensor(data.val_teacher_logits).float() if data.val_teacher_logits is not None else None
    pool = None
    if data.use_teachers and teacher_all is None and topk_all is None:
        from distill_ray.teachers import TeacherPool

        pool = TeacherPool.attach(data.teacher_handles)

    # Feature distillation (online): the student matches one teacher's features, through a learned
    # projector for hints (trained with the student, checkpointed) and directly for attention maps.
    hint_teacher = cfg.loss.hint_teacher or data.teacher_names[0]
    want_hint = pool is not None and cfg.loss.hint_weight > 0
    want_attention = pool is not None and cfg.loss.attention_weight > 0
    feature_request = {hint_teacher: ("hint",) * want_hint + ("attention",) * want_attention}
    projector = None
    if want_hint or want_attention:
        student_dim, teacher_dim = _feature_widths(model, pool, hint_teacher, x_all[:2], device, want_hint, want_attention)
        projector = HintProjector(student_dim, teacher_dim).to(device) if want_hint else None
    optimizer = _optimizer(cfg, [*model.parameters(), *(projector.parameters() if projector is not None else ())])

    per_rank_batch = max(1, t.batch_size // world)
    steps_per_epoch = max(1, len(y_all) // world // per_rank_batch)
    total_steps = t.epochs * steps_per_epoch  # upper bound for schedules: a partly open epoch has fewer steps
    epoch, step, batch_in_epoch, history = 0, 0, 0, []
    resumed_shard: torch.Tensor | None = None  # a mid-epoch checkpoint keeps the epoch's exact order

    # --- resume -----------------------------------------------------------------------------------
    # The run's own latest checkpoint wins; a fresh run may start from one handed over (PBT exploit).
    checkpoint = ray.train.get_checkpoint() or loop_config.get("initial_checkpoint")
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=True, map_location=device)
            history = json.loads((Path(ckpt_dir) / HISTORY_FILE).read_text())
        _unwrap(model).load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        blend.load_state_dict(state["blend"])
        if projector is not None:
            projector.load_state_dict(state["projector"])
        if blend_opt is not None and state.get("blend_optimizer"):
            blend_opt.load_state_dict(state["blend_optimizer"])
        # Learning rates come from the config, not the saved optimizer (there is no lr schedule): a PBT
        # segment resumed with a perturbed train.lr / blend.lr must train at the new rate.
        for group in optimizer.param_groups:
            group["lr"] = t.lr
        for group in (blend_opt.param_groups if blend_opt is not None else ()):
            group["lr"] = cfg.blend.lr
        epoch, step, batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        resumed_shard = state.get("shard")
        _set_rng_state(state["rng"])

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        """Every rank reports (report is a barrier); only rank 0 attaches the state."""
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"student": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "blend": blend.state_dict(), "projector": projector.state_dict() if projector is not None else None,
                        "blend_optimizer": blend_opt.state_dict() if blend_opt else None,
                        "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "rng": _rng_state(),
                        "stage": stage, "open_fraction": fraction, "shard": shard if batch_in_epoch else None},
                       Path(tmp) / STATE_FILE)
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    # --- epochs -----------------------------------------------------------------------------------
    model.train()
    stage, fraction, shard = 0, 1.0, None
    # A Population Based Training segment stops early at an epoch boundary; schedules still span t.epochs.
    last_epoch = min(t.epochs, loop_config.get("stop_at_epoch") or t.epochs)
    while epoch < last_epoch:
        if resumed_shard is not None:
            stage, fraction, shard, resumed_shard = state["stage"], state["open_fraction"], resumed_shard, None
        elif cfg.curriculum.scheduler == "confidence":
            with torch.no_grad():
                conf = torch.cat([forward_logits(_unwrap(model), x_all[i:i + 1024]).softmax(-1).max(-1).values
                                  for i in range(0, len(x_all), 1024)])
            weights = cur.ConfidenceSampling(tau=cfg.curriculum.confidence_tau).sampling_weights(conf)
            shard = cur.sample_for_rank(weights, len(y_all), epoch, t.seed, rank, world)
        else:
            stage, fraction = stage_and_fraction(cfg, epoch, step)
            difficulty = _difficulty_for_epoch(cfg, data, model, x_all, y_all)
            if difficulty is None:
                # Nothing ranks the data (the baseline has no teachers): a stage opens a seeded
                # random part of it, not the first rows in storage order.
                order = torch.arange(len(y_all)) if fraction >= 1.0 else \
                    torch.randperm(len(y_all), generator=torch.Generator().manual_seed(t.seed))
            else:
                order = cur.difficulty_order(difficulty)
            open_idx = cur.open_subset(order, fraction)
            shard = cur.shard_for_rank(open_idx, epoch, t.seed, rank, world)
        batches = [shard[i:i + per_rank_batch] for i in range(0, len(shard) - per_rank_batch + 1, per_rank_batch)]
        # Each batch is read (and mixed, with MixUp/CutMix) one step ahead: the teachers get exactly
        # the inputs the student trains on.
        batch = mix_batch(cfg, x_all[batches[batch_in_epoch]], y_all[batches[batch_in_epoch]], data.num_classes,
                          mix_generator(t.seed, rank, epoch, batch_in_epoch)) if batch_in_epoch < len(batches) else None
        next_targets = pool.submit(batch[0].numpy(), feature_request) if pool and batch is not None else None
        epoch_start, seen = time.perf_counter(), 0

        while batch_in_epoch < len(batches):
            idx = batches[batch_in_epoch]
            x, y, y_b, lam = batch  # y_b, lam: the partner labels and weight of a mixed batch (else None, 1)
            x, y, y_b = x.to(device), y.to(device), y_b.to(device) if y_b is not None else None
            nxt = batch_in_epoch + 1
            batch = mix_batch(cfg, x_all[batches[nxt]], y_all[batches[nxt]], data.num_classes,
                              mix_generator(t.seed, rank, epoch, nxt)) if nxt < len(batches) else None
            teacher_seq = None  # causal LM: per-token top-k (log-probs, indices) [K, B, L, k]
            if pool is not None:  # ask for the next batch before this step runs: teachers overlap the student
                answers = next_targets.result()
                next_targets = pool.submit(batch[0].numpy(), feature_request) if batch is not None else None
                if causal:
                    teacher, teacher_seq = None, tuple(
                        torch.stack([torch.as_tensor(answers[n][key]) for n in data.teacher_names]).to(device)
                        for key in ("topk_logprobs", "topk_indices"))
                else:
                    teacher = torch.stack([_teacher_logits(answers[n], data.num_classes)
                                           for n in data.teacher_names]).to(device)
            elif topk_all is not None:
                teacher, teacher_seq = None, (topk_all[0][:, idx].to(device), topk_all[1][:, idx].to(device))
            elif teacher_all is not None:
                teacher = teacher_all[:, idx].to(device).float()
            else:
                teacher = None
            temperature, alpha = temperature_and_alpha(cfg, step, total_steps, stage)
            if not data.use_teachers:
                alpha = 0.0

            # bf16 autocast covers the student's forward only; losses and blending stay in fp32.
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                # One DDP forward gives the logits and any features (see forward_with_features).
                out = forward_with_features(model, x, want_hint, want_attention)
            student_logits = out["logits"].float()
            parts: dict[str, float] = {} if y_b is None else {"mix_lam": lam}
            if causal:  # all-padding columns were cut from the student's input: cut labels and targets alike
                width = student_logits.shape[1]
                y = y[:, :width]
                if teacher_seq is not None:
                    teacher_seq = tuple(t[:, :, :width] for t in teacher_seq)
            if teacher is not None and labeled and blend_opt is not None:
                # Blend weights learn from ground truth only: the blended teachers' task loss.
                blend_loss = _mixed(lambda labels: blend.weight_loss(teacher, labels, features=x.flatten(1)), y, y_b, lam)
                blend_opt.zero_grad(set_to_none=True)
                blend_loss.backward()
                _allreduce_grads(blend, world)
                blend_opt.step()
                parts["blend_loss"] = blend_loss.item()
            if teacher is not None and alpha > 0 and cfg.loss.kind == "mse_logits":
                # Logit matching needs logits, not a mixture of distributions: blend logits linearly.
                weights = blend.weights(teacher, features=x.flatten(1), labeled=labeled).detach()
                target_logits = torch.einsum("nk,knc->nc", weights, teacher)
                kd = kd_divergence(student_logits, target_logits, kind="mse_logits", temperature=temperature)
            elif teacher is not None and alpha > 0:
                target = blend(teacher, temperature=temperature, features=x.flatten(1), labeled=labeled).detach()
                kd = kd_loss(cfg, student_logits, target, y if labeled else None, temperature)
            elif teacher_seq is not None and alpha > 0:
                kd, blend_parts = sequence_kd(cfg, blend, blend_opt, student_logits, teacher_seq, y, temperature, world)
                parts.update(blend_parts)
            else:
                kd = torch.zeros((), device=device)
            task = _mixed(lambda labels: label_smoothing_ce(student_logits, labels, smoothing=cfg.loss.label_smoothing),
                          y, y_b, lam) if labeled else torch.zeros((), device=device)
            hint = attention = torch.zeros((), device=device)
            if want_hint:  # FitNets: projected student features regress the hint teacher's
                teacher_hint = torch.as_tensor(answers[hint_teacher]["hint"]).to(device).float()
                hint = hint_loss(out["hint"].float(), teacher_hint, projector, kind=cfg.loss.hint_kind)
                parts["hint_loss"] = hint.item()
            if want_attention:  # attention transfer against the teacher's map
                attention = attention_loss(out["attention"], torch.as_tensor(answers[hint_teacher]["attention"]).to(device))
                parts["attention_loss"] = attention.item()
            loss = alpha * kd + (1 - alpha) * task + cfg.loss.hint_weight * hint + cfg.loss.attention_weight * attention

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if projector is not None:  # outside DDP: average its gradients like the blend's
                _allreduce_grads(projector, world)
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            seen += len(idx)
            _maybe_inject_failure(loop_config.get("fail_once_at_step"), step, rank)

            if step % cfg.tracking.log_every_steps == 0 or batch_in_epoch == len(batches):
                row = {"step": step, "epoch": epoch, "stage": stage, "open_fraction": fraction,
                       "temperature": temperature, "alpha": alpha, "loss": loss.item(), "kd_loss": kd.item(),
                       "task_loss": task.item(), "samples_per_s": seen * world / (time.perf_counter() - epoch_start),
                       **parts}
                if teacher_seq is not None:
                    for name, w in zip(data.teacher_names, blend.mean_weights().tolist()):
                        row[f"teacher_weight/{name}"] = w
                if teacher is not None:
                    # Unlabeled batches use confidence weights whatever the blend kind: log those.
                    used = blend.mean_weights() if labeled else \
                        blend.weights(teacher, features=x.flatten(1), labeled=False).detach().mean(0)
                    for name, w in zip(data.teacher_names, used.tolist()):
                        row[f"teacher_weight/{name}"] = w
                history.append(row)
            if step % t.checkpoint_every_steps == 0 and batch_in_epoch < len(batches):
                save_checkpoint({**history[-1], "kind": "step"} if history else {"step": step})

        val = _validate_sequences(model, data) if causal else _validate(model, data, val_teacher)
        last_step = next((r for r in reversed(history) if r.get("kind") != "epoch"), {})
        history.append({"step": step, "epoch": epoch, "stage": stage, "open_fraction": fraction, "kind": "epoch", **val})
        epoch, batch_in_epoch = epoch + 1, 0
        # The epoch report carries the latest step's loss parts, schedule and teacher weights too, so
        # dashboards (Tune's TensorBoard/W&B loggers) get every curve from one row per epoch.
        save_checkpoint({**last_step, **val, "epoch": epoch, "step": step, "kind": "epoch"})


def run_training(cfg: ExperimentConfig, data: DistillData, storage_path: str, run_name: str,
                 fail_once_at_step: dict | None = None, callbacks: list | None = None,
                 placement_group_file: str | None = None, resume_from: Checkpoint | None = None,
                 stop_at_epoch: int | None = None) -> ray.train.Result:
    """Run the loop on Ray Train. Re-running with the same (storage_path, run_name) resumes.

    ``callbacks`` are Ray Train callbacks (a Tune trial passes ``TuneReportCallback``);
    ``placement_group_file`` receives the workers' placement group id (see ``tune.py``).
    ``resume_from`` starts from another run's checkpoint (used when this run has none of its own)
    and ``stop_at_epoch`` ends after that many epochs while schedules still span ``train.epochs``:
    together they let Population Based Training run a trial in segments."""
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(cfg), "data_ref": ray.put(data),
                           "fail_once_at_step": fail_once_at_step, "placement_group_file": placement_group_file,
                           "stop_at_epoch": stop_at_epoch, "initial_checkpoint": resume_from},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **cfg.train.resources_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks or None),
    )
    return trainer.fit()


def load_trained_student(cfg: ExperimentConfig, data: DistillData, checkpoint: Checkpoint):
    """The student and its history from a run's final checkpoint (safe load, no pickle)."""
    student = build_model(cfg.student.arch, data.input_shape, data.num_classes, cfg.student.options)
    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=True, map_location="cpu")
        history = json.loads((Path(ckpt_dir) / HISTORY_FILE).read_text())
    student.load_state_dict(state["student"])
    return student.eval(), history, state


def export_student(cfg: ExperimentConfig, data: DistillData, student, directory: Path, card: dict) -> Path:
    spec = {"arch": cfg.student.arch, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "options": dict(cfg.student.options), "task": cfg.data.task}
    save_model(student, directory, spec)
    (directory / "distill_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    return directory
