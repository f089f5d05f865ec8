"""Models: every architecture saves and reloads with identical outputs, without pickle."""

from __future__ import annotations

import json

import pytest
import torch

from distill_ray.evaluation.metrics import accuracy, expected_calibration_error
from distill_ray.models import build_model, fingerprint, forward_logits, freeze, load_model, num_params, save_model

ARCHS = [("mlp", {"hidden": [32]}), ("cnn", {"channels": [4, 8], "hidden": 16}),
         ("transformer_encoder", {"patch": 7, "dim": 32, "layers": 1, "heads": 2})]


@pytest.mark.parametrize("arch, options", ARCHS, ids=[a for a, _ in ARCHS])
def test_save_load_round_trip(arch, options, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, (1, 28, 28), 10, options).eval()
    spec = {"arch": arch, "input_shape": [1, 28, 28], "num_classes": 10, "options": options}
    save_model(model, tmp_path, spec)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded, got_spec = load_model(tmp_path)
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(forward_logits(loaded, x), forward_logits(model, x))
    assert fingerprint(loaded) == fingerprint(model)
    assert got_spec["arch"] == arch and json.loads((tmp_path / "distill_spec.json").read_text())["family"]


def test_fingerprint_changes_with_one_weight():
    model = build_model("mlp", (1, 28, 28), 10, {"hidden": [8]})
    before = fingerprint(model)
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    assert fingerprint(model) != before


def test_freeze_turns_off_gradients_and_training():
    model = freeze(build_model("cnn", (1, 28, 28), 10, {"channels": [4], "hidden": 8}))
    assert not model.training and all(not p.requires_grad for p in model.parameters())


def test_unknown_arch_and_bad_options_name_the_problem():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'.*mlp, cnn"):
        build_model("resnet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="bad options for architecture 'mlp'"):
        build_model("mlp", (1, 28, 28), 10, {"depth": 3})


def test_param_count_of_the_quickstart_student_is_a_tenth_of_the_smallest_teacher():
    from pathlib import Path

    from distill_ray.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs/configs/quickstart.yaml")
    student = build_model(cfg.student.arch, (1, 28, 28), 10, cfg.student.options)
    teachers = [build_model(t.recipe, (1, 28, 28), 10, t.options) for t in cfg.teachers]
    hidden = cfg.student.options["hidden"][0]
    assert num_params(student) == 784 * hidden + hidden + hidden * 10 + 10
    assert num_params(student) * 10 <= min(num_params(t) for t in teachers)


def test_metrics_against_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert accuracy(logits, labels) == 0.75
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    # bins (15 equal): 0.9 -> bin 13, 0.8 -> bin 11, 0.6 -> bin 8, 0.7 -> bin 10; one sample each
    expected = (abs(1 - 0.9) + abs(1 - 0.8) + abs(0 - 0.6) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
