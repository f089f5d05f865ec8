"""A teacher with its own tokenizer answers for the student's positions: re-tokenize, forward, align, carry.

Runs inside a teacher actor (``TeacherRunner``), no Ray here. The row's text is the student's ids
decoded (``token_alignment.decode_with_spans``), not a text column: it keeps the cache and the online
stream exactly as they are, the student's character spans in it are exact by construction, and it is
the text the student itself learns from (lossless for a byte-level BPE student; an uncased WordPiece
student's text is lowercased with spaced-out punctuation, and the teacher reads that).

The answer has the shape and columns of a same-tokenizer teacher's per-token top-k (``[N, L, k]``
log-probs + student ids), so the cache, the blend and the loss read it unchanged, with two marks:
positions with no aligned teacher position hold NaN log-probs (the loss masks them out, the cache keeps
them as NaN), and under ``uld`` the indices are placeholders (``arange(k)``): the values are the
teacher's own k largest log-probabilities, sorted, which is all ULD compares.
"""

from __future__ import annotations

import numpy as np
import torch

from distill_ray.config import CROSS_TOKENIZER_KINDS
from distill_ray.kd.losses import teacher_topk
from distill_ray.models import forward_logits
from distill_ray.teachers.token_alignment import align_rows, carry_topk, filler_pool, tables, vocab_maps

MICRO_BATCH = 8  # teacher rows per forward: [8, L, V] logits, cut to the top k before the next


class CrossTokenizerTeacher:
    """The tokenizer half of a cross-tokenizer teacher: built once per actor (vocabulary-long passes)."""

    def __init__(self, student_tokenizer: str, teacher_tokenizer: str, mode: str, k: int):
        from distill_ray.data.bundled import load_tokenizer

        if mode not in CROSS_TOKENIZER_KINDS:
            raise ValueError(f"loss.cross_tokenizer {mode!r}; choose one of: {', '.join(CROSS_TOKENIZER_KINDS)}")
        self.mode, self.k = mode, k
        self.student_tok, self.teacher_tok = load_tokenizer(student_tokenizer), load_tokenizer(teacher_tokenizer)
        self.student = tables(self.student_tok)
        self.maps = vocab_maps(tables(self.teacher_tok), self.student)
        self.pool = filler_pool(self.maps, self.student.vocab_size, self.student.special_ids, k)
        self.pad_id = self.teacher_tok.pad_token_id if self.teacher_tok.pad_token_id is not None else 0
        self.positions = 0  # student positions with a label, answered so far
        self.aligned = 0  # ... of which had an aligned teacher position

    def answer(self, model, inputs: np.ndarray, labels: np.ndarray | None, device) -> dict[str, np.ndarray]:
        """``{"topk_logprobs": [N, L, k] float16 (NaN: unaligned), "topk_indices": [N, L, k] int32}``
        for student ids ``inputs`` [N, L]; ``labels`` [N, L] (< 0: nothing to learn there) let the last
        position align (its next token is the last label) and count the aligned share."""
        inputs = np.asarray(inputs)
        n, length = inputs.shape
        last = None if labels is None else np.asarray(labels)[:, -1]
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        rows = align_rows(self.student, self.teacher_tok, inputs, last, limit)
        out_logp = np.full((n, length, self.k), np.nan, np.float32)
        out_idx = np.broadcast_to(np.arange(self.k), (n, length, self.k)).copy()
        for start in range(0, n, MICRO_BATCH):
            chunk = rows[start:start + MICRO_BATCH]
            width = max(1, max(len(r.teacher_ids) for r in chunk))
            ids = np.full((len(chunk), width), self.pad_id, np.int64)
            for r, row in enumerate(chunk):
                ids[r, :len(row.teacher_ids)] = row.teacher_ids
            logits = forward_logits(model, torch.as_tensor(ids, device=device)).float()  # right padding: causal, harmless
            logp, idx = (t.cpu().numpy() for t in teacher_topk(logits, self.k))
            for r, row in enumerate(chunk):
                aligned = row.aligned
                at = row.positions[aligned]
                if self.mode == "map":
                    values, student_ids, _ = carry_topk(logp[r, at], idx[r, at], self.maps, row.context[aligned],
                                                        self.pool, self.student.vocab_size)
                    out_idx[start + r, aligned] = student_ids
                else:
                    values = logp[r, at]  # already descending
                out_logp[start + r, aligned] = values
        if labels is not None:
            taught = np.asarray(labels) >= 0
            self.positions += int(taught.sum())
            self.aligned += int((taught & ~np.isnan(out_logp[..., 0])).sum())
        return {"topk_logprobs": out_logp.astype(np.float16), "topk_indices": out_idx.astype(np.int32)}
