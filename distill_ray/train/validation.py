"""A worker's work on its validation rows: fitting the learned teacher weights to their labels
before training, and the metrics of each epoch (summed across DDP ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distill_ray.kd.blending import TeacherBlend, fit_blend
from distill_ray.config import ExperimentConfig
from distill_ray.models import forward_logits, unwrap_model
from distill_ray.kd.objectives import _allreduce_grads, teacher_signal

ECE_BINS = 15


def fit_blend_on_validation(cfg: ExperimentConfig, blend: TeacherBlend, val_batches, names: tuple[str, ...],
                            num_classes: int, topk: int | None, device, world: int) -> dict[str, float]:
    """Fit the learned teacher weights to this rank's labeled validation rows (every rank's together:
    gradients are averaged), once, before training. Validation is data no recipe teacher trained
    on; fit on the teachers' own training rows, the weights would favour whichever overfits most.
    Returns the fit's loss and the rows it saw, for the history."""
    teacher_batches, labels, features = [], [], []
    for batch in val_batches:
        labeled = batch["label"] >= 0
        if labeled.any():
            rows = {k: v[labeled] for k, v in batch.items()}
            teacher_batches.append(teacher_signal(rows, names, num_classes, topk, False, "cpu").logits)
            labels.append(batch["label"][labeled].long())
            features.append(batch["x"][labeled].flatten(1).float() if blend.kind == "learned_gate" else None)
    found = torch.tensor([sum(len(y) for y in labels)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(found)
    if found.item() == 0:
        raise ValueError(f"blend.kind={cfg.blend.kind} fits the teacher weights to labeled validation rows, and the "
                         "validation split has none: label some validation rows, or use blend.kind=uniform or confidence")
    teacher = torch.cat(teacher_batches, dim=1).to(device) if teacher_batches else torch.zeros(len(names), 0, num_classes, device=device)
    y = torch.cat(labels).to(device) if labels else torch.zeros(0, dtype=torch.long, device=device)
    x = torch.cat(features).to(device) if features and features[0] is not None else None
    loss = fit_blend(blend, teacher, y, x, lr=cfg.blend.lr, steps=cfg.blend.fit_steps,
                     average_grads=lambda module: _allreduce_grads(module, world))
    if blend.kind == "learned_gate" and x is not None:
        blend.weights(teacher, features=x)  # mean_weights() of a gate: its mean over validation
    return {"blend_fit_loss": loss, "blend_fit_rows": int(found.item())}


def _teacher_top1(batch: dict[str, torch.Tensor], name: str, topk: int | None) -> torch.Tensor | None:
    if f"{name}/logits" in batch:
        return batch[f"{name}/logits"].float().argmax(-1)
    if f"{name}/topk_indices" in batch:
        top1 = batch[f"{name}/topk_indices"][..., 0].long()
        # -1 where a teacher with its own tokenizer has no aligned position: it agrees with no prediction
        return top1.masked_fill(torch.isnan(batch[f"{name}/topk_logprobs"][..., 0].float()), -1)
    return None


def _allreduce_sums(sums: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    if world > 1:
        for v in sums.values():
            dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return sums


@torch.no_grad()
def validate(model, val_batches, names: tuple[str, ...], topk: int | None, causal: bool, world: int,
             device) -> dict[str, float]:
    """Validation metrics streamed over this rank's part of the split, summed across ranks:
    classification accuracy, loss, ECE and agreement with each teacher; causal LM perplexity,
    next-token accuracy and top-1 agreement."""
    m = unwrap_model(model)
    was_training = m.training
    m.eval()
    K = len(names)
    sums = {"n": torch.zeros((), dtype=torch.float64), "correct": torch.zeros((), dtype=torch.float64),
            "nll": torch.zeros((), dtype=torch.float64), "agree": torch.zeros(K, dtype=torch.float64),
            "agree_n": torch.zeros(K, dtype=torch.float64), "bin_n": torch.zeros(ECE_BINS, dtype=torch.float64),
            "bin_conf": torch.zeros(ECE_BINS, dtype=torch.float64), "bin_correct": torch.zeros(ECE_BINS, dtype=torch.float64)}
    for batch in val_batches:
        x, y = batch["x"].to(device), batch["label"].long()
        logits = forward_logits(m, x).float().cpu()
        if causal:
            y = y[:, :logits.shape[1]]
            mask = y >= 0
            logp = torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            predicted = logits.argmax(-1)
            sums["n"] += mask.sum()
            sums["nll"] -= logp[mask].double().sum()
            sums["correct"] += ((predicted == y) & mask).sum()
        else:
            mask = y >= 0
            probs = logits.softmax(-1)
            confidence, predicted = probs.max(-1)
            correct = (predicted == y) & mask
            sums["n"] += mask.sum()
            sums["correct"] += correct.sum()
            sums["nll"] += F.cross_entropy(logits[mask], y[mask], reduction="sum").double() if mask.any() else 0.0
            bins = torch.clamp(torch.ceil(confidence * ECE_BINS).long() - 1, 0, ECE_BINS - 1)[mask]
            sums["bin_n"] += torch.bincount(bins, minlength=ECE_BINS).double()
            sums["bin_conf"] += torch.bincount(bins, weights=confidence[mask].double(), minlength=ECE_BINS)
            sums["bin_correct"] += torch.bincount(bins, weights=correct[mask].double(), minlength=ECE_BINS)
        for k, name in enumerate(names):
            top1 = _teacher_top1(batch, name, topk)
            if top1 is not None:
                top1 = top1[:, :predicted.shape[1]] if causal else top1
                region = mask & (top1 >= 0) if causal else torch.ones_like(predicted, dtype=torch.bool)
                sums["agree"][k] += ((predicted == top1) & region).sum()
                sums["agree_n"][k] += region.sum()
    m.train(was_training)
    sums = _allreduce_sums(sums, world)
    n = sums["n"].clamp_min(1)
    if causal:
        metrics = {"val_perplexity": float(torch.exp(sums["nll"] / n)), "val_accuracy": float(sums["correct"] / n),
                   "val_loss": float(sums["nll"] / n)}
    else:
        gap = (sums["bin_correct"] - sums["bin_conf"]).abs()
        metrics = {"val_accuracy": float(sums["correct"] / n), "val_loss": float(sums["nll"] / n),
                   "val_ece": float(gap.sum() / n)}
    for k, name in enumerate(names):
        if sums["agree_n"][k] > 0:
            metrics[f"agreement/{name}"] = float(sums["agree"][k] / sums["agree_n"][k])
    return metrics


def _peak_rss_mb(world: int) -> float:
    """The largest peak resident memory (``ru_maxrss``) of any rank's process so far, in MiB. It counts
    shared pages too (object-store blocks mapped into the worker, page cache of files read), so a
    streaming worker's figure rises with data size by at most about the object store's size, then
    levels off (bench/streaming_memory.py reads it)."""
    import resource

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(float(peak), 1)
