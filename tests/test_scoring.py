"""Scoring a model on a split: one pass over the split's batches for every model, and one pair of
score helpers for classifiers and causal LMs (as `distill-ray eval`, the run and the ablation use).
No Ray: the split is a stand-in with Ray Data's ``iter_batches``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill_ray.evaluation.metrics import (accuracy, classifier_scores, expected_calibration_error, lm_label_logprobs,
                                  lm_scores, perplexity, predict_logits, token_accuracy)
from distill_ray.models import build_model
from distill_ray.evaluation.scoring import split_outputs


class Split:
    """The part of a Ray Dataset that split_outputs reads, over in-memory columns."""

    def __init__(self, x: np.ndarray, label: np.ndarray):
        self.x, self.label = x, label

    def iter_batches(self, batch_size: int, batch_format: str):
        assert batch_format == "numpy"
        for i in range(0, len(self.x), batch_size):
            yield {"x": self.x[i:i + batch_size], "label": self.label[i:i + batch_size]}


def test_classifier_scores_leave_unlabeled_rows_out():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 0, -1, 1])
    scores = classifier_scores(probs, labels)
    assert scores["accuracy"] == pytest.approx(2 / 3)  # row 1 wrong, row 2 unlabeled
    assert scores["accuracy"] == accuracy(probs[[0, 1, 3]], labels[[0, 1, 3]])
    assert scores["ece"] == expected_calibration_error(probs[[0, 1, 3]], labels[[0, 1, 3]])


def test_split_outputs_of_classifiers_equal_one_pass_over_the_whole_split():
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(2500, 12)).astype(np.float32)  # 3 batches of up to 1024
    y = np.arange(2500) % 3
    models = {"a": build_model("mlp", (12,), 3, {"hidden": [8]}), "b": build_model("mlp", (12,), 3, {"hidden": [4]})}
    outputs, labels, example = split_outputs(Split(x, y), models, causal=False)
    assert labels.tolist() == y.tolist() and torch.equal(example, torch.from_numpy(x[:1]))
    for name, model in models.items():
        torch.testing.assert_close(outputs[name], predict_logits(model, x))


def test_split_outputs_of_a_causal_lm_give_label_logprobs_and_top1():
    torch.manual_seed(0)
    model = build_model("hf_causal_lm", (8,), 50, {"hidden_size": 16, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 32})
    rng = np.random.default_rng(0)
    x = rng.integers(1, 50, size=(70, 8))  # 2 batches of up to 64
    y = np.concatenate([x[:, 1:], np.full((70, 1), -1)], axis=1)
    outputs, labels, _ = split_outputs(Split(x, y), {"lm": model}, causal=True)
    logp, top1 = lm_label_logprobs(model, x, y)
    torch.testing.assert_close(outputs["lm"][0], logp)
    assert torch.equal(outputs["lm"][1], top1)
    assert lm_scores(*outputs["lm"], labels) == {"perplexity": perplexity(logp, y), "accuracy": token_accuracy(top1, y)}
