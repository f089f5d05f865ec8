"""Feature distillation (hint + attention transfer) and MixUp/CutMix in the online stream.

Fast tests need no Ray: model features, the teacher runner's feature answers, mixing, config checks.
Two Ray runs on real Fashion-MNIST: a CNN student matching a CNN teacher's hints and attention maps
(its hint loss falls; it resumes after a failure with the projector restored), and a MixUp/CutMix
run whose teachers see exactly the rows that were trained.
"""

from __future__ import annotations

import copy

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_ray.config import ConfigError, apply_overrides, config_from_dict, config_to_dict
from distill_ray.kd.feature_losses import HintProjector, attention_map, attention_transfer, hint_loss
from distill_ray.kd.labels import mixup
from distill_ray.models import build_model, forward_logits, forward_with_features, save_model

REPO = Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (1, 28, 28)


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(seed))


def _tiny_bert(num_classes: int = 3):
    return build_model("hf_config", (16,), num_classes, {"hidden_size": 32, "num_hidden_layers": 1,
                                                         "num_attention_heads": 2, "intermediate_size": 64,
                                                         "vocab_size": 100})


# --- features from models --------------------------------------------------------------------------

def test_registry_features_come_with_the_logits_of_one_forward():
    torch.manual_seed(0)
    x = _images()
    cnn = build_model("cnn", IMAGE_SHAPE, 10, {"channels": [4, 8], "hidden": 24}).eval()
    out = forward_with_features(cnn, x, want_hint=True, want_attention=True)
    assert out["logits"].shape == (6, 10) and out["hint"].shape == (6, 24)
    assert out["attention"].shape == (6, 8, 7, 7)  # the last conv block's maps: 28 -> 14 -> 7
    torch.testing.assert_close(out["logits"], cnn(x))
    torch.testing.assert_close(out["hint"], cnn.features(x))
    torch.testing.assert_close(forward_with_features(cnn, x, want_hint=True)["hint"], cnn.features(x))
    assert forward_with_features(cnn, x, want_attention=True)["attention"].shape == (6, 8, 7, 7)
    assert forward_with_features(cnn, x).keys() == {"logits"}  # nothing asked: plain forward_logits

    mlp = build_model("mlp", IMAGE_SHAPE, 10, {"hidden": [16]})
    assert forward_with_features(mlp, x, want_hint=True)["hint"].shape == (6, 16)
    text = build_model("text_cnn", (12,), 4, {"vocab_size": 50, "embed_dim": 8, "filters": 5, "widths": [3]}).eval()
    ids = torch.randint(1, 50, (3, 12))
    assert forward_with_features(text, ids, want_hint=True)["hint"].shape == (3, 5)


@pytest.mark.parametrize("arch, options", [("mlp", {"hidden": [16]}),
                                           ("text_cnn", {"vocab_size": 50, "embed_dim": 8, "filters": 5})])
def test_attention_needs_a_cnn_or_a_transformer(arch, options):
    shape = IMAGE_SHAPE if arch == "mlp" else (12,)
    model = build_model(arch, shape, 4, options)
    x = _images(2) if arch == "mlp" else torch.randint(1, 50, (2, 12))
    with pytest.raises(ValueError, match="attention transfer needs a CNN or transformer"):
        forward_with_features(model, x, want_attention=True)["attention"]


def test_vit_features_are_the_cls_token_and_the_token_grid():
    vit = build_model("transformer_encoder", IMAGE_SHAPE, 10, {"dim": 32, "layers": 1, "heads": 2}).eval()
    x = _images(3)
    out = forward_with_features(vit, x, want_hint=True, want_attention=True)
    hidden = vit(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # [3, 1 + 16 patches, 32]
    torch.testing.assert_close(out["hint"], hidden[:, 0])
    torch.testing.assert_close(out["attention"], hidden.transpose(1, 2))
    torch.testing.assert_close(out["logits"], forward_logits(vit, x))
    assert attention_map(out["attention"]).shape == (3, 17)


def test_text_transformer_features_honour_the_padding_mask():
    torch.manual_seed(0)
    model = _tiny_bert().eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0, 0, 0], [9, 10, 0, 0, 0, 0, 0, 0]])
    out = forward_with_features(model, ids, want_hint=True, want_attention=True)
    assert out["hint"].shape == (2, 32) and out["attention"].shape == (2, 32, 8)  # full input width
    assert out["attention"][0, :, 4:].abs().sum() == 0 and out["attention"][1, :, 2:].abs().sum() == 0
    torch.testing.assert_close(out["logits"], forward_logits(model, ids))
    # More right padding changes nothing but the width of the (zero) tail.
    wider = forward_with_features(model, torch.nn.functional.pad(ids, (0, 4)), want_hint=True, want_attention=True)
    torch.testing.assert_close(wider["hint"], out["hint"])
    torch.testing.assert_close(wider["attention"][:, :, :8], out["attention"])
    # Row 1 alone is cut to width 2 inside; its features are those it has in the batch.
    alone = forward_with_features(model, ids[1:], want_hint=True, want_attention=True)
    torch.testing.assert_close(alone["hint"], out["hint"][1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone["attention"], out["attention"][1:], atol=1e-5, rtol=1e-5)


def test_feature_losses_send_gradients_to_every_student_parameter():
    torch.manual_seed(0)
    student = build_model("cnn", IMAGE_SHAPE, 10, {"channels": [4, 8], "hidden": 24})
    teacher = build_model("cnn", IMAGE_SHAPE, 10, {"channels": [6, 8], "hidden": 40}).eval()
    x = _images(8)
    with torch.no_grad():
        target = forward_with_features(teacher, x, want_hint=True, want_attention=True)
    projector = HintProjector(24, 40)
    out = forward_with_features(student, x, want_hint=True, want_attention=True)
    loss = (hint_loss(out["hint"], target["hint"], projector)
            + attention_transfer(out["attention"], target["attention"]))
    loss.backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None and not n.startswith("head")]
    assert not missing, f"no gradient reached {missing}"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())


def test_ddp_student_gets_feature_gradients_through_ddp_forward(tmp_path):
    """One forward through DDP yields logits and features; backward all-reduces (world of one)
    without 'marked ready twice' errors, and every parameter gets its gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        plain = build_model("cnn", IMAGE_SHAPE, 10, {"channels": [4, 8], "hidden": 24})
        model = DDP(copy.deepcopy(plain))
        x, y = _images(8), torch.arange(8)

        def loss_of(out):
            return (torch.nn.functional.cross_entropy(out["logits"], y) + out["hint"].pow(2).mean()
                    + attention_map(out["attention"]).sum())

        loss_of(forward_with_features(plain, x, want_hint=True, want_attention=True)).backward()
        for _ in range(2):  # the second step fails if the reducer was not prepared by the first forward
            model.zero_grad()
            loss_of(forward_with_features(model, x, want_hint=True, want_attention=True)).backward()
            # every feature term's gradient went through DDP's reducer: equal to the unwrapped model's
            for (name, p), q in zip(model.module.named_parameters(), plain.parameters()):
                torch.testing.assert_close(p.grad, q.grad, msg=name)
    finally:
        dist.destroy_process_group()


# --- teachers serve features ----------------------------------------------------------------------

def _saved(model, tmp_path: Path, shape, name: str) -> str:
    spec = {"arch": name, "input_shape": list(shape), "num_classes": 10, "options": {"channels": [4, 8], "hidden": 24}}
    return str(save_model(model, tmp_path / name, spec))


def test_teacher_runner_answers_features_when_asked(tmp_path):
    from distill_ray.teachers.runner import TeacherRunner

    torch.manual_seed(0)
    cnn = build_model("cnn", IMAGE_SHAPE, 10, {"channels": [4, 8], "hidden": 24}).eval()
    runner = TeacherRunner("cnn", _saved(cnn, tmp_path, IMAGE_SHAPE, "cnn"))
    x = _images(5).numpy()
    plain = runner.infer(x)
    assert plain.keys() == {"logits"}  # unchanged format without features
    out = runner.infer(x, ("hint", "attention"))
    assert out.keys() == {"logits", "hint", "attention"}
    assert out["hint"].dtype == np.float16 and out["hint"].shape == (5, 24)
    assert out["attention"].dtype == np.float16 and out["attention"].shape == (5, 49)  # reduced map, 7x7
    np.testing.assert_allclose(np.linalg.norm(out["attention"].astype(np.float32), axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(out["logits"], plain["logits"], atol=1e-5)
    with torch.no_grad():
        direct = forward_with_features(cnn, torch.as_tensor(x), want_hint=True, want_attention=True)
    np.testing.assert_allclose(out["hint"], direct["hint"].numpy(), atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(out["attention"], attention_map(direct["attention"]).numpy(), atol=1e-3)
    assert runner.infer(x, ("hint",)).keys() == {"logits", "hint"}
    assert runner.stats()["rows"] == 15
    assert runner.feature_shapes(x[:2], ("hint", "attention")) == {"hint": (24,), "attention": (49,)}
    assert runner.stats()["rows"] == 15  # a probe is not counted
    with pytest.raises(ValueError, match="unknown features"):
        runner.infer(x, ("gram",))
    with pytest.raises(ValueError, match="attention transfer needs a CNN or transformer"):
        mlp = build_model("mlp", IMAGE_SHAPE, 10, {"hidden": [16]})
        spec = {"arch": "mlp", "input_shape": list(IMAGE_SHAPE), "num_classes": 10, "options": {"hidden": [16]}}
        TeacherRunner("mlp", str(save_model(mlp, tmp_path / "mlp", spec))).infer(x, ("attention",))


def test_text_teacher_features_keep_input_order_and_width(tmp_path):
    from distill_ray.teachers.runner import TeacherRunner

    torch.manual_seed(0)
    model = _tiny_bert().eval()
    spec = {"arch": "hf_config", "input_shape": [16], "num_classes": 3}
    runner = TeacherRunner("bert", str(save_model(model, tmp_path / "bert", spec)))
    lengths = [3, 16, 1, 9, 5]
    ids = np.zeros((5, 16), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.arange(1, n + 1) + i
    out = runner.infer(ids, ("hint", "attention"))  # length-sorted micro-batches inside
    assert out["hint"].shape == (5, 32) and out["attention"].shape == (5, 16)
    for i, n in enumerate(lengths):
        with torch.no_grad():
            one = forward_with_features(model, torch.as_tensor(ids[i:i + 1]), want_hint=True, want_attention=True)
        np.testing.assert_allclose(out["hint"][i], one["hint"][0].numpy(), atol=1e-2, rtol=1e-2)
        assert np.all(out["attention"][i, n:] == 0)


# --- the loop's pieces: attention loss, mixing, config ----------------------------------------------

def test_attention_loss_matches_attention_transfer_and_names_mismatched_grids():
    from distill_ray.kd.objectives import attention_loss

    student, teacher = torch.randn(4, 8, 7, 7), torch.randn(4, 16, 7, 7)
    torch.testing.assert_close(attention_loss(student, attention_map(teacher)), attention_transfer(student, teacher))
    with pytest.raises(ValueError, match="attention maps differ in size.*49 positions.*17"):
        attention_loss(student, torch.zeros(4, 17))


def _cfg(overrides=()):
    raw = {"name": "fkd", "teachers": [{"name": "mlp_a", "recipe": "mlp"}, {"name": "cnn_b", "recipe": "cnn"}],
           "train": {"mode": "online"}}
    return config_from_dict(apply_overrides(raw, list(overrides)))


def test_mixing_is_deterministic_per_seed_rank_epoch_and_batch():
    from distill_ray.train.stages import mix_batch, mix_generator

    x, y = _images(16), torch.arange(16) % 10
    cfg = (0.4, 1.0)  # mixup_alpha, cutmix_alpha
    first = mix_batch(*cfg, x, y, 10, mix_generator(7, 0, 2, 5))
    again = mix_batch(*cfg, x, y, 10, mix_generator(7, 0, 2, 5))
    torch.testing.assert_close(first[0], again[0])
    assert torch.equal(first[2], again[2]) and first[3] == again[3]
    assert torch.equal(first[1], y) and 0.0 < first[3] < 1.0
    others = [mix_batch(*cfg, x, y, 10, mix_generator(*key)) for key in ((7, 0, 2, 6), (7, 1, 2, 5), (8, 0, 2, 5))]
    assert all(not torch.equal(o[0], first[0]) for o in others)
    assert x.equal(_images(16))  # the source batch is left alone

    mix_only = (0.4, 0.0)
    mixed, y_a, y_b, lam = mix_batch(*mix_only, x, y, 10, mix_generator(7, 0, 0, 0))
    expected, _, permutation, expected_lam = mixup(x, y, 10, 0.4, mix_generator(7, 0, 0, 0))
    torch.testing.assert_close(mixed, expected)
    assert lam == expected_lam and 0 < lam < 1 and torch.equal(y_b, y[permutation]) and torch.equal(y_a, y)
    plain = mix_batch(0.0, 0.0, x, y, 10, mix_generator(7, 0, 0, 0))
    assert plain[0] is x and plain[2] is None and plain[3] == 1.0
    with pytest.raises(ValueError, match="token ids"):
        mix_batch(*mix_only, torch.zeros(4, 8, dtype=torch.long), y[:4], 10, mix_generator(0, 0, 0, 0))


@pytest.mark.parametrize("override, must_contain", [
    (("loss.hint_weight", 0.5), ["loss.hint_weight", "train.mode=online", "not cached"]),
    (("loss.attention_weight", 1.0), ["loss.attention_weight", "train.mode=online"]),
])
def test_feature_losses_need_online_mode(override, must_contain):
    with pytest.raises(ConfigError) as err:
        _cfg([("train.mode", "cached"), override])
    assert all(part in str(err.value) for part in must_contain), str(err.value)


def test_hint_teacher_must_exist():
    assert _cfg([("loss.hint_weight", 1.0)]).loss.hint_teacher is None  # the loop takes the first teacher
    assert _cfg([("loss.hint_teacher", "cnn_b")]).loss.hint_teacher == "cnn_b"
    with pytest.raises(ConfigError, match=r"loss.hint_teacher: no teacher named 'cnn_c'.*did you mean 'cnn_b'"):
        _cfg([("loss.hint_teacher", "cnn_c")])


# --- on Ray --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_dirs(ray_local, small_fashion_mnist, tmp_path_factory, tiny_prepared):
    """The tiny config's two recipe teachers (an MLP and a CNN), trained once for the session."""
    import yaml

    from distill_ray.pipeline import load_data, prepare_teachers

    root = tiny_prepared(tmp_path_factory.mktemp("feature_kd"), cache=False)  # online mode: no cache
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    raw = apply_overrides(raw, [("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache")),
                                ("teachers.0.path", str(root / "teachers/mlp_a")),
                                ("teachers.1.path", str(root / "teachers/cnn_b")),
                                ("train.mode", "online"), ("curriculum.scheduler", "none")])
    cfg = config_from_dict(raw)
    return cfg, prepare_teachers(cfg, load_data(cfg))


@pytest.mark.ray
def test_teacher_stage_adds_features_as_columns_of_the_named_teacher_only(ray_local, tmp_path):
    from distill_ray.teachers.service import ask_teacher
    from distill_ray.teachers.spec import TeacherSpec
    from distill_ray.teachers.service import teacher_services

    torch.manual_seed(0)
    cnn = build_model("cnn", IMAGE_SHAPE, 10, {"channels": [4, 8], "hidden": 24})
    mlp = build_model("mlp", IMAGE_SHAPE, 10, {"hidden": [16]})
    cnn_dir = _saved(cnn, tmp_path, IMAGE_SHAPE, "cnn")
    mlp_dir = str(save_model(mlp, tmp_path / "mlp", {"arch": "mlp", "input_shape": list(IMAGE_SHAPE),
                                                      "num_classes": 10, "options": {"hidden": [16]}}))
    batch = {"id": np.arange(4), "x": _images(4).numpy(), "label": np.arange(4)}
    specs = [TeacherSpec("cnn", cnn_dir, num_cpus=0.25, features=("hint", "attention")),
             TeacherSpec("mlp", mlp_dir, num_cpus=0.25)]
    with teacher_services(specs) as services:
        out = ask_teacher(ask_teacher(dict(batch), services["cnn"]), services["mlp"])
        empty = {k: v[:0] for k, v in batch.items()}  # a batch the curriculum emptied
        assert ask_teacher(empty, services["mlp"]) is empty
    assert set(out) == {"id", "x", "label", "cnn/logits", "cnn/hint", "cnn/attention", "mlp/logits"}
    assert out["cnn/hint"].shape == (4, 24) and out["cnn/attention"].shape == (4, 49)
    np.testing.assert_array_equal(out["x"], batch["x"])  # the batch passes through untouched


@pytest.mark.ray
def test_epoch_stage_opens_the_planned_rows_and_mixes_them_per_epoch(ray_local):
    from distill_ray.train.stages import EpochPlan, EpochStage, MixSettings

    plan = EpochPlan.remote()
    batch = {"id": np.arange(100, 116), "x": _images(16).numpy(), "label": np.arange(16) % 10}
    mix = MixSettings(mixup_alpha=0.4, cutmix_alpha=0.0, num_classes=10, seed=3)
    import ray

    ray.get(plan.set.remote(1, 0, np.array([101, 103, 104, 110, 111, 112, 115, 999])))
    first = EpochStage(plan, 1, mix)(dict(batch))
    assert first["id"].tolist() == [101, 103, 104, 110, 111, 112, 115]  # opened rows only, in order
    assert set(first["label_b"].tolist()) <= set(first["label"].tolist()) and len(set(first["mix_lam"])) == 1
    again = EpochStage(plan, 1, mix)(dict(batch))
    np.testing.assert_array_equal(first["x"], again["x"])  # same epoch, same rows: same mix
    ray.get(plan.set.remote(1, 1, None))
    later = EpochStage(plan, 1, mix)(dict(batch))
    assert len(later["id"]) == 16 and not np.allclose(later["x"][:7], first["x"])  # all open, mixed afresh
    assert EpochStage(plan, 0, None)(dict(batch))["id"].tolist() == batch["id"].tolist()  # rank 0: no plan yet
    ray.kill(plan)


def _online_run(cfg, dirs, storage: Path, **kwargs):
    from distill_ray.pipeline import load_data, training_inputs
    from distill_ray.train.inputs import online_teachers
    from distill_ray.train.loop import load_trained_student, run_training

    data = load_data(cfg)  # online mode needs no cache: the teachers are stages of the stream
    answered_file = storage.parent / "answered.txt"
    with online_teachers(cfg, dirs, data.info.task, trace_file=str(answered_file)) as services:
        inputs = training_inputs(cfg, data, data.info, services=services)
        result = run_training(cfg, inputs, str(storage), "student", **kwargs)
    _, history, state = load_trained_student(cfg, inputs, result.checkpoint)
    train_ids = set(data.train.select_columns(["id"]).to_pandas()["id"].tolist())
    served: dict[str, int] = {}
    for line in answered_file.read_text().splitlines():  # one line per answered batch (validation too)
        name, ids, _pid = line.split(" ")
        served[name] = served.get(name, 0) + sum(int(i) in train_ids for i in ids.split(","))
    return history, state, served


@pytest.mark.ray
@pytest.mark.slow
def test_hint_and_attention_run_learns_the_teachers_features_and_resumes(teacher_dirs, small_fashion_mnist,
                                                                          tmp_path):
    base, dirs = teacher_dirs
    cfg = config_from_dict(apply_overrides(config_to_dict(base), [
        ("student.arch", "cnn"), ("student.options", {"channels": [4, 8], "hidden": 32}),
        ("loss.hint_weight", 1.0), ("loss.attention_weight", 10.0), ("loss.hint_teacher", "cnn_b"),
        ("train.epochs", 2), ("train.checkpoint_every_steps", 10), ("train.lr", 0.005)]))
    marker = tmp_path / "failed_once"
    history, state, served = _online_run(cfg, dirs, tmp_path / "ray",
                                         fail_once_at_step={"step": 15, "marker": str(marker)})
    assert marker.exists(), "the injected failure did not fire"
    steps = [r for r in history if r.get("kind") != "epoch"]
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps}), "a step was logged twice after resume"
    assert all("hint_loss" in r and "attention_loss" in r for r in steps)
    first = np.mean([r["hint_loss"] for r in steps if r["epoch"] == 0])
    last = np.mean([r["hint_loss"] for r in steps if r["epoch"] == 1])
    assert last < 0.7 * first, f"hint loss did not fall: epoch 0 {first:.4f}, epoch 1 {last:.4f}"
    att_first = np.mean([r["attention_loss"] for r in steps if r["epoch"] == 0])
    att_last = np.mean([r["attention_loss"] for r in steps if r["epoch"] == 1])
    assert att_last < att_first, f"attention loss did not fall: {att_first:.4f} -> {att_last:.4f}"
    # The projector (student 32 -> teacher cnn_b's 64 hidden units) is part of the checkpoint.
    assert state["projector"]["linear.weight"].shape == (64, 32)
    assert [r for r in history if r.get("kind") == "epoch"][-1]["val_accuracy"] > 0.5
    # Resume re-streams the epoch from its start (skipping what was trained): never fewer rows than trained.
    assert served["cnn_b"] >= state["step"] * cfg.train.batch_size


@pytest.mark.ray
@pytest.mark.slow
def test_mixup_run_sends_the_teachers_the_mixed_rows_it_trains_on(teacher_dirs, small_fashion_mnist, tmp_path):
    base, dirs = teacher_dirs
    cfg = config_from_dict(apply_overrides(config_to_dict(base), [
        ("loss.mixup_alpha", 0.4), ("loss.cutmix_alpha", 1.0), ("train.epochs", 1),
        ("train.checkpoint_every_steps", 1000), ("tracking.log_every_steps", 1)]))
    history, state, served = _online_run(cfg, dirs, tmp_path / "ray")
    trained_rows = state["step"] * cfg.train.batch_size
    assert trained_rows == len(small_fashion_mnist.train) // cfg.train.batch_size * cfg.train.batch_size
    # Every train row went through the epoch stage (mixed) and then to each teacher, once.
    assert served == {name: len(small_fashion_mnist.train) for name in cfg.teacher_names()}
    lams = [r["mix_lam"] for r in history if r.get("kind") != "epoch"]
    assert len(lams) == state["step"] and all(0 <= lam <= 1 for lam in lams) and len(set(lams)) > 1
    assert history[-1]["val_accuracy"] > 0.4
