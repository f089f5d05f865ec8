"""What a Ray Train worker is told: one frozen value, built on the driver (``run_training``) and
handed to ``train_loop_per_worker`` as ``train_loop_config={"options": WorkerOptions(...)}`` (Ray
pickles it; the datasets travel through ``TorchTrainer(datasets=...)``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distill_ray.config import ExperimentConfig

if TYPE_CHECKING:
    from ray.train import Checkpoint

    from distill_ray.train.loop import TrainInputs


@dataclass(frozen=True, eq=False)
class WorkerOptions:
    """The run's config, the plain facts about its data a worker needs, and the driver's switches."""

    config: ExperimentConfig
    teacher_names: tuple[str, ...]
    num_classes: int
    input_shape: tuple[int, ...]
    train_rows: int  # the whole split's, what the schedules' step budget is planned over
    task: str = "classification"
    topk: int | None = None
    use_teachers: bool = True  # False: the baseline, the same student from labels alone
    keep_shard: bool = True  # keep this rank's shard in memory (else stream it every epoch)
    feature_shapes: dict[str, Any] = field(default_factory=dict)  # online hint/attention: the teacher's
    probe: Any = None  # two input rows, for the student's own feature widths
    scorers: tuple = ()  # on-policy KD: every teacher's service (TeacherService), in teacher_names order
    eos_id: int | None = None  # on-policy KD: where the student's responses end (None: the tokenizer has none)
    pad_id: int = 0
    epoch_plan: Any = None  # the driver's ``stages.EpochPlan`` actor, where streamed epochs are posted
    initial_checkpoint: Checkpoint | None = None  # another run's, used when this run has none (PBT)
    stop_at_epoch: int | None = None  # a PBT segment ends there; schedules still span train.epochs
    placement_group_file: str | None = None  # rank 0 writes its placement group id there (Tune)
    progress_file: str | None = None  # the driver's progress bar reads it
    trace_file: str | None = None  # tests and drills: every trained batch's ids
    fail_once_at_step: dict | None = None  # tests and drills: {"step", "marker"}, rank 0 dies there once
    long_tail: Any = None  # classifiers: kd.long_tail.LongTail from the train split's class counts (None: off)

    @property
    def causal(self) -> bool:
        return self.task == "causal_lm"

    # Feature distillation (online): the student matches one teacher's features, which the teacher
    # stages add as columns of the batch.
    @property
    def want_hint(self) -> bool:
        return self.use_teachers and "hint" in self.feature_shapes

    @property
    def want_attention(self) -> bool:
        return self.use_teachers and "attention" in self.feature_shapes

    @property
    def hint_teacher(self) -> str:
        return self.config.loss.hint_teacher or self.teacher_names[0]

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, inputs: TrainInputs, **switches: Any) -> WorkerOptions:
        """The options of one run: ``cfg``, the facts of ``inputs`` and the driver's ``switches``; the
        long-tail terms of the loss are built here, once, from the train split's class counts."""
        from distill_ray.kd.objectives import long_tail_terms

        return cls(config=cfg, teacher_names=tuple(inputs.teacher_names), num_classes=inputs.num_classes,
                   input_shape=tuple(inputs.input_shape), train_rows=inputs.train_rows, task=inputs.task,
                   topk=inputs.topk, use_teachers=inputs.use_teachers, keep_shard=inputs.keep_shard,
                   feature_shapes=dict(inputs.feature_shapes), probe=inputs.probe, scorers=tuple(inputs.scorers),
                   eos_id=inputs.eos_id, pad_id=inputs.pad_id,
                   long_tail=long_tail_terms(cfg, tuple(inputs.class_counts), inputs.num_classes), **switches)
