"""Sequence-level KD, the Ray part: the teachers' responses to the training prompts, generated once by
Ray Data actor-pool stages (one per writing teacher; ``TeacherRunner.generate`` inside the actors) and
kept as Parquet with a manifest, like the soft-target cache::

    <cache.dir>/responses/<spec.key()>/
        manifest.json      the spec (every teacher's fingerprint, the decoding, the data), who wrote
                           how many rows, and rows + sha256 per file
        <file>.parquet     id, x, label, split, source, generated_by, prompt_id

``with_responses`` returns the source data with those rows joined to the train split (``source`` =
teacher) beside the references (``source`` = reference); ``cache.build`` builds the soft targets
from that, so the teachers' token-level targets cover their responses, and ``train.inputs`` picks the
rows a run trains on (``train_sources``). A cache of the same spec is verified and reused: no
``generate`` runs. A spec that changed gets its own directory; the message names what changed against
the newest cache of the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import pyarrow.parquet as pq
import ray

from distill_ray import __version__
from distill_ray.cache.files import abbreviated, publish_directory, sha256_file
from distill_ray.config import ExperimentConfig
from distill_ray.lm.sequence_kd import (REFERENCE, TEACHER, Decoding, prompt_of, reference_columns, row_seed,
                                     teacher_rows, window_budget)
from distill_ray.cache.soft_targets import CorruptCacheError, StaleCacheError
from distill_ray.data.sources import SourceData
from distill_ray.teachers.runner import TeacherRunner
from distill_ray.teachers.spec import TeacherSpec

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
COLUMNS = ("id", "x", "label", "split", "source", "generated_by", "prompt_id")
_HINT = "regenerate it with `distill-ray run CONFIG --rebuild` (or set cache.rebuild=true)"


@dataclass(frozen=True, eq=False)
class ResponseSpec:
    """What a responses cache was generated from; equal specs mean it can be reused."""

    teacher_fingerprints: Mapping[str, str]
    """Every candidate writer's weights (``candidates``), in order (best: any of them could be picked; all: each writes)."""
    teachers: str
    """best or all (``SequenceKDConfig.teachers``)."""
    decoding: Mapping[str, Any]
    """``sequence_kd.Decoding`` as a dict: greedy/sample, max_new_tokens, temperature, top_p, seed."""
    data_fingerprint: str
    """The prompts: the data's fingerprint (files, config with tokenizer and max_length, counts)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "teacher_fingerprints", MappingProxyType(dict(self.teacher_fingerprints)))
        object.__setattr__(self, "decoding", MappingProxyType(dict(self.decoding)))

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_fingerprints": dict(self.teacher_fingerprints), "teachers": self.teachers,
                "decoding": dict(self.decoding), "data_fingerprint": self.data_fingerprint}

    def key(self) -> str:
        d = self.to_dict()
        d["teacher_fingerprints"] = [[k, v] for k, v in self.teacher_fingerprints.items()]  # order counts
        d["format_version"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResponseSpec) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())


def decoding_of(cfg: ExperimentConfig) -> Decoding:
    s = cfg.sequence_kd
    return Decoding.of(s.decoding, s.max_new_tokens, s.temperature, s.top_p, s.seed)


def candidates(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The teachers that may write: those on the data's tokenizer (a teacher with its own writes other
    token ids; config validation keeps it out of ``all``)."""
    return tuple(t.name for t in cfg.teachers if t.tokenizer is None)


def response_spec(cfg: ExperimentConfig, data_fingerprint: str, prints: Mapping[str, str]) -> ResponseSpec:
    return ResponseSpec({t: prints[t] for t in candidates(cfg)}, cfg.sequence_kd.teachers,
                        dataclasses.asdict(decoding_of(cfg)), data_fingerprint)


def teacher_fingerprints(cfg: ExperimentConfig, dirs: Mapping[str, Path]) -> dict[str, str]:
    from distill_ray.models import fingerprint, load_model

    return {t: fingerprint(load_model(dirs[t])[0]) for t in candidates(cfg)}  # only writers key the responses


# --- generating ----------------------------------------------------------------------------------

class ResponseRows:
    """Ray Data callable: one teacher's rows for a batch of reference rows (its responses to their prompts)."""

    def __init__(self, spec: TeacherSpec, decoding: Decoding, eos_id: int | None, pad_id: int, max_length: int,
                 trace_file: str | None = None):
        self.runner = TeacherRunner(spec.name, spec.model_dir, spec.dtype, torch_threads=max(1, int(spec.num_cpus)))
        self.spec, self.decoding, self.eos_id, self.pad_id, self.max_length = spec, decoding, eos_id, pad_id, max_length
        self.trace_file = trace_file

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, y, ids = np.asarray(batch["x"]), np.asarray(batch["label"]), np.asarray(batch["id"])
        prompts = [prompt_of(x[i], y[i]) for i in range(len(ids))]
        seeds = [row_seed(self.decoding.seed, i, self.spec.name) for i in ids] if self.decoding.decoding == "sample" \
            else None
        responses = self.runner.generate(prompts, self.decoding, self.eos_id, self.pad_id, seeds,
                                         window_budget(prompts, self.max_length, self.decoding.max_new_tokens)) \
            if len(ids) else []
        if self.trace_file and len(ids):  # tests: one line per generate call
            with open(self.trace_file, "a") as f:
                f.write(f"{self.spec.name} {len(ids)} {self.runner.stats()['generate_calls']}\n")
        return teacher_rows(batch, self.spec.name, responses, prompts, self.max_length, self.pad_id)


def _validation_nll(model_dir: str, val) -> float:
    """Runs as a Ray task: a teacher's mean token NLL on the validation references (held out from the
    recipes' training; the ground truth the learned weights are fit to)."""
    import torch

    from distill_ray.evaluation.metrics import lm_label_logprobs
    from distill_ray.models import freeze, load_model

    torch.set_num_threads(1)
    model = freeze(load_model(model_dir)[0])
    total, count = 0.0, 0
    for batch in val.iter_batches(batch_size=64, batch_format="numpy"):
        logp, _ = lm_label_logprobs(model, np.array(batch["x"]), np.array(batch["label"]))
        total -= float(logp.sum())
        count += int((np.asarray(batch["label"]) >= 0).sum())
    return total / max(count, 1)


def writers(cfg: ExperimentConfig, data: SourceData, dirs: Mapping[str, Path]) -> tuple[tuple[str, ...], dict]:
    """The teachers that write responses, and for ``best`` each candidate's validation NLL (the lowest writes)."""
    names = candidates(cfg)
    if cfg.sequence_kd.teachers == "all" or len(names) == 1:
        return names, {}
    jobs = [ray.remote(num_cpus=t.num_cpus)(_validation_nll).remote(str(dirs[t.name]), data.val)
            for t in cfg.teachers if t.name in names]
    nll = dict(zip(names, (round(v, 6) for v in ray.get(jobs))))
    return (min(names, key=nll.__getitem__),), {"validation_nll": nll}


def generate(cfg: ExperimentConfig, data: SourceData, dirs: Mapping[str, Path], spec: ResponseSpec, directory: Path,
             trace_file: str | None = None) -> dict:
    """Generate the writers' responses to every train prompt with Ray Data actor pools whose tasks
    write the Parquet files; then the manifest, and the directory renamed into place."""
    from distill_ray.data.bundled import load_tokenizer
    from distill_ray.teachers.setup import teacher_specs

    start = time.perf_counter()
    names, choice = writers(cfg, data, dirs)
    specs = {t.name: t for t in teacher_specs(cfg, dirs, causal=True)}
    eos = load_tokenizer(data.info.tokenizer).eos_token_id
    args = (decoding_of(cfg), eos, int(data.info.pad_id or 0), data.info.input_shape[-1], trace_file)
    per_teacher = [data.train.select_columns(["id", "x", "label"]).map_batches(
        ResponseRows, fn_constructor_args=(specs[t], *args), batch_format="numpy", batch_size=specs[t].batch_size,
        compute=ray.data.ActorPoolStrategy(size=specs[t].replicas), num_cpus=specs[t].num_cpus,
        num_gpus=specs[t].num_gpus or None) for t in names]
    ds = per_teacher[0].union(*per_teacher[1:]) if len(per_teacher) > 1 else per_teacher[0]
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.write_parquet(str(tmp))
        shards, by_teacher = [], {t: 0 for t in names}
        for path in sorted(tmp.glob("*.parquet")):
            table = pq.read_table(path, columns=["generated_by"])
            for t, n in zip(*np.unique(table.column("generated_by").to_numpy(zero_copy_only=False), return_counts=True)):
                by_teacher[str(t)] += int(n)
            shards.append({"file": path.name, "rows": table.num_rows, "sha256": sha256_file(path)})
        shards = [s for s in shards if s["rows"]]
        if not shards:
            raise ValueError("the teachers wrote no responses (every prompt fills data.max_length)")
        manifest = {"format_version": FORMAT_VERSION, "spec": spec.to_dict(), "generated_by": by_teacher, **choice,
                    "num_rows": sum(s["rows"] for s in shards), "shards": shards,
                    "seconds": round(time.perf_counter() - start, 1), "created_by": f"distill-ray {__version__}"}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in tmp.glob("*.parquet"):
            if path.name not in {s["file"] for s in shards}:
                path.unlink()
        publish_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --- verifying ----------------------------------------------------------------------------------

def verify(directory: Path, expected: ResponseSpec | None = None) -> dict:
    """The manifest of a responses cache, after checking it: StaleCacheError (naming every changed field)
    if it was generated from another spec, CorruptCacheError if a file is missing or changed."""
    try:
        m = json.loads((directory / MANIFEST).read_text())
        spec = ResponseSpec(**m["spec"])
        shards = list(m["shards"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCacheError(f"{directory}: unreadable responses manifest ({type(e).__name__}: {e}); {_HINT}") from e
    if m.get("format_version") != FORMAT_VERSION:
        raise CorruptCacheError(f"{directory}: responses format {m.get('format_version')!r}, this distill-ray reads "
                                f"{FORMAT_VERSION}; {_HINT}")
    if expected is not None and spec != expected:
        raise StaleCacheError(f"{directory}: stale responses, generated from other inputs than now: "
                              f"{'; '.join(changes(spec, expected))}; {_HINT}")
    for s in shards:
        path = directory / str(s["file"])
        if "/" in str(s["file"]) or not path.is_file():
            raise CorruptCacheError(f"{directory}: file {s['file']} listed in {MANIFEST} is missing; {_HINT}")
        if sha256_file(path) != s["sha256"]:
            raise CorruptCacheError(f"{directory}: file {s['file']} is corrupt (sha256 differs from {MANIFEST}); {_HINT}")
    return m


def changes(old: ResponseSpec, new: ResponseSpec) -> list[str]:
    """What differs between two specs, field by field ('decoding.decoding: cached greedy vs now sample')."""
    out = []
    a, b = old.to_dict(), new.to_dict()
    for key in a:
        if isinstance(a[key], dict):
            for k in dict.fromkeys([*a[key], *b[key]]):
                if a[key].get(k) != b[key].get(k):
                    out.append(f"{key}.{k}: cached {abbreviated(a[key].get(k))} vs now {abbreviated(b[key].get(k))}")
        elif a[key] != b[key]:
            out.append(f"{key}: cached {abbreviated(a[key])} vs now {abbreviated(b[key])}")
    return out


def newest_sibling(root: Path, spec: ResponseSpec) -> tuple[Path, ResponseSpec] | None:
    """The most recent other responses cache of the same data, to say what changed since."""
    found = []
    for manifest in root.glob(f"*/{MANIFEST}"):
        try:
            other = ResponseSpec(**json.loads(manifest.read_text())["spec"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if other != spec and other.data_fingerprint == spec.data_fingerprint:
            found.append((manifest.stat().st_mtime, manifest.parent, other))
    return max(found, key=lambda f: f[0])[1:] if found else None


# --- the source data with the responses ----------------------------------------------------------

def with_responses(cfg: ExperimentConfig, data: SourceData, dirs: Mapping[str, Path], rebuild: bool = False,
                   trace_file: str | None = None) -> SourceData:
    """``data`` with the teachers' responses joined to the train split (``source`` = teacher; the
    references get ``source`` = reference), generated now or read from their verified cache. Its
    fingerprint covers the responses, so the soft-target cache built from it is theirs."""
    if cfg.sequence_kd.mode == "off":
        return data
    spec = response_spec(cfg, data.info.fingerprint, teacher_fingerprints(cfg, dirs))
    root = Path(cfg.cache.dir).expanduser() / "responses"
    directory = root / spec.key()
    if directory.exists() and not (rebuild or cfg.cache.rebuild):
        manifest = verify(directory, spec)  # a damaged cache is refused, never silently regenerated
        print(f"responses: reusing verified cache {directory} ({manifest['num_rows']:,} rows by "
              f"{', '.join(manifest['generated_by'])}; no generate calls)", flush=True)
    else:
        before = newest_sibling(root, spec) if root.is_dir() else None
        if before is not None:
            print(f"responses: the cache for this data at {before[0]} was generated with other settings "
                  f"({'; '.join(changes(before[1], spec))}); generating anew", flush=True)
        manifest = generate(cfg, data, dirs, spec, directory, trace_file)
        pick = f", the best on validation NLL {manifest['validation_nll']}" if "validation_nll" in manifest else ""
        print(f"responses: {manifest['num_rows']:,} responses by {', '.join(manifest['generated_by'])}{pick} "
              f"({spec.decoding['decoding']}, max_new_tokens {spec.decoding['max_new_tokens']}) generated in "
              f"{manifest['seconds']:.0f}s at {directory}", flush=True)
    files = [str(directory / s["file"]) for s in manifest["shards"]]
    responses = ray.data.read_parquet(files, partitioning=None).select_columns(list(COLUMNS))
    rows = data.rows.map_batches(reference_columns, batch_format="numpy").select_columns(list(COLUMNS))
    # The splits' rows carry no ``split`` column (``rows.rows_of_split``); the responses are train rows.
    per_split = [c for c in COLUMNS if c != "split"]
    splits = {s: ds.map_batches(reference_columns, batch_format="numpy").select_columns(per_split)
              for s, ds in data.splits.items()}
    splits["train"] = splits["train"].union(responses.select_columns(per_split))
    info = data.info
    fingerprint = hashlib.sha256(f"{info.fingerprint}/responses/{spec.key()}".encode()).hexdigest()[:16]
    counts = {**info.counts, "train": info.counts["train"] + manifest["num_rows"]}
    labeled = {**info.labeled, "train": info.labeled["train"] + manifest["num_rows"]}
    info = dataclasses.replace(info, fingerprint=fingerprint, counts=counts, labeled=labeled)
    return SourceData(info=info, rows=rows.union(responses), splits=splits)


# --- which rows a run trains on ------------------------------------------------------------------

def train_sources(cfg: ExperimentConfig, use_teachers: bool) -> str | None:
    """The ``source`` of the train rows a run reads: the baseline the references alone (it learns without
    teachers), the student in mode ``teacher`` the teachers' responses alone; None: every row."""
    if cfg.sequence_kd.mode == "off" and use_teachers:
        return None
    if not use_teachers:
        return REFERENCE
    return TEACHER if cfg.sequence_kd.mode == "teacher" else None


def rows_of_source(files: list[str], source: str) -> int:
    """Train rows of ``source`` in a cache's files (only the ``source`` column is read)."""
    return sum(int((pq.read_table(f, columns=["source"]).column("source").to_numpy(zero_copy_only=False)
                    == source).sum()) for f in files)
