"""Frozen teachers in Ray actors: one actor group per teacher, a pool that fans batches out.

``TeacherRunner`` is the plain-Python core (load, freeze, infer, count); it runs inside a Ray actor
(``TeacherPool``, online mode) or inside a Ray Data ``map_batches`` actor pool (``TeacherBatchUDF``,
cache building). Teachers return plain data: ``{"logits": [N, C]}`` or ``{"topk_logprobs": [N, k],
"topk_indices": [N, k]}`` (fp16 / int32), never model objects. Asked for ``features``, they add
``"hint"`` [N, D] and/or ``"attention"`` [N, P] (fp16) for feature distillation (online mode only).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import ray
import torch

from distill_ray.losses import attention_map, teacher_topk
from distill_ray.models import batched_features, batched_logits, fingerprint, forward_logits, freeze, load_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FEATURES = ("hint", "attention")  # what a teacher can serve besides its soft targets


@dataclass(frozen=True)
class TeacherSpec:
    """Where a trained teacher lives and how its actors are sized."""

    name: str
    model_dir: str
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    replicas: int = 1
    dtype: str = "float32"
    max_restarts: int = 3


class TeacherRunner:
    """Loads one teacher (eval, no grad), answers batches, and counts what it did."""

    def __init__(self, name: str, model_dir: str, dtype: str = "float32", topk: int | None = None,
                 torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.name = name
        self.topk = topk
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, self.spec = load_model(model_dir)
        self.fingerprint = fingerprint(model)  # of the stored fp32 weights, before any cast
        model = freeze(model).to(self.device)
        # Reduced precision only on GPU: CPU bf16 matmuls are slower and change the targets.
        self.dtype = _DTYPES[dtype] if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.dtype)
        self.rows = 0
        self.batches = 0
        self.seconds = 0.0

    def assert_frozen(self) -> None:
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if self.model.training or trainable:
            raise AssertionError(f"teacher {self.name} is trainable: training={self.model.training}, "
                                 f"params with grad: {trainable[:3]}")

    @torch.inference_mode()
    def infer(self, inputs: np.ndarray, features: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Soft targets for one batch: full logits (float32) or top-k log-probs (fp16) + indices (int32).

        ``features`` adds ``"hint"``: [N, D] (``models.hint_features``) and/or ``"attention"``: [N, P]
        (``losses.attention_map`` of ``models.attention_features``, already reduced and L2-normalised),
        both float16 to keep the payload small.
        """
        self.assert_frozen()
        start = time.perf_counter()
        out = self._answer(inputs, tuple(features))
        self.seconds += time.perf_counter() - start
        self.rows += len(inputs)
        self.batches += 1
        return out

    @torch.inference_mode()
    def feature_shapes(self, inputs: np.ndarray, features: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes without the batch dim of the ``features`` that ``infer`` answers for ``inputs`` (a
        probe: not counted in the stats)."""
        self.assert_frozen()
        out = self._answer(inputs, tuple(features))
        return {name: tuple(out[name].shape[1:]) for name in features}

    def _answer(self, inputs: np.ndarray, features: tuple[str, ...]) -> dict[str, np.ndarray]:
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise ValueError(f"teacher {self.name}: unknown features {unknown}; valid: {', '.join(FEATURES)}")
        x = torch.tensor(inputs).to(self.device)  # Ray hands over read-only arrays; copy once
        if x.is_floating_point():
            x = x.to(self.dtype)
        extra = {}
        if features:
            # One forward gives logits and features; token ids in length-sorted micro-batches.
            got = batched_features(self.model, x, "hint" in features, "attention" in features,
                                   batch_size=max(1, len(x)) if x.is_floating_point() else 64)
            logits = got["logits"]
            if "hint" in got:
                extra["hint"] = got["hint"].to(torch.float16).cpu().numpy()
            if "attention" in got:
                extra["attention"] = attention_map(got["attention"]).to(torch.float16).cpu().numpy()
        else:
            # Token ids run in length-sorted micro-batches (each only as wide as its longest text).
            logits = forward_logits(self.model, x).float() if x.is_floating_point() else batched_logits(self.model, x, 64)
        if self.topk is None:
            out = {"logits": logits.cpu().numpy()}
        else:
            logprobs, indices = teacher_topk(logits, self.topk)
            out = {"topk_logprobs": logprobs.to(torch.float16).cpu().numpy(),
                   "topk_indices": indices.to(torch.int32).cpu().numpy()}
        return {**out, **extra}

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "batches": self.batches, "seconds": self.seconds,
                "fingerprint": self.fingerprint}


@ray.remote(max_concurrency=1)
class TeacherActor(TeacherRunner):
    """A teacher replica. Restarts on death (``max_restarts``); the pool retries the lost batch."""

    def pid(self) -> int:
        import os

        return os.getpid()


class TeacherPool:
    """All teachers, each as ``replicas`` actors; one call asks every teacher in parallel.

    Replicas of a teacher are used round-robin. A batch whose replica dies is retried (on the
    restarted actor or another replica) up to ``retries`` times; rows are counted only when a
    teacher's answer arrives, so a retried batch is never counted twice.
    """

    def __init__(self, teachers: Sequence[TeacherSpec], topk: int | None = None, retries: int = 3):
        if not teachers:
            raise ValueError("TeacherPool needs at least one teacher")
        self.specs = {t.name: t for t in teachers}
        self.retries = retries
        self.replicas: dict[str, list] = {}
        for t in teachers:
            threads = max(1, int(t.num_cpus))
            self.replicas[t.name] = [
                TeacherActor.options(num_cpus=t.num_cpus, num_gpus=t.num_gpus, max_restarts=t.max_restarts,
                                     name=None).remote(t.name, t.model_dir, t.dtype, topk, threads)
                for _ in range(t.replicas)
            ]
        self._start_counters()

    @classmethod
    def attach(cls, replicas: Mapping[str, list], retries: int = 3) -> "TeacherPool":
        """A pool over actors someone else started (e.g. the driver, for Train workers in online mode)."""
        pool = cls.__new__(cls)
        pool.specs = {name: None for name in replicas}
        pool.retries = retries
        pool.replicas = {name: list(actors) for name, actors in replicas.items()}
        pool._start_counters()
        return pool

    def _start_counters(self) -> None:
        self._next = {name: itertools.cycle(range(len(actors))) for name, actors in self.replicas.items()}
        self.rows = {name: 0 for name in self.replicas}
        self.batches = {name: 0 for name in self.replicas}
        self.seconds = {name: 0.0 for name in self.replicas}
        self.retried = {name: 0 for name in self.replicas}
        # Fail fast if a teacher cannot load, and learn fingerprints once.
        first = ray.get([actors[0].stats.remote() for actors in self.replicas.values()])
        self.fingerprints = {name: s["fingerprint"] for name, s in zip(self.replicas, first)}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.replicas)

    def submit(self, inputs: np.ndarray,
               features: Sequence[str] | Mapping[str, Sequence[str]] = ()) -> "PendingTargets":
        """Start every teacher on this batch now; collect later with ``.result()`` (prefetching).

        ``features`` (see ``TeacherRunner.infer``) is asked of every teacher, or, as a mapping
        ``{teacher: features}``, of the teachers it names only.
        """
        wanted = self._features_by_teacher(features)
        ref = ray.put(inputs)
        started = time.perf_counter()
        calls = {}
        for name, actors in self.replicas.items():
            replica = next(self._next[name])
            calls[name] = (replica, _infer(actors[replica], ref, wanted[name]))
        return PendingTargets(self, ref, len(inputs), calls, started, wanted)

    def infer(self, inputs: np.ndarray,
              features: Sequence[str] | Mapping[str, Sequence[str]] = ()) -> dict[str, dict[str, np.ndarray]]:
        return self.submit(inputs, features).result()

    def feature_shapes(self, name: str, inputs: np.ndarray, features: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Shapes (without the batch dim) of teacher ``name``'s features for ``inputs``; not counted."""
        return ray.get(self.replicas[name][0].feature_shapes.remote(inputs, tuple(features)))

    def _features_by_teacher(self, features: Sequence[str] | Mapping[str, Sequence[str]]) -> dict[str, tuple]:
        if isinstance(features, Mapping):
            unknown = [n for n in features if n not in self.replicas]
            if unknown:
                raise ValueError(f"features asked of unknown teachers {unknown}; teachers: {', '.join(self.replicas)}")
            return {name: tuple(features.get(name, ())) for name in self.replicas}
        return {name: tuple(features) for name in self.replicas}

    def _retry(self, name: str, ref, failed_replica: int, features: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        actors = self.replicas[name]
        last_error: Exception | None = None
        for attempt in range(self.retries):
            self.retried[name] += 1
            # Prefer another live replica; with one replica, wait for Ray to restart it.
            replica = (failed_replica + 1 + attempt) % len(actors)
            try:
                return ray.get(_infer(actors[replica], ref, features))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                last_error = err
                time.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"teacher {name!r} failed {self.retries} retries: {last_error}")

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-teacher counters as seen by the pool (survive actor restarts)."""
        return {name: {"rows": self.rows[name], "batches": self.batches[name], "retries": self.retried[name],
                       "rows_per_s": self.rows[name] / self.seconds[name] if self.seconds[name] else 0.0}
                for name in self.replicas}

    def actor_handles(self) -> Mapping[str, list]:
        return self.replicas

    def shutdown(self) -> None:
        for actors in self.replicas.values():
            for actor in actors:
                ray.kill(actor, no_restart=True)
        self.replicas = {}


def _infer(actor, ref, features: tuple[str, ...]):
    # Without features the call is the plain one, as before features existed.
    return actor.infer.remote(ref, features) if features else actor.infer.remote(ref)


@dataclass
class PendingTargets:
    """Teacher calls in flight for one batch (``features``: what each teacher was asked besides targets)."""

    pool: TeacherPool
    ref: Any
    num_rows: int
    calls: dict[str, tuple[int, Any]]
    started: float
    features: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for name, (replica, call) in self.calls.items():
            try:
                out[name] = ray.get(call)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                out[name] = self.pool._retry(name, self.ref, replica, self.features.get(name, ()))
            self.pool.rows[name] += self.num_rows
            self.pool.batches[name] += 1
            self.pool.seconds[name] += time.perf_counter() - self.started
        return out


class TeacherBatchUDF:
    """Ray Data ``map_batches`` callable: adds one teacher's soft-target columns to each batch."""

    def __init__(self, name: str, model_dir: str, dtype: str = "float32", topk: int | None = None,
                 input_column: str = "x"):
        self.runner = TeacherRunner(name, model_dir, dtype, topk)
        self.input_column = input_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.infer(batch[self.input_column])
        for key, value in out.items():
            batch[f"{self.runner.name}/{key}"] = value
        return batch
