"""An on-policy step's batch (``loss.on_policy``): the student writes responses to the batch's prompts in
the Train worker, and every teacher's service scores them. The tensor work is ``kd/on_policy.py``; this
is the edge where the worker asks Ray."""

from __future__ import annotations

import ray
import torch

from distill_ray.kd.objectives import TokenTopK
from distill_ray.kd.on_policy import Rollout, response_budgets, rollout_batch, sampling_seeds, scored_targets
from distill_ray.lm.generation import batched_responses, prompts_and_references
from distill_ray.train.options import WorkerOptions


def student_rollout(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, step: int,
                    opts: WorkerOptions, device) -> tuple[Rollout, TokenTopK]:
    """The student's sampled responses to the prompts of the batch's rows (the tokens before each row's
    first labelled position; rows without one are left out), as a batch on ``device``, and the teachers'
    top-k scores of every response position, asked of all teachers at once through their services."""
    on_policy = opts.config.loss.on_policy
    taught = (y >= 0).any(1).cpu().numpy()
    prompts = [p for p, _ in prompts_and_references(x.cpu().numpy(), y.cpu().numpy())]
    budgets = response_budgets(prompts, on_policy.max_new_tokens, opts.input_shape[-1])
    responses = batched_responses(model, prompts, budgets, opts.eos_id, opts.pad_id,
                                  temperature=on_policy.temperature, top_p=on_policy.top_p,
                                  seeds=sampling_seeds(opts.config.train.seed, step, ids.cpu().numpy()[taught]),
                                  keep_eos=True)
    rollout = rollout_batch(prompts, responses, budgets, opts.pad_id, opts.eos_id)
    tokens, positions = rollout.x.numpy(), rollout.positions.numpy()
    # nothing written, nothing to score: scored_targets reads no answer then
    answers = ray.get([service.score_async(tokens, positions, opts.topk) for service in opts.scorers]) \
        if (positions >= 0).any() else [{} for _ in opts.scorers]
    targets = scored_targets(answers, rollout.positions, tokens.shape[1], opts.topk)
    return rollout.to(device), TokenTopK(targets.logprobs.to(device), targets.indices.to(device))
