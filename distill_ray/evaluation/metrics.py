"""Metrics: accuracy, per-class recall and balanced accuracy, expected calibration error, perplexity,
latency. No Ray."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from distill_ray.models import batched_logits, forward_logits


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits [N, C] for all inputs, in eval mode, batched to bound memory."""
    was_training = model.training
    model.eval()
    out = batched_logits(model, torch.as_tensor(inputs), batch_size)  # token ids: batched by length
    model.train(was_training)
    return out


def accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label. logits [N, C], labels [N]."""
    return (logits.argmax(-1) == torch.as_tensor(labels)).float().mean().item()


def per_class_recall(scores: torch.Tensor, labels: np.ndarray | torch.Tensor,
                     num_classes: int | None = None) -> list[float | None]:
    """Recall of each class, ``[C]``: of the rows labeled c, the share whose argmax is c; None for a class
    no row is labeled with. ``scores [N, C]`` (logits or probabilities), ``labels [N]``; unlabeled rows
    (label < 0) are left out. ``num_classes`` defaults to the scores' width."""
    y = torch.as_tensor(labels)
    labeled = y >= 0
    y, predicted = y[labeled].long(), torch.as_tensor(scores)[labeled].argmax(-1)
    width = num_classes if num_classes is not None else torch.as_tensor(scores).shape[-1]
    rows = torch.bincount(y, minlength=width)
    right = torch.bincount(y[predicted == y], minlength=width)
    return [float(right[c]) / float(rows[c]) if rows[c] > 0 else None for c in range(width)]


def balanced_accuracy(scores: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float | None:
    """The mean of the per-class recalls over the classes the labeled rows have (as scikit-learn's
    ``balanced_accuracy_score``): each class counts once, however many rows it has, so a model that
    ignores the rare classes is not hidden by the frequent ones. None without a labeled row."""
    recalls = [r for r in per_class_recall(scores, labels) if r is not None]
    return sum(recalls) / len(recalls) if recalls else None


def expected_calibration_error(probs: torch.Tensor, labels: np.ndarray | torch.Tensor, num_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over equal-width confidence bins of |accuracy - confidence| * bin share.

    probs [N, C] rows on the simplex, labels [N]; binned as :func:`reliability_bins` (right-closed
    bins, so confidence 1.0 lands in the last bin).
    """
    return reliability_bins(probs, labels, num_bins)["ece"]


def classifier_scores(probs: torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy and ECE of class probabilities ``[N, C]`` on the labeled rows of
    ``labels [N]`` (an unlabeled row, label < 0, has nothing to score)."""
    labels = torch.as_tensor(labels)
    labeled = labels >= 0
    return {"accuracy": accuracy(probs[labeled], labels[labeled]),
            "balanced_accuracy": balanced_accuracy(probs[labeled], labels[labeled]),
            "ece": expected_calibration_error(probs[labeled], labels[labeled])}


@torch.no_grad()
def single_sample_latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 200, warmup: int = 20) -> float:
    """Median wall time of one forward pass on one sample (batch of 1), in milliseconds, CPU threads as set."""
    model.eval()
    x = example[:1]
    for _ in range(warmup):
        forward_logits(model, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_logits(model, x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def reliability_bins(probs: torch.Tensor | np.ndarray, labels: np.ndarray | torch.Tensor,
                     n_bins: int = 15) -> dict[str, np.ndarray | float]:
    """Per-bin numbers of a reliability diagram, binned exactly as ``expected_calibration_error``.

    probs [N, C] rows on the simplex, labels [N]. Equal-width, right-closed confidence bins
    ``((b-1)/n, b/n]`` (the first one also holds 0). Returns ``edges`` [n_bins + 1], ``count`` [n_bins],
    ``confidence`` and ``accuracy`` [n_bins] (mean max-probability and fraction correct of each bin,
    NaN for an empty bin) and ``ece`` = sum over bins of ``count / N * |accuracy - confidence|``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = torch.as_tensor(probs).double()
    confidence, predicted = p.max(-1)
    correct = (predicted == torch.as_tensor(labels)).double()
    bins = torch.clamp(torch.ceil(confidence * n_bins).long() - 1, 0, n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    nonempty = count > 0
    mean_conf = torch.where(nonempty, conf_sum / count.clamp_min(1), torch.tensor(float("nan"), dtype=torch.float64))
    mean_acc = torch.where(nonempty, correct_sum / count.clamp_min(1), torch.tensor(float("nan"), dtype=torch.float64))
    gaps = (mean_acc - mean_conf).abs()[nonempty]
    ece = float((count[nonempty] / max(len(bins), 1) * gaps).sum()) if len(bins) else 0.0
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count.numpy().astype(np.int64),
            "confidence": mean_conf.numpy(), "accuracy": mean_acc.numpy(), "ece": ece}


@torch.no_grad()
def lm_label_logprobs(model: nn.Module, inputs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                      batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's log-probability of every next-token label and its top-1 guess, each [N, L]
    (0 / -1 where the label is ignored, < 0), batched so no [N, L, V] tensor exists."""
    was_training = model.training
    model.eval()
    x, y = torch.as_tensor(inputs), torch.as_tensor(labels)
    logp_out, top1_out = torch.zeros(y.shape), torch.full(y.shape, -1, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        logits = forward_logits(model, x[i:i + batch_size]).float()
        yb = y[i:i + batch_size, :logits.shape[1]]
        logp = torch.log_softmax(logits, -1).gather(-1, yb.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        logp_out[i:i + batch_size, :logits.shape[1]] = logp.masked_fill(yb < 0, 0.0)
        top1_out[i:i + batch_size, :logits.shape[1]] = logits.argmax(-1).masked_fill(yb < 0, -1)
    model.train(was_training)
    return logp_out, top1_out


def token_accuracy(top1: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Fraction of labelled positions (label >= 0) whose top-1 guess is the label."""
    y = torch.as_tensor(labels)
    return float((top1 == y)[y >= 0].float().mean())


def perplexity(label_logprobs: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """exp(mean negative log-likelihood) over the labelled positions."""
    mask = torch.as_tensor(labels) >= 0
    return float(torch.exp(-label_logprobs[mask].double().mean()))


def lm_scores(label_logprobs: torch.Tensor, top1: torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Perplexity and next-token accuracy from :func:`lm_label_logprobs`' outputs, ``[N, L]`` each."""
    return {"perplexity": perplexity(label_logprobs, labels), "accuracy": token_accuracy(top1, labels)}


def disagreements(scores_a: torch.Tensor | np.ndarray, scores_b: torch.Tensor | np.ndarray,
                  labels: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """Of the labeled rows (label >= 0), how many model A gets right and B wrong, and the reverse:
    the paired counts behind the noise of an accuracy difference (``verdict.paired_se``). Scores
    [N, C]: logits or probabilities (only the argmax counts)."""
    y = torch.as_tensor(labels)
    labeled = y >= 0
    right_a = (torch.as_tensor(scores_a).argmax(-1) == y) & labeled
    right_b = (torch.as_tensor(scores_b).argmax(-1) == y) & labeled
    return int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
