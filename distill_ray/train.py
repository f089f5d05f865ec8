"""The distillation loop: one per-worker function that reads top to bottom, and the driver that runs it.

Per step: curriculum stage -> batch of this rank's shard -> soft targets (cached arrays, or the
teacher pool one batch ahead) -> blend with learned per-teacher weights (fit to labels, never to
the student's KD loss) -> ``alpha * KD + (1 - alpha) * task`` -> step. Checkpoints every N steps
carry everything needed to resume mid-epoch: student, optimizers, blend, counters, RNG, history.
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
from distill_ray.models import build_model, forward_logits, save_model

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
    from distill_ray.evaluate import lm_label_logprobs, perplexity

    m = _unwrap(model)
    x, y = torch.as_tensor(data.val_x), torch.as_tensor(data.val_y)
    label_logp, predicted = lm_label_logprobs(m, x, y)
    mask = y >= 0
    metrics = {"val_perplexity": perplexity(label_logp, y), "val_accuracy": (predicted == y)[mask].float().mean().item(),
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
    optimizer = _optimizer(cfg, model.parameters())

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
        if blend_opt is not None and state.get("blend_optimizer"):
            blend_opt.load_state_dict(state["blend_optimizer"])
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
                        "blend": blend.state_dict(),
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
        next_targets = pool.submit(x_all[batches[batch_in_epoch]].numpy()) if pool and batch_in_epoch < len(batches) else None
        epoch_start, seen = time.perf_counter(), 0

        while batch_in_epoch < len(batches):
            idx = batches[batch_in_epoch]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            teacher_seq = None  # causal LM: per-token top-k (log-probs, indices) [K, B, L, k]
            if pool is not None:  # ask for the next batch before this step runs: teachers overlap the student
                answers = next_targets.result()
                nxt = batch_in_epoch + 1
                next_targets = pool.submit(x_all[batches[nxt]].numpy()) if nxt < len(batches) else None
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
                student_logits = forward_logits(model, x)
            student_logits = student_logits.float()
            parts: dict[str, float] = {}
            if causal:  # all-padding columns were cut from the student's input: cut labels and targets alike
                width = student_logits.shape[1]
                y = y[:, :width]
                if teacher_seq is not None:
                    teacher_seq = tuple(t[:, :, :width] for t in teacher_seq)
            if teacher is not None and labeled and blend_opt is not None:
                # Blend weights learn from ground truth only: the blended teachers' task loss.
                blend_loss = blend.weight_loss(teacher, y, features=x.flatten(1))
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
            task = label_smoothing_ce(student_logits, y, smoothing=cfg.loss.label_smoothing) if labeled \
                else torch.zeros((), device=device)
            loss = alpha * kd + (1 - alpha) * task

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
