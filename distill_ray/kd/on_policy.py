"""On-policy distillation of a language model, as functions of tensors (GKD: Agarwal et al. 2024, the
names of TRL's ``GKDTrainer``): which steps are on-policy, the batch the student's own responses make,
the teachers' scores laid on its positions, the facts a user watches (the loss on its response tokens is
``objectives.on_policy_loss``),
and the guard that stops a run whose responses collapse.

The student's sampling is ``lm.generation.batched_responses`` and asking the teachers is
``train/rollouts.py``; nothing here knows of Ray or steps an optimizer."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from distill_ray.data.rows import IGNORE_LABEL
from distill_ray.kd.objectives import TokenTopK
from distill_ray.lm.sequence_kd import row_seed


def is_on_policy_step(lmbda: float, seed: int, step: int) -> bool:
    """Whether optimizer step ``step`` trains on the student's own responses: a draw with probability
    ``lmbda`` that depends on (seed, step) alone, so every rank and a resumed run decide alike."""
    if lmbda <= 0.0:
        return False
    return lmbda >= 1.0 or random.Random(f"on-policy/{seed}/{step}").random() < lmbda


def sampling_seeds(seed: int, step: int, ids: np.ndarray) -> list[int]:
    """One sampling seed per row, from (seed, step, row id) alone (``sequence_kd.row_seed``, the step in
    place of a teacher's name): a row's response does not depend on the rows beside it, and a resumed
    step writes the same responses."""
    return [row_seed(seed, int(i), f"on-policy/{step}") for i in np.asarray(ids, np.int64)]


def response_budgets(prompts: list[list[int]], max_new_tokens: int, window: int) -> list[int]:
    """How many tokens each prompt's response may have: ``max_new_tokens``, cut so that prompt and
    response (less its last token, which is only predicted) fit the student's input window."""
    return [max(0, min(max_new_tokens, window + 1 - len(p))) for p in prompts]


@dataclass(frozen=True, eq=False)
class Rollout:
    """The student's responses as a training batch. ``x`` ``[B, W]``: prompt then response, less the
    last token, right-padded with ``pad``; ``labels`` ``[B, W]``: the next token at every position
    that predicts a response token, ``IGNORE_LABEL`` elsewhere; ``positions`` ``[B, R]``: those positions in order,
    -1 padded (what the teachers score); ``lengths`` ``[B]``: tokens written (eos included);
    ``ended`` ``[B]``: the response ends with eos; ``budgets`` ``[B]``: its ``max_new_tokens``."""

    x: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    ended: torch.Tensor
    budgets: torch.Tensor

    def to(self, device) -> Rollout:
        return Rollout(*(t.to(device) for t in (self.x, self.labels, self.positions, self.lengths, self.ended,
                                                self.budgets)))


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], budgets: list[int], pad_id: int,
                  eos_id: int | None) -> Rollout:
    """The training batch of prompts and the student's ``responses`` (eos kept where written)."""
    sequences = [p + r for p, r in zip(prompts, responses)]
    width = max(1, max(len(s) - 1 for s in sequences))
    longest = max(1, max(len(r) for r in responses))
    x = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_LABEL, dtype=torch.long)
    positions = torch.full((len(prompts), longest), -1, dtype=torch.long)
    for b, (prompt, response, seq) in enumerate(zip(prompts, responses, sequences)):
        x[b, :len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
        if response:
            at = torch.arange(len(prompt) - 1, len(seq) - 1)
            labels[b, at] = torch.tensor(response, dtype=torch.long)
            positions[b, :len(response)] = at
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    ended = torch.tensor([eos_id is not None and bool(r) and r[-1] == eos_id for r in responses])
    return Rollout(x, labels, positions, lengths, ended, torch.tensor(budgets, dtype=torch.long))


def scored_targets(answers: list[dict[str, np.ndarray]], positions: torch.Tensor, width: int, k: int) -> TokenTopK:
    """The teachers' scores (``TeacherReplica.score``: top-k log-probs and indices ``[B, R, k]`` at
    ``positions``) laid on the batch's positions as ``TokenTopK`` ``[K, B, W, k]``; positions no
    teacher scored (prompt, padding) are NaN, which every token loss leaves out."""
    batch = positions.shape[0]
    logprobs = torch.full((len(answers), batch, width, k), float("nan"))
    indices = torch.zeros((len(answers), batch, width, k), dtype=torch.long)
    rows, slots = (positions >= 0).nonzero(as_tuple=True)
    if len(rows):
        at = positions[rows, slots]
        logprobs[:, rows, at] = torch.stack([torch.as_tensor(a["topk_logprobs"]).float() for a in answers])[:, rows, slots]
        indices[:, rows, at] = torch.stack([torch.as_tensor(a["topk_indices"]).long() for a in answers])[:, rows, slots]
    return TokenTopK(logprobs, indices)


def rollout_metrics(rollout: Rollout, targets: TokenTopK, student_logits: torch.Tensor) -> dict[str, float]:
    """What a user of on-policy KD watches per step: mean response length, the share of responses that
    end with eos, the teachers' probability of the tokens the student wrote (from their top k: 0 for a
    token outside it) and how often a teacher's top token is the student's, over response positions."""
    labels = rollout.labels[:, :student_logits.shape[1]]
    logp, aligned = targets.finite()
    logp, indices, aligned = logp[:, :, :labels.shape[1]], targets.indices[:, :, :labels.shape[1]], \
        aligned[:, :, :labels.shape[1]]
    at = (labels >= 0).unsqueeze(0) & aligned  # [K, B, L]
    written = (indices == labels.unsqueeze(0).unsqueeze(-1)) & at.unsqueeze(-1)
    token_prob = (logp.exp() * written).sum(-1)
    agree = indices[..., 0] == student_logits.argmax(-1).unsqueeze(0)
    count = max(int(at.sum()), 1)
    return {"on_policy/response_len": rollout.lengths.float().mean().item(),
            "on_policy/eos_share": rollout.ended.float().mean().item(),
            "on_policy/teacher_token_prob": (token_prob * at).sum().item() / count,
            "on_policy/top1_agreement": (agree & at).sum().item() / count}


class CollapseGuard:
    """Counts on-policy steps in a row whose responses all collapsed: every one empty (eos first), or
    every one cut at its budget without eos (only when the tokenizer has an eos to write). ``update``
    returns the reason once ``steps`` such steps ran in a row."""

    def __init__(self, steps: int, has_eos: bool):
        self.steps, self.has_eos, self.in_a_row, self.kind = steps, has_eos, 0, None

    def collapsed(self, rollout: Rollout) -> str | None:
        written = rollout.lengths - rollout.ended.long()  # tokens before any eos
        if bool((rollout.budgets == 0).all()):
            return "no_room"
        if bool((written == 0).all()):
            return "empty"
        if self.has_eos and bool(((rollout.lengths >= rollout.budgets) & ~rollout.ended).all()):
            return "capped"
        return None

    def update(self, rollout: Rollout) -> str | None:
        kind = self.collapsed(rollout)
        self.in_a_row = self.in_a_row + 1 if kind is not None else 0
        self.kind = kind or self.kind
        return self.message() if self.in_a_row >= self.steps else None

    def message(self) -> str:
        what = {"empty": "every response was empty (the student wrote eos first)",
                "capped": "every response ran to loss.on_policy.max_new_tokens without an end-of-sequence token",
                "no_room": "every prompt filled the input window (data.max_length), leaving no room to write"}[self.kind]
        return (f"on-policy responses collapsed: for {self.in_a_row} on-policy steps in a row {what}, so the run "
                "stopped. Let the student learn from the references first (a lower loss.on_policy.lmbda, or a "
                "student cut from a teacher with student.init), or change loss.on_policy.max_new_tokens, "
                "temperature or collapse_steps")
