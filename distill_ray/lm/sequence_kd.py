"""Sequence-level KD, the pure part: prompts out of instruction rows, teachers' responses by batched,
left-padded ``generate`` seeded per row, and the training rows built from them. No Ray.

A teacher row has the layout of ``preprocess.instruction_rows``: ``x`` = prompt + response (+ eos) right-padded
to ``max_length``, ``label`` = the next token at every response position and IGNORE_LABEL on the
prompt and the padding, so the loss and the token-level teacher stage treat it like a reference row.

Sampling draws every row's noise from its own generator, seeded by (seed, row id, teacher): a row's
response is the same whichever rows share its batch and whatever the batch size
(``generation.SeededSampling``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from distill_ray.config import SEQKD_DECODINGS
from distill_ray.data.rows import IGNORE_LABEL, hash_to_id
from distill_ray.lm.generation import batched_responses

REFERENCE, TEACHER = "reference", "teacher"  # the ``source`` column


@dataclass(frozen=True)
class Decoding:
    """How a teacher writes its responses: what a responses cache was generated with."""

    decoding: str = "greedy"
    max_new_tokens: int = 64
    temperature: float | None = None
    """Sampling only (None for greedy, so greedy caches do not differ by an unused value)."""
    top_p: float | None = None
    seed: int | None = None

    @classmethod
    def of(cls, decoding: str, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> "Decoding":
        if decoding not in SEQKD_DECODINGS:
            raise ValueError(f"decoding {decoding!r}; choose one of: {', '.join(SEQKD_DECODINGS)}")
        if decoding == "greedy":
            return cls("greedy", max_new_tokens)
        return cls("sample", max_new_tokens, float(temperature), float(top_p), int(seed))


def prompt_of(x: np.ndarray, label: np.ndarray) -> list[int]:
    """The prompt of one instruction row: every token up to and including the one whose next token is
    the first labelled (``generation.prompts_and_references``' rule); [] when nothing is labelled."""
    taught = np.flatnonzero(np.asarray(label) >= 0)
    return np.asarray(x)[:taught[0] + 1].tolist() if len(taught) else []


def pack_row(prompt: list[int], response: list[int], max_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(x, label, cut) of prompt + response as one row of ``max_length`` (+1 for the shifted labels),
    the layout of ``preprocess.instruction_rows``: labels only on the response's tokens."""
    seq = list(prompt) + list(response)
    cut = len(seq) > max_length + 1
    seq = seq[:max_length + 1]
    x = np.full(max_length, pad_id, np.int64)
    y = np.full(max_length, IGNORE_LABEL, np.int64)
    x[:len(seq) - 1] = seq[:-1]
    start = max(len(prompt) - 1, 0)  # position j predicts token j + 1
    y[start:len(seq) - 1] = seq[start + 1:]
    return x, y, cut


def row_seed(seed: int, row_id: int, teacher: str) -> int:
    """The seed of one row's sampling generator: a function of (seed, id, teacher) only."""
    entropy = np.random.SeedSequence([seed % 2**32, int(row_id) & 0xFFFFFFFF, int(row_id) >> 32,
                                      zlib.crc32(teacher.encode())]).generate_state(2, np.uint32)
    return int(entropy[0]) << 32 | int(entropy[1])


def teacher_row_ids(ids: np.ndarray, teacher: str) -> np.ndarray:
    """Ids of the rows ``teacher`` wrote for the rows ``ids``: hashes of "id/seqkd/teacher" (the id
    scheme of ``preprocess.window_rows``), unique beside the references' and the other teachers' ids."""
    return hash_to_id([f"{int(i)}/seqkd/{teacher}" for i in np.asarray(ids)])


def generate_responses(model: torch.nn.Module, prompts: list[list[int]], decoding: Decoding, eos_id: int | None,
                       pad_id: int, seeds: list[int] | None = None,
                       max_new_tokens: list[int] | None = None) -> list[list[int]]:
    """Each prompt's response as ``decoding`` says, by one batched ``generate`` over the prompts
    (``generation.batched_responses``), cut after its eos (kept: the student learns where to stop) or
    at its own ``max_new_tokens`` (default ``decoding.max_new_tokens``). ``seeds``: one per prompt,
    for sampling (``row_seed``)."""
    sample = decoding.decoding == "sample"
    return batched_responses(model, prompts, decoding.max_new_tokens if max_new_tokens is None else max_new_tokens,
                             eos_id, pad_id, temperature=decoding.temperature if sample else None,
                             top_p=decoding.top_p if sample else 1.0, seeds=seeds, keep_eos=True)


def teacher_rows(batch: dict[str, np.ndarray], teacher: str, responses: list[list[int]], prompts: list[list[int]],
                 max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """The rows ``teacher`` wrote for ``batch`` of train rows (its responses, in batch order): new ids, prompt +
    response packed like a reference, ``source`` = teacher, ``generated_by`` = the teacher, ``prompt_id``
    = the reference row's id. Rows whose response is empty or fell outside the window are left out
    (nothing to learn)."""
    n = len(responses)
    xs = np.full((n, max_length), pad_id, np.int64)
    ys = np.full((n, max_length), IGNORE_LABEL, np.int64)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        xs[i], ys[i], _ = pack_row(prompt, response, max_length, pad_id)
    taught = (ys >= 0).any(1)
    ids = np.asarray(batch["id"], np.int64)
    return {"id": teacher_row_ids(ids, teacher)[taught], "x": xs[taught], "label": ys[taught],
            "split": np.full(taught.sum(), "train"), "source": np.full(taught.sum(), TEACHER, dtype=object).astype(str),
            "generated_by": np.full(taught.sum(), teacher, dtype=object).astype(str), "prompt_id": ids[taught]}


def reference_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A reference row with the columns teacher rows carry (``source``, ``generated_by``, ``prompt_id``),
    so both union into one dataset."""
    n = len(batch["id"])
    return {**batch, "source": np.full(n, REFERENCE, dtype=object).astype(str),
            "generated_by": np.full(n, "", dtype=object).astype(str), "prompt_id": np.asarray(batch["id"], np.int64)}


def window_budget(prompts: list[list[int]], max_length: int, max_new_tokens: int) -> list[int]:
    """New tokens worth generating per prompt: at most ``max_new_tokens``, and no more than the window
    (``max_length`` + 1 tokens of prompt + response) has room for."""
    return [max(0, min(max_new_tokens, max_length + 1 - len(p))) for p in prompts]


def rows_from(batch: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The rows of ``source`` (reference or teacher), without the ``source`` column."""
    of_source = np.asarray(batch["source"]) == source
    return {k: np.asarray(v)[of_source] for k, v in batch.items() if k != "source"}
