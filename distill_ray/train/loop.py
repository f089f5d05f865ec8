"""The distillation loop: one per-worker function that reads top to bottom, and the driver that runs it.

Data arrives as Ray Data streams: ``TorchTrainer(datasets=...)`` hands each rank its own rows of the
cached dataset (id, x, label, teacher targets, difficulty measures; ``streams.rank_datasets``) and
a split of validation; the worker reads them with ``ray.train.get_dataset_shard`` and keeps or
streams its shard (``epochs.RankData``). Nothing is ``ray.put`` and no split is held whole anywhere.
The worker's options are one frozen ``options.WorkerOptions``, built here on the driver.

Before the first step, learned teacher weights are fit to the validation labels (``train/validation.py``).
Per epoch: the curriculum's selection (stage, open fraction, order) and its batches. Per step: batch
of this rank's shard -> the teachers' signal (columns of the batch: from the cache, or from the
teacher stages upstream in online mode; a self_ema teacher's: the moving average of the student's
own weights run on the batch, updated after each step; none in the first ``loss.kd_warmup_epochs``)
-> student forward -> (causal LM, learned weights: the blend's own step) -> ``batch_loss``: per row ``alpha * KD + (1 - alpha) * task`` (unlabeled rows: KD
alone; + weighted hint and attention terms against one teacher's features, online mode) -> the
student's step at the scheduled learning rate. On-policy steps (``loss.on_policy``, causal LM): the
batch is the student's own responses to its prompts, scored by the teachers' services
(``rollouts.py``), and the loss the generalized JSD on the response tokens; a guard stops a run whose
responses collapse. The terms live in ``kd/objectives.py``. Checkpoints
every N steps carry ``state.TrainState``: everything needed to resume mid-epoch (student,
optimizers, blend, hint projector, a self_ema teacher's average, counters, RNG, history, and the
epoch's order for kept shards or the count of batches done for streamed ones).
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distill_ray.config import ExperimentConfig
from distill_ray.console import write_progress
from distill_ray.kd.blending import TeacherBlend
from distill_ray.kd.objectives import DenseLogits, TokenTopK, _allreduce_grads, batch_loss, hint_projector, \
    planned_steps, teacher_signal, temperature_and_alpha, token_blend_loss
from distill_ray.kd.on_policy import CollapseGuard, is_on_policy_step, rollout_metrics
from distill_ray.kd.schedules import kd_active, lr_factor
from distill_ray.kd.self_ema import ema_copy, ema_update
from distill_ray.models import build_student, forward_logits, forward_with_features, save_model, unwrap_model
from distill_ray.teachers.service import TeacherService
from distill_ray.train.epochs import RankData
from distill_ray.train.options import WorkerOptions
from distill_ray.train.rollouts import student_rollout
from distill_ray.train.stages import EpochPlan, MixSettings, rank_stream, rows_of_rank
from distill_ray.train.state import HISTORY_FILE, STATE_FILE, TrainState
from distill_ray.train.validation import _peak_rss_mb, fit_blend_on_validation, validate

__all__ = ["HISTORY_FILE", "STATE_FILE", "TrainInputs", "TrainingStopped", "export_student", "load_trained_student", "run_training",
           "train_loop_per_worker"]


@dataclass(frozen=True)
class TrainInputs:
    """What the driver hands Ray Train: lazy datasets and small facts about them, never rows.

    ``train`` rows: ``id``, ``x``, ``label`` (-1 unlabeled; [L] next tokens for causal LM), the
    teachers' target columns in cached mode, and ``difficulty/{measure}``; ``index``: the same rows'
    ``id`` and ``difficulty/*`` only (what a streaming curriculum ranks). ``val`` rows: ``id``, ``x``,
    ``label`` and the teachers' targets (for agreement). ``online_teachers``: in online mode, the
    teacher stages every rank's stream passes through; ``mix``: MixUp/CutMix settings of the epoch
    stage; ``epoch_stage``: whether streamed epochs go through it (a curriculum or mixing).
    """

    train: Any  # ray.data.Dataset
    val: Any
    teacher_names: tuple[str, ...]
    num_classes: int
    input_shape: tuple[int, ...]
    train_rows: int
    train_bytes: int
    index: Any = None
    task: str = "classification"
    topk: int | None = None
    all_labeled: bool = True
    use_teachers: bool = True  # False trains the same student from labels alone (the baseline)
    online_teachers: tuple[TeacherService, ...] = ()  # online mode: one service per teacher
    mix: MixSettings | None = None
    keep_shard: bool = True
    epoch_stage: bool = False
    feature_shapes: dict = field(default_factory=dict)  # online hint/attention: the teacher's, per feature
    probe: Any = None  # two input rows, for the student's own feature widths
    scorers: tuple[TeacherService, ...] = ()  # on-policy KD: the services that score the student's responses
    eos_id: int | None = None  # on-policy KD: the tokenizer's end of sequence, and its padding
    pad_id: int = 0
    class_counts: tuple[int, ...] = ()  # classifiers: labeled train rows per class (the long-tail terms')

    def datasets(self, world: int, plan=None) -> dict[str, Any]:
        """TorchTrainer's datasets: per rank its train stream, its index and its validation rows."""
        out = {}
        for r in range(world):
            out[f"train_{r}"] = rank_stream(self.train, r, world, plan if self.epoch_stage else None, self.mix,
                                            self.online_teachers)
            if not self.keep_shard:  # only a streamed shard ranks its rows from the index
                out[f"index_{r}"] = rows_of_rank(
                    self.index if self.index is not None else self.train.select_columns(["id"]), r, world)
            out[f"val_{r}"] = rows_of_rank(self.val, r, world)
        return out


class TrainingStopped(RuntimeError):
    """The worker stopped the run on purpose (on-policy responses collapsed); the message says why."""


def _optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def _trace_batch(path: str | None, rank: int, epoch: int, step: int, ids: torch.Tensor) -> None:
    """For tests and drills: append ``rank epoch step id,id,...`` per trained batch, so a run's
    resume guarantee (which samples each step trained, before and after a restart) can be checked."""
    if path:
        with open(path, "a") as f:
            f.write(f"{rank} {epoch} {step} {','.join(map(str, ids.tolist()))}\n")


def _maybe_inject_failure(spec: dict | None, step: int, rank: int) -> None:
    """Fault injection for tests and drills: rank 0 dies once at ``spec['step']`` (a marker file
    remembers it happened, so the restarted worker carries on)."""
    if spec and rank == 0 and step == spec["step"] and not Path(spec["marker"]).exists():
        Path(spec["marker"]).write_text(str(step))
        raise RuntimeError(f"injected failure at step {step}")


def _all_ranks_have(batch: dict | None, world: int) -> bool:
    """True while every rank still has a batch: DDP ranks must take the same number of steps, and
    hashed shards differ by a few rows."""
    if world == 1:
        return batch is not None
    flag = torch.tensor([1 if batch is not None else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _any_rank(message: str | None, world: int) -> str | None:
    """``message`` if this or any other rank has one (every rank must take the same branch)."""
    if world == 1:
        return message
    flag = torch.tensor([1 if message else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (message or "on-policy responses collapsed on another rank") if flag.item() else None


def _start_worker(opts: WorkerOptions, rank: int) -> None:
    """Placement group file (rank 0), torch threads and seeds, before anything else runs."""
    t = opts.config.train
    if rank == 0 and opts.placement_group_file:
        # Whoever stops this run from outside (a Tune scheduler) can then free its CPUs/GPUs.
        Path(opts.placement_group_file).write_text(ray.util.get_current_placement_group().id.hex())
    # As many threads as CPUs reserved: torch's default (every core) oversubscribes a shared machine,
    # 14x slower per step on 2 busy cores in bench/overhead.py.
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)  # identical init on all ranks; DDP would broadcast rank 0's anyway
    np.random.seed(t.seed + rank)
    random.seed(t.seed + rank)


def _train_state(opts: WorkerOptions, device) -> TrainState:
    """The student (prepared by Ray Train: DDP with several ranks), the blend, the hint projector and
    the optimizers, built in this order (the seeded RNG draws their initial weights), at step 0."""
    cfg = opts.config
    model = ray.train.torch.prepare_model(
        build_student(cfg.student, opts.input_shape, opts.num_classes))
    # A run with no teacher at all (born-again generation 1) keeps a one-teacher blend it never reads.
    blend = TeacherBlend(cfg.blend.kind, max(1, len(opts.teacher_names)), num_classes=opts.num_classes,
                         gate_in_features=int(np.prod(opts.input_shape)), gate_hidden=cfg.blend.gate_hidden,
                         confidence_kind=cfg.blend.confidence_kind).to(device)
    # A classifier's blend is fit once, before training, on validation labels (fit_blend_on_validation);
    # a language model's learns along the way from each teacher's log-probability of the true token.
    blend_params = [p for p in blend.parameters() if p.requires_grad]
    blend_opt = torch.optim.Adam(blend_params, lr=cfg.blend.lr) if blend_params and opts.causal else None
    # Feature distillation (online): the student matches one teacher's features (columns of the
    # batch), through a learned projector for hints (trained with the student, checkpointed).
    projector = hint_projector(model, opts.probe, opts.feature_shapes, device, opts.want_hint, opts.want_attention) \
        if opts.want_hint or opts.want_attention else None
    optimizer = _optimizer(cfg, [*model.parameters(), *(projector.parameters() if projector is not None else ())])
    # Self-distillation: the teacher is the average of the student's own weights, kept here (self_ema.py).
    ema = ema_copy(unwrap_model(model)) if opts.use_teachers and self_ema_decay(cfg) is not None else None
    return TrainState(model, optimizer, blend, projector, blend_opt, ema=ema)


def self_ema_decay(cfg: ExperimentConfig) -> float | None:
    """The decay of the config's self_ema teacher (the only teacher when there is one), else None."""
    return next((t.ema_decay for t in cfg.teachers if t.source == "self_ema"), None)


def _step_blend(blend: TeacherBlend, blend_opt: torch.optim.Optimizer, blend_loss: torch.Tensor, world: int) -> None:
    """The learned teacher weights' own step (causal LM), gradients averaged over ranks."""
    blend_opt.zero_grad(set_to_none=True)
    blend_loss.backward()
    _allreduce_grads(blend, world)
    blend_opt.step()


def _step_row(state: TrainState, temperature: float, alpha: float, loss, samples_per_s: float, lam, signal, y,
              blend_loss, names: tuple[str, ...], rollout=None, logits=None) -> dict[str, Any]:
    """A logged step's history row: counters, schedule, loss parts, throughput, teacher weights, and on
    an on-policy step what the student wrote (``rollout_metrics``)."""
    row = {"step": state.step, "epoch": state.epoch, "stage": state.selection.stage,
           "open_fraction": state.selection.fraction, "temperature": temperature, "alpha": alpha,
           "lr": state.optimizer.param_groups[0]["lr"], **loss.metrics(), "samples_per_s": samples_per_s}
    if lam is not None:
        row["mix_lam"] = lam.mean().item()
    if isinstance(signal, TokenTopK) and (share := signal.aligned_share(y)) is not None:
        row["aligned_share"] = share
    if blend_loss is not None:
        row["blend_loss"] = blend_loss.item()
    row.update(loss.feature_metrics())
    if rollout is not None:
        row.update(rollout_metrics(rollout, signal, logits.detach()))
    if signal is not None:
        for name, w in zip(names, state.blend.mean_weights().tolist()):
            row[f"teacher_weight/{name}"] = w
    return row


def _validate_epoch(state: TrainState, data: RankData, opts: WorkerOptions, first_batch_s: float, world: int,
                    device) -> dict[str, Any]:
    """The epoch's validation metrics (summed across ranks), the best epoch kept, the history's epoch row."""
    val = {**validate(state.model, data.val_batches(), opts.teacher_names, opts.topk, opts.causal, world, device),
           "peak_rss_mb": _peak_rss_mb(world)}
    # The student is reported at its best validation epoch, never at an arbitrary last one.
    # Ties on accuracy are common on a small validation split (274/278 for 10 epochs running): the
    # lower validation loss breaks them, so an undertrained early epoch is not the one reported.
    state.keep_if_best((-val["val_perplexity"], 0.0) if opts.causal else (val["val_accuracy"], -val.get("val_loss", 0.0)))
    val.update(best_epoch=state.best_epoch, **state.blend_fit)
    state.history.append({"step": state.step, "epoch": state.epoch, "stage": state.selection.stage,
                          "open_fraction": state.selection.fraction, "kind": "epoch", "first_batch_s": first_batch_s,
                          **val})
    return val


def _step_inputs(cols: dict, opts: WorkerOptions, model, step: int, device, kd_on: bool, ema=None) -> tuple:
    """A step's ``(x, y, y_b, lam, signal, rollout)``: inputs, labels (a mixed row, MixUp/CutMix upstream,
    counts two: ``y_b`` weighed by ``lam``) and the teachers' signal (None while ``kd_on`` is off: the KD
    warm-up; a self_ema teacher's: the moving average's logits on this batch); on an on-policy step
    (``loss.on_policy``), the student's own responses to the batch's prompts scored by the teachers, in
    place of the batch (``rollout``, else None)."""
    x, y = cols["x"].to(device), cols["label"].long().to(device)
    if opts.scorers and kd_on and is_on_policy_step(opts.config.loss.on_policy.lmbda, opts.config.train.seed, step):
        rollout, signal = student_rollout(model, x, y, cols["id"], step, opts, device)  # the batch's targets unread
        return rollout.x, rollout.labels, None, None, signal, rollout
    y_b = cols["label_b"].long().to(device) if "label_b" in cols else None
    lam = cols["mix_lam"].float().to(device) if "mix_lam" in cols else None
    if ema is not None:
        return x, y, y_b, lam, DenseLogits(forward_logits(ema, x).float()[None]) if kd_on else None, None
    signal = teacher_signal(cols, opts.teacher_names, opts.num_classes, opts.topk, opts.causal, device) \
        if kd_on else None
    return x, y, y_b, lam, signal, None


def train_loop_per_worker(loop_config: dict) -> None:
    opts: WorkerOptions = loop_config["options"]
    cfg, t, names, causal = opts.config, opts.config.train, opts.teacher_names, opts.causal
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    _start_worker(opts, rank)

    # --- data: this rank's own rows, kept in memory or streamed every epoch ----------------------------
    data = RankData(opts, rank, per_rank_batch=max(1, t.batch_size // world))

    # --- model, blend, optimizers, in one TrainState --------------------------------------------------
    device = ray.train.torch.get_device()
    state, long_tail = _train_state(opts, device), opts.long_tail and opts.long_tail.to(device)  # moved once
    model, optimizer, blend, projector, blend_opt = \
        state.model, state.optimizer, state.blend, state.projector, state.blend_optimizer
    total_steps = planned_steps(cfg, opts.train_rows, world)  # what the lr, T and alpha schedules span

    # --- resume -----------------------------------------------------------------------------------
    # The run's own latest checkpoint wins; a fresh run may start from one handed over (PBT exploit).
    checkpoint = ray.train.get_checkpoint() or opts.initial_checkpoint
    if checkpoint:
        state.restore(checkpoint, device)
        # Learning rates come from the config (and the step), not the saved optimizer: a PBT segment
        # resumed with a perturbed train.lr / blend.lr must train at the new rate.
        for group in (blend_opt.param_groups if blend_opt is not None else ()):
            group["lr"] = cfg.blend.lr

    # --- teacher weights, fit to held-out labels before the student trains (loss, rows: epoch rows) ---
    if opts.use_teachers and not causal and blend.is_learned and not checkpoint and state.ema is None:
        state.blend_fit = fit_blend_on_validation(cfg, blend, data.val_batches(), names, opts.num_classes, opts.topk,
                                                  device, world)

    # --- epochs -----------------------------------------------------------------------------------
    model.train()
    shown_val: dict[str, float] = {}  # the latest validation score, for the driver's progress bar
    # A Population Based Training segment stops early at an epoch boundary; schedules still span t.epochs.
    last_epoch = min(t.epochs, opts.stop_at_epoch or t.epochs)
    guard, stopped = CollapseGuard(cfg.loss.on_policy.collapse_steps, opts.eos_id is not None), None  # on-policy
    while state.epoch < last_epoch:
        state.selection, batches = data.epoch(state.epoch, state.step, state.batch_in_epoch, model, device,
                                              resumed=state.resumed)
        state.resumed = None
        asked = time.perf_counter()
        cols = next(batches, None)
        # The wait for an epoch's first batch is the pipeline filling (online: teacher stages starting
        # anew); kept apart from samples_per_s, which is the steady rate after it.
        epoch_start, seen = time.perf_counter(), 0
        first_batch_s = epoch_start - asked
        # Whether every rank has another batch is decided together, once per step: logging and
        # checkpointing (ray.train.report waits for every rank) must make the same choice on all ranks.
        more = _all_ranks_have(cols, world)
        while more:
            # --- batch: inputs, labels, the teachers' signal; on-policy steps: the student's own responses
            # (the first loss.kd_warmup_epochs: no signal, task loss alone)
            kd_on = opts.use_teachers and kd_active(state.epoch, cfg.loss.kd_warmup_epochs)
            x, y, y_b, lam, signal, rollout = _step_inputs(cols, opts, model, state.step, device, kd_on, state.ema)
            temperature, alpha = temperature_and_alpha(cfg, state.step, total_steps, state.selection.stage)
            alpha = alpha if kd_on else 0.0
            for group in optimizer.param_groups:
                group["lr"] = t.lr * lr_factor(t.lr_schedule, state.step, total_steps, t.warmup_fraction)

            # --- forward: bf16 autocast covers the student only; losses and blending stay in fp32.
            # One DDP forward gives the logits and any features (see forward_with_features).
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                out = forward_with_features(model, x, opts.want_hint, opts.want_attention)
            logits = out["logits"].float()
            if causal:  # all-padding columns were cut from the student's input: cut labels and targets alike
                y = y[:, :logits.shape[1]]
                signal = signal.cut(logits.shape[1]) if isinstance(signal, TokenTopK) else signal

            # --- the blend's step (causal LM, learned weights), before the KD term reads its weights
            # (learned from the references' true tokens: an on-policy batch's labels are the student's own)
            blend_loss = token_blend_loss(blend, signal, y, logits.shape[-1]) \
                if blend_opt is not None and isinstance(signal, TokenTopK) and rollout is None else None
            if blend_loss is not None:
                _step_blend(blend, blend_opt, blend_loss, world)

            # --- loss: per row alpha * KD + (1 - alpha) * task, unlabeled rows KD alone; hint, attention;
            # on-policy: the generalized JSD to the teachers on the student's response tokens alone
            loss = batch_loss(cfg, blend, logits, signal, x, y, temperature=temperature, alpha=alpha, causal=causal,
                              y_b=y_b, lam=lam, features=out, projector=projector, on_policy=rollout is not None,
                              hint_target=cols[f"{opts.hint_teacher}/hint"].to(device) if opts.want_hint else None,
                              attention_target=cols[f"{opts.hint_teacher}/attention"].to(device)
                              if opts.want_attention else None, long_tail=long_tail)

            # --- the student's step
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            if projector is not None:  # outside DDP: average its gradients like the blend's
                _allreduce_grads(projector, world)
            optimizer.step()
            if state.ema is not None:  # every rank averages the same weights: the same teacher on each
                ema_update(state.ema, unwrap_model(model), self_ema_decay(cfg))
            state.step, state.batch_in_epoch, seen = state.step + 1, state.batch_in_epoch + 1, seen + len(y)
            _trace_batch(opts.trace_file, rank, state.epoch, state.step, cols["id"])
            cols = next(batches, None)
            more = _all_ranks_have(cols, world)
            _maybe_inject_failure(opts.fail_once_at_step, state.step, rank)
            stopped = _any_rank(guard.update(rollout), world) if rollout is not None else None  # collapsed writing

            # --- log, checkpoint
            if state.step % cfg.tracking.log_every_steps == 0 or not more or stopped:
                row = _step_row(state, temperature, alpha, loss, seen * world / (time.perf_counter() - epoch_start),
                                lam, signal, y, blend_loss, names, rollout, logits)
                state.history.append(row)
                if rank == 0:
                    write_progress(opts.progress_file, step=state.step, total=total_steps, epoch=state.epoch + 1,
                                   loss=round(row["loss"], 4), **shown_val)
            if stopped:  # every rank stops here together; run_training raises with the reason
                state.report({**state.history[-1], "kind": "stopped", "stopped": stopped}, rank)
                return
            if state.step % t.checkpoint_every_steps == 0 and more:
                state.report({**state.history[-1], "kind": "step"} if state.history else {"step": state.step}, rank)

        # --- validation, the best epoch, the epoch's report and checkpoint ------------------------------
        if (state.epoch + 1) % t.eval_every_epochs and state.epoch + 1 < last_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0  # no validation, report or checkpoint
            continue
        val = _validate_epoch(state, data, opts, first_batch_s, world, device)  # + the history's epoch row
        shown_val = {k: round(val[k], 4) for k in ("val_accuracy", "val_perplexity") if k in val}
        last_step = next((r for r in reversed(state.history) if r.get("kind") != "epoch"), {})
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        # The epoch report carries the latest step's loss parts, schedule and teacher weights too, so
        # dashboards (Tune's TensorBoard/W&B loggers) get every curve from one row per epoch.
        state.report({**last_step, **val, "epoch": state.epoch, "step": state.step, "kind": "epoch"}, rank)


def run_training(cfg: ExperimentConfig, inputs: TrainInputs, storage_path: str, run_name: str,
                 fail_once_at_step: dict | None = None, callbacks: list | None = None,
                 placement_group_file: str | None = None, resume_from: Checkpoint | None = None,
                 stop_at_epoch: int | None = None, trace_file: str | None = None,
                 progress_file: str | None = None) -> ray.train.Result:
    """Run the loop on Ray Train. Re-running with the same (storage_path, run_name) resumes.

    Each rank gets its own rows of train and val as unsplit datasets (``train_{rank}``,
    ``val_{rank}``, ``index_{rank}``; see ``TrainInputs.datasets``): disjoint, fixed by the sample id,
    the same after a restart. ``callbacks`` are Ray Train callbacks (a Tune trial passes
    the one of ``tune/reports.py``); ``placement_group_file`` receives the workers' placement group id (see
    ``tune/sweep.py``). ``resume_from`` starts from another run's checkpoint (used when this run has none of
    its own) and ``stop_at_epoch`` ends after that many epochs while schedules still span
    ``train.epochs``: together they let Population Based Training run a trial in segments."""
    world = cfg.train.num_workers
    if cfg.student.init.teacher is not None and cfg.student.arch != "hf_dir":
        raise ValueError("student.init asks for a student cut from a teacher, and this config was not cut: pass it "
                         "through distill_ray.lm.cut.student_from_teacher first")
    if inputs.use_teachers and cfg.loss.kind == "dkd" and not inputs.all_labeled:
        raise ValueError("loss.kind=dkd splits the KD term at each row's label, and some train rows are unlabeled: "
                         "use a divergence (forward_kl, js, ...) for partly labeled data")
    if not inputs.keep_shard and (cfg.curriculum.scheduler == "confidence" or (
            "student_loss" in cfg.curriculum.measurers and cfg.curriculum.scheduler != "none")):
        raise ValueError("curriculum.scheduler=confidence and the student_loss measurer score every row with the "
                         "live student each epoch, which needs the shard in memory: set train.data_mode=memory "
                         "(or raise train.memory_budget_mb), in cached mode without mixing, or use teacher-based "
                         "measurers")
    plan = EpochPlan.remote() if inputs.epoch_stage else None
    datasets = inputs.datasets(world, plan)
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True  # a streamed epoch has one order, so a resumed epoch can skip what it did
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"options": WorkerOptions.for_run(
            cfg, inputs, epoch_plan=plan, fail_once_at_step=fail_once_at_step,
            placement_group_file=placement_group_file, stop_at_epoch=stop_at_epoch, initial_checkpoint=resume_from,
            trace_file=trace_file, progress_file=progress_file)},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **cfg.train.resources_per_worker}),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options={name: options for name in datasets if name.startswith("train_")}),
        run_config=RunConfig(name=run_name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks or None),
    )
    from distill_ray.train.controller_env import controller_env

    try:
        with controller_env(world):  # polls that end a run when it ends (see controller_env.py)
            result = trainer.fit()
        if (result.metrics or {}).get("stopped"):  # the worker stopped the run, and says why
            raise TrainingStopped(result.metrics["stopped"])
        return result
    finally:
        if plan is not None:
            ray.kill(plan)


def load_trained_student(cfg: ExperimentConfig, inputs: TrainInputs, checkpoint: Checkpoint):
    """The student and its history from a run's final checkpoint (safe load, no pickle)."""
    student = build_student(cfg.student, inputs.input_shape, inputs.num_classes)
    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=True, map_location="cpu")
        history = json.loads((Path(ckpt_dir) / HISTORY_FILE).read_text())
    # The best validation epoch's weights (runs from before best-epoch tracking: the last ones).
    student.load_state_dict(state.get("best_student") or state["student"])
    return student.eval(), history, state


def export_student(cfg: ExperimentConfig, inputs: TrainInputs, student, directory: Path, card: dict,
                   data_info: dict | None = None) -> Path:
    """The student as a model directory; ``data_info`` (label names, tabular transform, tokenizer
    facts) goes into its spec so Serve answers with label names and preprocesses raw requests."""
    spec = {"arch": cfg.student.arch, "input_shape": list(inputs.input_shape), "num_classes": inputs.num_classes,
            "options": dict(cfg.student.options), "task": cfg.data.task}
    if cfg.data.task == "causal_lm":  # how Serve's /generate writes a plain prompt for this student
        spec["prompt_format"] = "chat" if cfg.data.messages_field else "plain"
    if data_info:
        spec.update({"class_names": list(data_info.get("class_names") or ()),
                     "feature_fields": list(data_info.get("feature_fields") or ()),
                     "transform": data_info.get("transform"), "data_kind": data_info.get("kind"),
                     "image_mode": data_info.get("image_mode")})
    save_model(student, directory, spec)
    (directory / "distill_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    return directory
