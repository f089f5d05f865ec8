"""What a teacher is to the rest of the package: ``TeacherSpec``. No torch and no Ray here: the spec
travels inside every request to a teacher's service (``service.TeacherService``), so the Ray Data
tasks that ask it import this module and nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherSpec:
    """Where a trained teacher lives, how its actors are sized and what they answer."""

    name: str
    model_dir: str
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    replicas: int = 1
    dtype: str = "float32"
    topk: int | None = None
    features: tuple[str, ...] = ()  # "hint" / "attention", online mode
    batch_size: int = 512
    trace_file: str | None = None  # tests and drills: one line per answered batch: "name ids pid"
    tokenizer: str | None = None  # causal LM: the teacher's own tokenizer directory (teachers/cross_tokenizer.py)
    student_tokenizer: str | None = None  # ... and the student's, whose ids the rows hold
    cross_tokenizer: str = "map"  # map | uld: how its targets reach the student's vocabulary
