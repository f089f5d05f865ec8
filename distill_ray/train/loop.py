"""The distillation loop: one per-worker function that reads top to bottom, and the driver that runs it.

Data arrives as Ray Data streams: ``TorchTrainer(datasets=...)`` hands each rank its own rows of the
cached dataset (id, x, label, teacher targets, difficulty measures; ``streams.rank_datasets``) and
a split of validation; the worker reads them with ``ray.train.get_dataset_shard`` and keeps or
streams its shard (``streams.KeptShard`` / ``StreamedShard``). Nothing is ``ray.put`` and no split
is held whole anywhere.

Before the first step, learned teacher weights are fit to the validation labels (``train/validation.py``).
Per step: curriculum stage -> batch of this rank's shard -> soft targets (columns of the batch: from
the cache, or from the teacher stages upstream in online mode) -> blend at the fitted weights ->
per row ``alpha * KD + (1 - alpha) * task`` (unlabeled rows: KD alone; + weighted hint and attention
terms against one teacher's features, online mode) -> step at the scheduled learning rate. The
terms themselves live in ``kd/objectives.py``. Checkpoints every N steps
carry everything needed to resume mid-epoch: student, optimizers, blend, hint projector, counters,
RNG, history, and the epoch's order (kept shards) or the count of batches done (streamed shards).
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distill_ray.kd import curriculum as cur
from distill_ray.kd.blending import TeacherBlend
from distill_ray.config import ExperimentConfig, config_from_dict, config_to_dict
from distill_ray.console import write_progress
from distill_ray.kd.losses import hint_loss
from distill_ray.models import build_model, forward_logits, forward_with_features, save_model, unwrap_model
from distill_ray.kd.objectives import _allreduce_grads, attention_loss, batch_targets, classifier_kd, hint_projector, \
    planned_steps, sequence_kd, stage_and_fraction, task_loss, temperature_and_alpha
from distill_ray.train.validation import _peak_rss_mb, fit_blend_on_validation, validate
from distill_ray.kd.schedules import lr_factor
from distill_ray.train.stages import EpochPlan, MixSettings, rank_stream, rows_of_rank
from distill_ray.train.streams import KeptShard, StreamedShard, fused_difficulty, open_ids_for
from distill_ray.teachers.runner import TeacherSpec

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
ECE_BINS = 15


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
    online_teachers: tuple[TeacherSpec, ...] = ()
    mix: MixSettings | None = None
    keep_shard: bool = True
    epoch_stage: bool = False
    feature_shapes: dict = field(default_factory=dict)  # online hint/attention: the teacher's, per feature
    probe: Any = None  # two input rows, for the student's own feature widths

    def meta(self) -> dict[str, Any]:
        """The plain facts a worker needs (datasets travel through TorchTrainer)."""
        return {"teacher_names": list(self.teacher_names), "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "train_rows": self.train_rows, "task": self.task,
                "topk": self.topk, "all_labeled": self.all_labeled, "use_teachers": self.use_teachers,
                "keep_shard": self.keep_shard, "feature_shapes": dict(self.feature_shapes), "probe": self.probe}

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


def _optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


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


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"])
    meta = loop_config["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = cfg.train
    if rank == 0 and loop_config.get("placement_group_file"):
        # Whoever stops this run from outside (a Tune scheduler) can then free its CPUs/GPUs.
        Path(loop_config["placement_group_file"]).write_text(ray.util.get_current_placement_group().id.hex())
    # As many threads as CPUs reserved: torch's default (every core) oversubscribes a shared machine,
    # 14x slower per step on 2 busy cores in bench/overhead.py.
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)  # identical init on all ranks; DDP would broadcast rank 0's anyway
    np.random.seed(t.seed + rank)
    random.seed(t.seed + rank)
    names, num_classes = tuple(meta["teacher_names"]), meta["num_classes"]
    causal = meta["task"] == "causal_lm"
    use_teachers = meta["use_teachers"]

    # --- data: this rank's own rows, kept in memory or streamed every epoch ----------------------------
    # A streamed epoch is posted to the plan first: its Ray Data epoch stage (curriculum, mixing) and
    # the online teachers downstream of it work on exactly the rows this epoch trains.
    keep, plan = meta["keep_shard"], loop_config.get("epoch_plan")
    val_iterator = ray.train.get_dataset_shard(f"val_{rank}")
    if keep:
        shard = KeptShard(ray.train.get_dataset_shard(f"train_{rank}"))
        val_kept = KeptShard(val_iterator, allow_empty=True)  # read once, like the train shard
    else:
        shard = StreamedShard(ray.train.get_dataset_shard(f"train_{rank}"), ray.train.get_dataset_shard(f"index_{rank}"),
                              t.shuffle_buffer_rows)

    def val_batches():
        size = 256 if causal else 1024
        return val_kept.all_batches(size) if keep else val_iterator.iter_torch_batches(batch_size=size, device="cpu")

    # --- model, blend, optimizers -----------------------------------------------------------------
    student = build_model(cfg.student.arch, tuple(meta["input_shape"]), num_classes, cfg.student.options)
    model = ray.train.torch.prepare_model(student)
    device = ray.train.torch.get_device()
    blend = TeacherBlend(cfg.blend.kind, len(names), num_classes=num_classes,
                         gate_in_features=int(np.prod(meta["input_shape"])), gate_hidden=cfg.blend.gate_hidden,
                         confidence_kind=cfg.blend.confidence_kind).to(device)
    blend_params = [p for p in blend.parameters() if p.requires_grad]
    # A classifier's blend is fit once, before training, on validation labels (fit_blend_on_validation);
    # a language model's learns along the way from each teacher's log-probability of the true token.
    blend_opt = torch.optim.Adam(blend_params, lr=cfg.blend.lr) if blend_params and causal else None
    # Feature distillation (online): the student matches one teacher's features (columns of the
    # batch), through a learned projector for hints (trained with the student, checkpointed).
    hint_teacher = cfg.loss.hint_teacher or names[0]
    want_hint = use_teachers and "hint" in meta["feature_shapes"]
    want_attention = use_teachers and "attention" in meta["feature_shapes"]
    projector = hint_projector(model, meta["probe"], meta["feature_shapes"], device, want_hint, want_attention) \
        if want_hint or want_attention else None
    optimizer = _optimizer(cfg, [*model.parameters(), *(projector.parameters() if projector is not None else ())])

    per_rank_batch = max(1, t.batch_size // world)
    total_steps = planned_steps(cfg, meta["train_rows"], world)  # what the lr, T and alpha schedules span
    epoch, step, batch_in_epoch, history = 0, 0, 0, []
    best: dict[str, Any] = {"score": None, "epoch": None, "student": None}  # the student at its best val epoch
    blend_fit: dict[str, float] = {}
    shown_val: dict[str, float] = {}  # the latest validation score, for the driver's progress bar
    resumed_order: torch.Tensor | None = None  # a kept shard's mid-epoch checkpoint keeps the epoch's order

    # --- resume -----------------------------------------------------------------------------------
    # The run's own latest checkpoint wins; a fresh run may start from one handed over (PBT exploit).
    checkpoint = ray.train.get_checkpoint() or loop_config.get("initial_checkpoint")
    state: dict[str, Any] = {}
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=True, map_location=device)
            history = json.loads((Path(ckpt_dir) / HISTORY_FILE).read_text())
        unwrap_model(model).load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        blend.load_state_dict(state["blend"])
        if projector is not None:
            projector.load_state_dict(state["projector"])
        if blend_opt is not None and state.get("blend_optimizer"):
            blend_opt.load_state_dict(state["blend_optimizer"])
        # Learning rates come from the config (and the step), not the saved optimizer: a PBT segment
        # resumed with a perturbed train.lr / blend.lr must train at the new rate.
        for group in (blend_opt.param_groups if blend_opt is not None else ()):
            group["lr"] = cfg.blend.lr
        epoch, step, batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        best = {"score": state.get("best_score"), "epoch": state.get("best_epoch"), "student": state.get("best_student")}
        blend_fit = state.get("blend_fit") or {}
        resumed_order = state.get("order") if keep else None
        _set_rng_state(state["rng"])

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        """Every rank reports (report is a barrier); only rank 0 attaches the state."""
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"student": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "blend": blend.state_dict(), "projector": projector.state_dict() if projector is not None else None,
                        "blend_optimizer": blend_opt.state_dict() if blend_opt else None,
                        "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "rng": _rng_state(),
                        "stage": stage, "open_fraction": fraction,
                        "order": order if keep and batch_in_epoch else None,
                        "best_score": best["score"], "best_epoch": best["epoch"], "best_student": best["student"],
                        "blend_fit": blend_fit},
                       Path(tmp) / STATE_FILE)
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def student_scores(kind: str) -> torch.Tensor:
        """Per row of a kept shard: the student's loss (``student_loss``) or confidence, live."""
        x_all, y_all = shard.columns["x"], shard.columns["label"].long()
        with torch.no_grad():
            logits = torch.cat([forward_logits(unwrap_model(model), x_all[i:i + 1024].to(device)).float().cpu()
                                for i in range(0, len(x_all), 1024)])
        return cur.student_loss(logits, y_all) if kind == "loss" else logits.softmax(-1).max(-1).values

    def epoch_batches() -> Iterator[dict[str, torch.Tensor]]:
        """This epoch's batches (from ``batch_in_epoch`` on) and, as side effects, stage/fraction/order."""
        nonlocal stage, fraction, order, resumed_order
        stage, fraction = stage_and_fraction(cfg, epoch, step)
        # Difficulty measures only matter while the curriculum holds data back (a streamed shard scans
        # its index once, on first use).
        measures = shard.measures() if use_teachers and (keep or fraction < 1.0) else {}
        if not keep:
            difficulty = fused_difficulty(measures, cfg.curriculum.measurers, cfg.curriculum.rrf_k)
            open_ids = open_ids_for(shard.ids(), difficulty, fraction, t.seed) if fraction < 1.0 else None
            if plan is not None:
                ray.get(plan.set.remote(rank, epoch, open_ids))
            return shard.epoch_batches(epoch, t.seed + rank, per_rank_batch, start=batch_in_epoch)
        if resumed_order is not None:
            stage, fraction, order, resumed_order = state["stage"], state["open_fraction"], resumed_order, None
        elif cfg.curriculum.scheduler == "confidence":
            weights = cur.ConfidenceSampling(tau=cfg.curriculum.confidence_tau).sampling_weights(student_scores("confidence"))
            order = cur.sample_for_rank(weights, len(shard), epoch, t.seed + rank, 0, 1)
        else:
            if "student_loss" in cfg.curriculum.measurers and fraction < 1.0:
                measures = {**measures, "student_loss": student_scores("loss")}
            difficulty = fused_difficulty(measures, cfg.curriculum.measurers, cfg.curriculum.rrf_k)
            # Nothing ranks the data (the baseline has no teachers): a stage opens a seeded random part
            # of it, not the first rows in storage order.
            ranked = cur.difficulty_order(difficulty) if difficulty is not None else torch.arange(len(shard)) \
                if fraction >= 1.0 else torch.randperm(len(shard), generator=torch.Generator().manual_seed(t.seed))
            order = cur.shard_for_rank(cur.open_subset(ranked, fraction), epoch, t.seed + rank, 0, 1)
        return shard.epoch_batches(order, per_rank_batch, start=batch_in_epoch)

    # --- teacher weights, fit to held-out labels before the student trains ----------------------------
    # (Each epoch row of the history carries the fit's loss and row count.)
    if use_teachers and not causal and blend_params and not checkpoint:
        blend_fit = fit_blend_on_validation(cfg, blend, val_batches(), names, num_classes, meta["topk"], device, world)

    # --- epochs -----------------------------------------------------------------------------------
    model.train()
    stage, fraction, order = 0, 1.0, None
    # A Population Based Training segment stops early at an epoch boundary; schedules still span t.epochs.
    last_epoch = min(t.epochs, loop_config.get("stop_at_epoch") or t.epochs)
    while epoch < last_epoch:
        batches = epoch_batches()
        asked = time.perf_counter()
        current = next(batches, None)
        # The wait for an epoch's first batch is the pipeline filling (online: teacher stages starting
        # anew); kept apart from samples_per_s, which is the steady rate after it.
        epoch_start, seen = time.perf_counter(), 0
        first_batch_s = epoch_start - asked
        # Whether every rank has another batch is decided together, once per step: logging and
        # checkpointing (ray.train.report waits for every rank) must make the same choice on all ranks.
        more = _all_ranks_have(current, world)
        while more:
            cols = current
            x, y = cols["x"].to(device), cols["label"].long().to(device)
            # A mixed row (MixUp/CutMix, done upstream so the teachers saw it) counts two labels.
            y_b = cols["label_b"].long().to(device) if "label_b" in cols else None
            lam = cols["mix_lam"].float().to(device) if "mix_lam" in cols else None
            teacher, teacher_seq = batch_targets(cols, names, num_classes, meta["topk"], causal, device) \
                if use_teachers else (None, None)  # [K, B, C] logits; causal LM per-token top-k [K, B, L, k]
            temperature, alpha = temperature_and_alpha(cfg, step, total_steps, stage)
            if not use_teachers:
                alpha = 0.0
            for group in optimizer.param_groups:
                group["lr"] = t.lr * lr_factor(t.lr_schedule, step, total_steps, t.warmup_fraction)

            # bf16 autocast covers the student's forward only; losses and blending stay in fp32.
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                # One DDP forward gives the logits and any features (see forward_with_features).
                out = forward_with_features(model, x, want_hint, want_attention)
            student_logits = out["logits"].float()
            parts: dict[str, float] = {} if lam is None else {"mix_lam": lam.mean().item()}
            if causal:  # all-padding columns were cut from the student's input: cut labels and targets alike
                width = student_logits.shape[1]
                y = y[:, :width]
                if teacher_seq is not None:
                    teacher_seq = tuple(v[:, :, :width] for v in teacher_seq)
            if teacher is not None:
                kd = classifier_kd(cfg, blend, student_logits, teacher, x, y, temperature)  # [B]
            elif teacher_seq is not None:
                kd, blend_parts = sequence_kd(cfg, blend, blend_opt, student_logits, teacher_seq, y, temperature, world)
                parts.update(blend_parts)
            else:
                kd = torch.zeros((), device=device)
            task = task_loss(student_logits, y, y_b, lam, cfg.loss.label_smoothing, causal)
            # Per row: a labeled row learns alpha * KD + (1 - alpha) * task, an unlabeled one (label -1,
            # or either label of a mixed pair) KD alone. A language model's labels are its own tokens.
            labeled = torch.ones((), dtype=torch.bool, device=device) if causal else \
                (y >= 0) & (y_b >= 0 if y_b is not None else True)
            row_loss = torch.where(labeled, alpha * kd + (1 - alpha) * task, kd)
            hint = attention = torch.zeros((), device=device)
            if want_hint:  # FitNets: projected student features regress the hint teacher's
                hint = hint_loss(out["hint"].float(), cols[f"{hint_teacher}/hint"].to(device).float(), projector,
                                 kind=cfg.loss.hint_kind)
                parts["hint_loss"] = hint.item()
            if want_attention:  # attention transfer against the teacher's map
                attention = attention_loss(out["attention"], cols[f"{hint_teacher}/attention"].to(device))
                parts["attention_loss"] = attention.item()
            loss = row_loss.mean() + cfg.loss.hint_weight * hint + cfg.loss.attention_weight * attention

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if projector is not None:  # outside DDP: average its gradients like the blend's
                _allreduce_grads(projector, world)
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            seen += len(y)
            _trace_batch(loop_config.get("trace_file"), rank, epoch, step, cols["id"])
            current = next(batches, None)
            more = _all_ranks_have(current, world)
            _maybe_inject_failure(loop_config.get("fail_once_at_step"), step, rank)

            if step % cfg.tracking.log_every_steps == 0 or not more:
                row = {"step": step, "epoch": epoch, "stage": stage, "open_fraction": fraction,
                       "temperature": temperature, "alpha": alpha, "lr": optimizer.param_groups[0]["lr"],
                       "loss": loss.item(), "kd_loss": kd.mean().item(),
                       "task_loss": task[labeled].mean().item() if labeled.any() else 0.0,
                       "labeled_share": labeled.float().mean().item(),
                       "samples_per_s": seen * world / (time.perf_counter() - epoch_start), **parts}
                if teacher_seq is not None:
                    for name, w in zip(names, blend.mean_weights().tolist()):
                        row[f"teacher_weight/{name}"] = w
                if teacher is not None:
                    for name, w in zip(names, blend.mean_weights().tolist()):
                        row[f"teacher_weight/{name}"] = w
                history.append(row)
                if rank == 0:
                    write_progress(loop_config.get("progress_file"), step=step, total=total_steps, epoch=epoch + 1,
                                   loss=round(row["loss"], 4), **shown_val)
            if step % t.checkpoint_every_steps == 0 and more:
                save_checkpoint({**history[-1], "kind": "step"} if history else {"step": step})

        if (epoch + 1) % t.eval_every_epochs and epoch + 1 < last_epoch:
            epoch, batch_in_epoch = epoch + 1, 0  # no validation, report or epoch checkpoint this epoch
            continue
        val = {**validate(model, val_batches(), meta, world, device), "peak_rss_mb": _peak_rss_mb(world)}
        # The student is reported at its best validation epoch, never at an arbitrary last one.
        # Ties on accuracy are common on a small validation split (274/278 for 10 epochs running): the
        # lower validation loss breaks them, so an undertrained early epoch is not the one reported.
        score = (-val["val_perplexity"], 0.0) if causal else (val["val_accuracy"], -val.get("val_loss", 0.0))
        if isinstance(best["score"], (int, float)):  # a checkpoint from before the tie-break
            best["score"] = (best["score"], float("-inf"))
        if best["score"] is None or tuple(score) > tuple(best["score"]):
            best = {"score": score, "epoch": epoch,
                    "student": {k: v.detach().cpu().clone() for k, v in unwrap_model(model).state_dict().items()}}
        val.update(best_epoch=best["epoch"], **blend_fit)
        shown_val = {k: round(val[k], 4) for k in ("val_accuracy", "val_perplexity") if k in val}
        last_step = next((r for r in reversed(history) if r.get("kind") != "epoch"), {})
        history.append({"step": step, "epoch": epoch, "stage": stage, "open_fraction": fraction, "kind": "epoch",
                        "first_batch_s": first_batch_s, **val})
        epoch, batch_in_epoch = epoch + 1, 0
        # The epoch report carries the latest step's loss parts, schedule and teacher weights too, so
        # dashboards (Tune's TensorBoard/W&B loggers) get every curve from one row per epoch.
        save_checkpoint({**last_step, **val, "epoch": epoch, "step": step, "kind": "epoch"})


def run_training(cfg: ExperimentConfig, inputs: TrainInputs, storage_path: str, run_name: str,
                 fail_once_at_step: dict | None = None, callbacks: list | None = None,
                 placement_group_file: str | None = None, resume_from: Checkpoint | None = None,
                 stop_at_epoch: int | None = None, trace_file: str | None = None,
                 progress_file: str | None = None) -> ray.train.Result:
    """Run the loop on Ray Train. Re-running with the same (storage_path, run_name) resumes.

    Each rank gets its own rows of train and val as unsplit datasets (``train_{rank}``,
    ``val_{rank}``, ``index_{rank}``; see ``TrainInputs.datasets``): disjoint, fixed by the sample id,
    the same after a restart. ``callbacks`` are Ray Train callbacks (a Tune trial passes
    ``TuneReportCallback``); ``placement_group_file`` receives the workers' placement group id (see
    ``tune/sweep.py``). ``resume_from`` starts from another run's checkpoint (used when this run has none of
    its own) and ``stop_at_epoch`` ends after that many epochs while schedules still span
    ``train.epochs``: together they let Population Based Training run a trial in segments."""
    world = cfg.train.num_workers
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
        train_loop_config={"config": config_to_dict(cfg), "meta": inputs.meta(), "epoch_plan": plan,
                           "fail_once_at_step": fail_once_at_step, "placement_group_file": placement_group_file,
                           "stop_at_epoch": stop_at_epoch, "initial_checkpoint": resume_from,
                           "trace_file": trace_file, "progress_file": progress_file},
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
            return trainer.fit()
    finally:
        if plan is not None:
            ray.kill(plan)


def load_trained_student(cfg: ExperimentConfig, inputs: TrainInputs, checkpoint: Checkpoint):
    """The student and its history from a run's final checkpoint (safe load, no pickle)."""
    student = build_model(cfg.student.arch, inputs.input_shape, inputs.num_classes, cfg.student.options)
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
