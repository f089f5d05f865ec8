"""Frozen teachers: what one is (``TeacherSpec``) and the plain-Python core that answers batches.

``TeacherRunner`` loads, freezes, infers and counts; it runs inside the replicas of a teacher's
service (``teachers/service.py``), which answer both the cache build and online mode.
Teachers return plain data: ``{"logits": [N, C]}`` or ``{"topk_logprobs": [N, k], "topk_indices":
[N, k]}`` (fp16 / int32), never model objects. A causal-LM teacher with a tokenizer of its own
answers the same columns for the student's positions and vocabulary (``teachers/cross_tokenizer.py``). Asked for ``features``, they add ``"hint"`` [N, D]
and/or ``"attention"`` [N, P] (fp16) for feature distillation (online mode only).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from distill_ray.kd.feature_losses import attention_map
from distill_ray.kd.losses import teacher_topk
from distill_ray.models import batched_features, batched_logits, fingerprint, forward_logits, freeze, load_model
from distill_ray.teachers.spec import TeacherSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FEATURES = ("hint", "attention")  # what a teacher can serve besides its soft targets


class TeacherRunner:
    """Loads one teacher (eval, no grad), answers batches, and counts what it did."""

    def __init__(self, name: str, model_dir: str, dtype: str = "float32", topk: int | None = None,
                 torch_threads: int | None = None, cross=None):
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
        self.cross = cross  # a CrossTokenizerTeacher when the teacher has a tokenizer of its own
        self.rows = 0
        self.batches = 0
        self.seconds = 0.0
        self.generate_calls = 0  # sequence-level KD: batched generate calls and the responses they wrote
        self.generated_rows = 0

    @classmethod
    def from_spec(cls, spec: TeacherSpec, torch_threads: int | None = None) -> "TeacherRunner":
        cross = None
        if spec.tokenizer is not None:
            from distill_ray.teachers.cross_tokenizer import CrossTokenizerTeacher

            cross = CrossTokenizerTeacher(spec.student_tokenizer, spec.tokenizer, spec.cross_tokenizer, spec.topk)
        return cls(spec.name, spec.model_dir, spec.dtype, spec.topk, torch_threads, cross)

    def assert_frozen(self) -> None:
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if self.model.training or trainable:
            raise AssertionError(f"teacher {self.name} is trainable: training={self.model.training}, "
                                 f"params with grad: {trainable[:3]}")

    @torch.inference_mode()
    def infer(self, inputs: np.ndarray, features: tuple[str, ...] = (), labels: np.ndarray | None = None
              ) -> dict[str, np.ndarray]:
        """Soft targets for one batch: full logits (float32) or top-k log-probs (fp16) + indices (int32).

        ``features`` adds ``"hint"``: [N, D] (``models.forward_with_features``) and/or ``"attention"``: [N, P]
        (``feature_losses.attention_map`` of its attention features, already reduced and L2-normalised),
        both float16 to keep the payload small.
        """
        self.assert_frozen()
        start = time.perf_counter()
        if self.cross is not None:
            if features:
                raise ValueError(f"teacher {self.name}: features are not available from a teacher with its own tokenizer")
            out = self.cross.answer(self.model, inputs, labels, self.device)
        else:
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

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], decoding, eos_id: int | None, pad_id: int,
                 seeds: list[int] | None = None, max_new_tokens: list[int] | None = None) -> list[list[int]]:
        """Responses to ``prompts`` (token ids) by one batched ``generate``: ``sequence_kd.generate_responses``."""
        from distill_ray.lm.sequence_kd import generate_responses

        self.assert_frozen()
        start = time.perf_counter()
        out = generate_responses(self.model, prompts, decoding, eos_id, pad_id, seeds, max_new_tokens)
        self.seconds += time.perf_counter() - start
        self.generate_calls += 1
        self.generated_rows += len(prompts)
        return out

    def stats(self) -> dict[str, Any]:
        out = {"name": self.name, "rows": self.rows, "batches": self.batches, "seconds": self.seconds,
               "fingerprint": self.fingerprint, "generate_calls": self.generate_calls,
               "generated_rows": self.generated_rows}
        if self.cross is not None:  # the share of labeled student positions the teacher could answer
            out["aligned_share"] = self.cross.aligned / max(self.cross.positions, 1)
        return out
