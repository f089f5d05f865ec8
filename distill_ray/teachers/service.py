"""Teacher services: each teacher loaded once per run (or per sweep) in a pool of Ray actors that every
caller shares, instead of once per pass of a Ray Data stream.

A ``TeacherService`` is a small picklable handle on ``replicas`` named actors (``TeacherReplica``), each
holding one ``TeacherRunner``. A Ray Data stage (the cache build and online mode, ``train/stages.py``),
a Train worker or a Tune trial calls it the same way; requests and answers travel through Ray's object
store, never through the driver. A replica batches what its callers send: requests of the same shape
queue up while the previous forward runs, and the next forward takes them together (up to
``max_batch_rows`` rows, waiting at most ``batch_wait_s`` for more), one forward at a time.

Replicas are Ray actors with ``max_restarts=-1`` and ``max_task_retries=-1``: one that dies is started
again (it loads its teacher again) and the calls it had in flight are sent to it again by Ray, so a
killed replica costs a reload, never the run.

Why actors and not Ray Serve deployments: a run's teachers need no HTTP proxy or Serve controller (two
more processes on every run, and a Serve instance the user's own serving app shares), and the callers
are Ray tasks and actors already holding the handles; batching is the part Serve would add, and it is
the forty lines of ``_serve_queue`` below. Measured side by side (``bench/service_vs_serve.py``, one
CNN replica): a Serve handle took 1.27-1.41x the actor's time per request and 8.9 s against 3.2 s
to start.

``teacher_services`` starts the services a run needs, or finds the ones a sweep started (same
``scope``), and stops only those it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from distill_ray.teachers.spec import TeacherSpec

NAMESPACE = "distill-ray"  # named replicas live here, whatever namespace the caller's job has
BATCH_WAIT_S = 0.005  # how long a replica waits for more requests once one is queued


@dataclass
class _Request:
    kind: str  # "infer" | "score"
    key: tuple  # requests with equal keys can share a forward
    args: dict
    rows: int
    done: asyncio.Future


class TeacherReplica:
    """One replica: loads the teacher once (``TeacherRunner``) and answers batched requests."""

    def __init__(self, spec: TeacherSpec, max_batch_rows: int, batch_wait_s: float):
        from distill_ray.teachers.runner import TeacherRunner

        self.spec = spec
        self.max_batch_rows = max_batch_rows
        self.batch_wait_s = batch_wait_s
        self.runner = TeacherRunner.from_spec(spec, torch_threads=max(1, int(spec.num_cpus)))
        self.forwards = 0
        self._queue: asyncio.Queue | None = None  # created in the actor's event loop, at the first request
        self._held: list[_Request] = []  # taken from the queue, waiting for a batch of their own key
        if spec.trace_file:  # tests: one line per load, so a run can count them
            with open(f"{spec.trace_file}.loads", "a") as f:
                f.write(f"{spec.name} {os.getpid()}\n")

    def ready(self) -> bool:
        return True

    async def infer(self, inputs: np.ndarray, features: tuple[str, ...] = (), labels: np.ndarray | None = None,
                    ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The teacher's answer for ``inputs`` (``TeacherRunner.infer``), computed in a batch with any
        other caller's requests of the same shape. ``ids`` (tests): written to the spec's trace file."""
        inputs = np.asarray(inputs)
        key = ("infer", inputs.dtype.str, inputs.shape[1:], tuple(features),
               None if labels is None else np.asarray(labels).shape[1:])
        out = await self._submit("infer", key, {"inputs": inputs, "labels": labels}, len(inputs))
        if self.spec.trace_file and ids is not None:
            with open(self.spec.trace_file, "a") as f:
                f.write(f"{self.spec.name} {','.join(map(str, np.asarray(ids).tolist()))} {os.getpid()}\n")
        return out

    async def score(self, tokens: np.ndarray, positions: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """A causal LM's top-k log-probabilities of the next token at ``positions`` of ``tokens``
        (``score_positions``), for on-policy distillation: the student writes, the teacher scores."""
        tokens, positions = np.asarray(tokens), np.asarray(positions)
        return await self._submit("score", ("score", tokens.shape[1:], positions.shape[1:], int(k)),
                                  {"tokens": tokens, "positions": positions, "k": int(k)}, len(tokens))

    def feature_shapes(self, inputs: np.ndarray, features: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        return self.runner.feature_shapes(np.asarray(inputs), tuple(features))

    def stats(self) -> dict[str, Any]:
        return {**self.runner.stats(), "pid": os.getpid(), "forwards": self.forwards}

    # --- batching -------------------------------------------------------------------------------------

    async def _submit(self, kind: str, key: tuple, args: dict, rows: int) -> dict[str, np.ndarray]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._serve_queue())
        request = _Request(kind, key, args, rows, asyncio.get_running_loop().create_future())
        await self._queue.put(request)
        return await request.done

    async def _serve_queue(self) -> None:
        """One forward at a time: the first waiting request, plus every queued one with its key (up to
        ``max_batch_rows`` rows, waiting up to ``batch_wait_s`` for more); others wait their turn."""
        loop = asyncio.get_running_loop()
        while True:
            first = self._held.pop(0) if self._held else await self._queue.get()
            batch, rows = [first], first.rows
            # Requests of the same key taken before (held while another key's batch ran) join first.
            for held in [r for r in self._held if r.key == first.key]:
                if rows + held.rows > self.max_batch_rows:
                    break
                self._held.remove(held)
                batch.append(held)
                rows += held.rows
            deadline = loop.time() + self.batch_wait_s
            while rows < self.max_batch_rows:
                try:
                    if self._queue.empty():
                        nxt = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time()))
                    else:
                        nxt = self._queue.get_nowait()
                except asyncio.TimeoutError:
                    break
                if nxt.key == first.key and rows + nxt.rows <= self.max_batch_rows:
                    batch.append(nxt)
                    rows += nxt.rows
                else:
                    self._held.append(nxt)
            try:
                answers = await asyncio.to_thread(self._forward, batch)
            except Exception as err:  # every caller of the batch gets the error, the replica keeps serving
                for request in batch:
                    request.done.set_exception(err)
                continue
            for request, answer in zip(batch, answers):
                request.done.set_result(answer)

    def _forward(self, batch: list[_Request]) -> list[dict[str, np.ndarray]]:
        """One forward for the requests of ``batch`` (all of one key), split back per request."""
        self.forwards += 1
        if batch[0].kind == "score":
            tokens = np.concatenate([r.args["tokens"] for r in batch])
            positions = np.concatenate([r.args["positions"] for r in batch])
            out = score_positions(self.runner, tokens, positions, batch[0].args["k"])
        else:
            inputs = np.concatenate([r.args["inputs"] for r in batch])
            labels = None if batch[0].args["labels"] is None else \
                np.concatenate([np.asarray(r.args["labels"]) for r in batch])
            out = self.runner.infer(inputs, batch[0].key[3], labels)
        bounds = np.cumsum([0] + [r.rows for r in batch])
        return [{name: value[lo:hi] for name, value in out.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]


def score_positions(runner, tokens: np.ndarray, positions: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """A causal LM teacher's distribution of the next token after each of ``positions`` (``[N, P]``
    indices into ``tokens`` ``[N, L]``; -1 pads): ``topk_logprobs`` ``[N, P, k]`` float32 (log-softmax
    of the full vocabulary at temperature 1, descending), ``topk_indices`` ``[N, P, k]`` int32 and
    ``tail_mass`` ``[N, P]``, the probability outside the k (padded positions: 0, -1 and 0)."""
    import torch

    from distill_ray.kd.losses import teacher_topk
    from distill_ray.models import forward_logits

    runner.assert_frozen()
    start = time.perf_counter()
    with torch.inference_mode():
        x = torch.as_tensor(np.asarray(tokens, np.int64)).to(runner.device)
        logits = forward_logits(runner.model, x).float()  # [N, L, V]
        where = torch.as_tensor(np.asarray(positions, np.int64)).to(runner.device)
        picked = logits.gather(1, where.clamp_min(0).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        logprobs, indices = teacher_topk(picked, k)
        tail = (1.0 - logprobs.exp().sum(-1)).clamp_min(0.0)
        pad = where < 0
        logprobs, indices, tail = logprobs.masked_fill(pad.unsqueeze(-1), 0.0), \
            indices.masked_fill(pad.unsqueeze(-1), -1), tail.masked_fill(pad, 0.0)
    runner.seconds += time.perf_counter() - start
    runner.rows += len(tokens)
    runner.batches += 1
    return {"topk_logprobs": logprobs.cpu().numpy().astype(np.float32),
            "topk_indices": indices.to(torch.int32).cpu().numpy(), "tail_mass": tail.cpu().numpy()}


@dataclass(frozen=True)
class TeacherService:
    """A handle on one teacher's replicas: picklable, so Ray Data tasks, Train workers and trials hold it."""

    spec: TeacherSpec
    replicas: tuple = field(repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def _replica(self):
        return self.replicas[random.randrange(len(self.replicas))]

    def infer_async(self, inputs: np.ndarray, features: tuple[str, ...] = (), labels: np.ndarray | None = None,
                    ids: np.ndarray | None = None):
        """An ObjectRef of the answer (``TeacherReplica.infer``)."""
        return self._replica().infer.remote(inputs, tuple(features), labels, ids)

    def infer(self, inputs: np.ndarray, features: tuple[str, ...] = (), labels: np.ndarray | None = None,
              ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        import ray

        return ray.get(self.infer_async(inputs, features, labels, ids))

    def score_async(self, tokens: np.ndarray, positions: np.ndarray, k: int):
        """An ObjectRef of the teacher's scores (``TeacherReplica.score``)."""
        return self._replica().score.remote(tokens, positions, k)

    def score(self, tokens: np.ndarray, positions: np.ndarray, k: int) -> dict[str, np.ndarray]:
        import ray

        return ray.get(self.score_async(tokens, positions, k))

    def feature_shapes(self, inputs: np.ndarray, features: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        import ray

        return ray.get(self._replica().feature_shapes.remote(inputs, tuple(features)))

    def stats(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([r.stats.remote() for r in self.replicas])


def ask_teacher(batch: dict[str, np.ndarray], service: TeacherService) -> dict[str, np.ndarray]:
    """Ray Data function: one teacher's soft targets (and asked-for features) as ``{name}/...`` columns,
    answered by its service, which batches every stage's requests. It lives here, in a module that
    imports neither torch nor the rest of the package: a Ray Data task that runs it in a new worker
    process imports this and numpy only."""
    if not len(batch["id"]):
        return batch
    spec = service.spec
    # A teacher with its own tokenizer also reads the labels: the last one is the last position's next token.
    labels = np.asarray(batch["label"]) if spec.tokenizer is not None else None
    out = service.infer(np.asarray(batch["x"]), spec.features, labels,
                        ids=np.asarray(batch["id"]) if spec.trace_file else None)
    return {**batch, **{f"{spec.name}/{key}": value for key, value in out.items()}}


def service_key(spec: TeacherSpec) -> str:
    """What a replica loads and answers with, as a short digest: services with equal keys are
    interchangeable (features are asked per request; sizes and traces are the starter's)."""
    loaded = {k: v for k, v in asdict(spec).items()
              if k in ("model_dir", "dtype", "topk", "tokenizer", "student_tokenizer", "cross_tokenizer")}
    return hashlib.sha256(json.dumps(loaded, sort_keys=True).encode()).hexdigest()[:10]


def replica_name(scope: str, spec: TeacherSpec, index: int) -> str:
    return f"{scope}/teacher/{spec.name}-{service_key(spec)}/{index}"


def start_service(spec: TeacherSpec, scope: str, max_batch_rows: int | None = None,
                  batch_wait_s: float = BATCH_WAIT_S) -> TeacherService:
    """``spec.replicas`` replicas of ``spec``'s teacher, each holding ``num_cpus`` / ``num_gpus``, loaded
    and ready when this returns."""
    import ray

    actor = ray.remote(TeacherReplica)
    replicas = tuple(actor.options(
        name=replica_name(scope, spec, i), namespace=NAMESPACE, num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus or None, max_restarts=-1, max_task_retries=-1, max_concurrency=1000,
    ).remote(spec, max_batch_rows or spec.batch_size, batch_wait_s) for i in range(max(1, spec.replicas)))
    ray.get([r.ready.remote() for r in replicas])  # a teacher that cannot load fails here, by name
    return TeacherService(spec, replicas)


def find_service(spec: TeacherSpec, scope: str) -> TeacherService | None:
    """The service another process (a sweep's driver) started for ``spec`` under ``scope``, if any."""
    import ray

    replicas = []
    for i in range(max(1, spec.replicas)):
        try:
            replicas.append(ray.get_actor(replica_name(scope, spec, i), namespace=NAMESPACE))
        except ValueError:
            break
    return TeacherService(spec, tuple(replicas)) if replicas else None


def stop_service(service: TeacherService) -> None:
    import ray

    for replica in service.replicas:
        ray.kill(replica, no_restart=True)


def new_scope() -> str:
    return f"run-{os.getpid()}-{time.time_ns():x}"


@contextlib.contextmanager
def teacher_services(specs: tuple[TeacherSpec, ...] | list[TeacherSpec], scope: str | None = None
                     ) -> Iterator[dict[str, TeacherService]]:
    """The services of ``specs`` for the ``with`` block, by teacher name: found under ``scope`` when a
    sweep started them (and left up), otherwise started here and stopped at the end."""
    scope = scope or os.environ.get("DISTILL_RAY_SERVICE_SCOPE") or new_scope()
    services, started = {}, []
    try:
        for spec in specs:
            found = find_service(spec, scope)
            if found is None:
                found = start_service(spec, scope)
                started.append(found)
            # The caller's spec (its features and trace), the replicas of whoever started them.
            services[spec.name] = TeacherService(spec, found.replicas)
        yield services
    finally:
        for service in started:
            stop_service(service)
