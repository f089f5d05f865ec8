"""A worker's training state: what a step or an epoch changes, what a checkpoint carries and what
resuming restores.

``TrainState`` holds the student, its optimizer, the blend (and its optimizer, a language model's),
the hint projector, a self_ema teacher's moving average, the counters, the current epoch's selection
(curriculum stage, open fraction and a kept shard's order), the best validation epoch's student, the
blend fit and the history.
``state_dict()`` is the checkpoint's ``train_state.pt``: tensors, numbers, strings and lists only,
so it loads with ``torch.load(weights_only=True)``; the history goes beside it as JSON. A mid-epoch
checkpoint of a kept shard carries the epoch's order, so the resumed epoch trains exactly the rows
it had left; a streamed one carries the count of batches done (its stream skips them).
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
from ray.train import Checkpoint

from distill_ray.kd.blending import TeacherBlend
from distill_ray.kd.feature_losses import HintProjector
from distill_ray.models import unwrap_model
from distill_ray.train.epochs import EpochSelection

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


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


@dataclass(eq=False)
class TrainState:
    """Everything the loop changes and a checkpoint keeps (the RNGs are read when it is saved)."""

    model: torch.nn.Module  # the student as Ray Train prepared it (DDP-wrapped with several ranks)
    optimizer: torch.optim.Optimizer  # the student's (and the hint projector's) parameters
    blend: TeacherBlend
    projector: HintProjector | None = None
    blend_optimizer: torch.optim.Optimizer | None = None  # a language model's blend learns along the way
    ema: torch.nn.Module | None = None  # a self_ema teacher: the moving average of the student's weights
    epoch: int = 0
    step: int = 0  # optimizer steps taken, over the whole run
    batch_in_epoch: int = 0  # batches of the current epoch done
    selection: EpochSelection = field(default_factory=EpochSelection)  # the current epoch's rows
    resumed: EpochSelection | None = None  # from a kept shard's mid-epoch checkpoint: the epoch to finish
    best_score: Any = None  # (accuracy, -loss) or (-perplexity, 0) of the best validation epoch
    best_epoch: int | None = None
    best_student: dict[str, torch.Tensor] | None = None  # the student's weights at that epoch
    blend_fit: dict[str, float] = field(default_factory=dict)  # the fit before training: loss, rows
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per logged step and per epoch

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``train_state.pt``: plain tensors, numbers and lists (``weights_only`` loads)."""
        return {"student": unwrap_model(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "blend": self.blend.state_dict(),
                "projector": self.projector.state_dict() if self.projector is not None else None,
                "blend_optimizer": self.blend_optimizer.state_dict() if self.blend_optimizer else None,
                "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch, "rng": _rng_state(),
                "stage": self.selection.stage, "open_fraction": self.selection.fraction,
                "order": self.selection.order if self.batch_in_epoch else None,
                "best_score": self.best_score, "best_epoch": self.best_epoch, "best_student": self.best_student,
                "blend_fit": self.blend_fit, "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to a saved state (modules, optimizers, counters, bookkeeping, RNGs)."""
        unwrap_model(self.model).load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.blend.load_state_dict(state["blend"])
        if self.projector is not None:
            self.projector.load_state_dict(state["projector"])
        if self.blend_optimizer is not None and state.get("blend_optimizer"):
            self.blend_optimizer.load_state_dict(state["blend_optimizer"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.best_score, self.best_epoch = state.get("best_score"), state.get("best_epoch")
        self.best_student = state.get("best_student")
        self.blend_fit = state.get("blend_fit") or {}
        if self.ema is not None and state.get("ema") is not None:  # the average goes on where it stopped
            self.ema.load_state_dict(state["ema"])
        if state.get("order") is not None:
            self.resumed = EpochSelection(state["stage"], state["open_fraction"], state["order"])
        _set_rng_state(state["rng"])

    def restore(self, checkpoint: Checkpoint, device) -> None:
        """Load a checkpoint's state and history (safe load, no pickle)."""
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=True, map_location=device)
            self.history = json.loads((Path(ckpt_dir) / HISTORY_FILE).read_text())
        self.load_state_dict(state)

    def report(self, metrics: dict[str, Any], rank: int) -> None:
        """Every rank reports (report is a barrier); only rank 0 attaches the state as a checkpoint."""
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(self.state_dict(), Path(tmp) / STATE_FILE)
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(self.history))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def keep_if_best(self, score: tuple[float, float]) -> None:
        """Keep the student if ``score`` is its best validation epoch yet (compared as tuples)."""
        if isinstance(self.best_score, (int, float)):  # a checkpoint from before the tie-break
            self.best_score = (self.best_score, float("-inf"))
        if self.best_score is None or tuple(score) > tuple(self.best_score):
            self.best_score, self.best_epoch = score, self.epoch
            self.best_student = {k: v.detach().cpu().clone() for k, v in unwrap_model(self.model).state_dict().items()}
