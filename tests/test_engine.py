"""The Ray engine on a real local Ray and real Fashion-MNIST: teacher stages, cache, Train loop, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill_ray.config import apply_overrides, config_from_dict, config_to_dict
from distill_ray.models import forward_logits, load_model

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, tiny_prepared):
    import yaml

    root = tiny_prepared(tmp_path_factory.mktemp("engine"))  # the session's teachers and cache, reused here
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    raw = apply_overrides(raw, [("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache")),
                                ("teachers.0.path", str(root / "teachers/mlp_a")),
                                ("teachers.1.path", str(root / "teachers/cnn_b"))])
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def tiny_data(ray_local, tiny_cfg, small_fashion_mnist):
    """The tiny config's data through the Ray Data spine (the Fashion-MNIST preset as Parquet)."""
    from distill_ray.pipeline import load_data

    return load_data(tiny_cfg)


@pytest.fixture(scope="module")
def prepared(tiny_cfg, tiny_data):
    from distill_ray.pipeline import build_cache, prepare_teachers

    dirs = prepare_teachers(tiny_cfg, tiny_data)
    cache = build_cache(tiny_cfg, tiny_data, dirs)
    return dirs, cache


def _inputs(cfg, prepared, tiny_data, **kw):
    from distill_ray.pipeline import training_inputs

    return training_inputs(cfg, prepared[1], tiny_data.info, **kw)


def _online(cfg, dirs, trace: Path | None = None):
    """The online run's teacher services for a ``with`` block (``trace``: the ids they answer, and their loads)."""
    from distill_ray.train.inputs import online_teachers

    return online_teachers(cfg, dirs, "classification", trace_file=str(trace) if trace else None)


def _loads(trace: Path) -> list[str]:
    """The teacher of every load of a teacher service's replica (one ``.loads`` line per load)."""
    return [line.split(" ")[0] for line in Path(f"{trace}.loads").read_text().splitlines()]


def _trace(path: Path) -> dict[tuple[int, int], list[list[int]]]:
    """(rank, step) -> every record of the ids trained at that step (one per attempt), with the epoch first."""
    records: dict[tuple[int, int], list[list[int]]] = {}
    for line in path.read_text().splitlines():
        rank, epoch, step, ids = line.split(" ")
        records.setdefault((int(rank), int(step)), []).append([int(epoch), *map(int, ids.split(","))])
    return records


def _assert_resume_guarantee(trace: dict, shard_ids: dict[int, set]) -> None:
    """A step replayed after a restart trained exactly the samples it trained before (nothing else is
    trained twice), and within each epoch of the final trajectory no sample appears twice."""
    per_epoch: dict[tuple[int, int], list[int]] = {}
    for (rank, _), attempts in trace.items():
        assert all(a == attempts[0] for a in attempts), "a replayed step trained other samples"
        epoch, *ids = attempts[-1]
        per_epoch.setdefault((rank, epoch), []).extend(ids)
        assert set(ids) <= shard_ids[rank], "a rank trained a sample outside its shard"
    for key, ids in per_epoch.items():
        assert len(ids) == len(set(ids)), f"rank/epoch {key}: a sample was trained twice"


def test_preset_reads_the_same_samples_and_splits_as_the_loader(tiny_data, small_fashion_mnist):
    """The Fashion-MNIST preset is a thin reader: the same ids, pixels and labels per split."""
    d = small_fashion_mnist
    for name, ref in (("train", d.train), ("val", d.val), ("test", d.test)):
        got = tiny_data.splits[name].to_pandas().sort_values("id")
        order = np.argsort(ref.ids)
        np.testing.assert_array_equal(got["id"].to_numpy(), ref.ids[order])
        np.testing.assert_array_equal(got["label"].to_numpy(), ref.labels[order])
        np.testing.assert_allclose(np.stack(got["x"].to_numpy()), ref.inputs[order], atol=1e-6)
    assert tiny_data.info.counts == {"train": len(d.train), "val": len(d.val), "test": len(d.test)}
    assert tiny_data.info.class_names == d.class_names and tiny_data.info.input_shape == (1, 28, 28)


def test_recipe_teachers_are_real_and_reused(prepared, tiny_cfg, tiny_data, small_fashion_mnist, capsys):
    from distill_ray.evaluation.metrics import accuracy, predict_logits
    from distill_ray.pipeline import prepare_teachers

    dirs, _ = prepared
    for name, path in dirs.items():
        model, spec = load_model(path)
        acc = accuracy(predict_logits(model, small_fashion_mnist.val.inputs), small_fashion_mnist.val.labels)
        assert acc > 0.6, f"teacher {name} learned nothing: {acc}"
        assert spec["val_accuracy"] == pytest.approx(acc, abs=1e-6)
    mtimes = {n: (p / "distill_spec.json").stat().st_mtime for n, p in dirs.items()}
    prepare_teachers(tiny_cfg, tiny_data)
    assert "reusing" in capsys.readouterr().out
    assert mtimes == {n: (p / "distill_spec.json").stat().st_mtime for n, p in dirs.items()}


def test_cache_holds_inputs_labels_targets_and_difficulty_for_every_sample(prepared, small_fashion_mnist):
    dirs, cache = prepared
    d = small_fashion_mnist
    for name, ref in (("train", d.train), ("val", d.val), ("test", d.test)):
        assert sorted(cache.dataset(name, ["id"]).to_pandas()["id"]) == sorted(ref.ids.tolist())
    val = cache.dataset("val").to_pandas().sort_values("id").head(50)
    order = np.argsort(d.val.ids)[:50]
    np.testing.assert_array_equal(val["label"].to_numpy(), d.val.labels[order])
    assert {"difficulty/ensemble_entropy", "difficulty/teacher_disagreement", "difficulty/teacher_ce"} <= set(val.columns)
    for name, path in dirs.items():
        model, _ = load_model(path)
        with torch.no_grad():
            direct = forward_logits(model, torch.as_tensor(d.val.inputs[order])).numpy()
        cached = np.stack(val[f"{name}/logits"].to_numpy()).astype(np.float32)
        np.testing.assert_allclose(cached, direct, atol=2e-2, rtol=2e-3)  # fp16 storage


def test_cache_is_reused_and_corruption_is_refused(prepared, tiny_cfg, tiny_data, capsys):
    from distill_ray.pipeline import build_cache
    from distill_ray.cache.soft_targets import CorruptCacheError

    dirs, cache = prepared
    udfs_before = _teacher_actors_ever()
    again = build_cache(tiny_cfg, tiny_data, dirs)
    assert "reusing verified cache" in capsys.readouterr().out
    assert _teacher_actors_ever() == udfs_before  # a reused cache runs no teacher forward
    assert again.manifest == cache.manifest
    shard = sorted(Path(tiny_cfg.cache.dir).glob("*/split=train/*.parquet"))[0]
    original = shard.read_bytes()
    try:
        corrupted = bytearray(original)
        corrupted[len(corrupted) // 2] ^= 0xFF
        shard.write_bytes(bytes(corrupted))
        with pytest.raises(CorruptCacheError, match=shard.name):
            build_cache(tiny_cfg, tiny_data, dirs)
    finally:
        shard.write_bytes(original)


def test_teacher_stage_columns_equal_direct_inference(prepared, ray_local, small_fashion_mnist):
    """A teacher as a Ray Data stage asking its service adds ``{name}/logits`` columns equal to running
    the model directly, row for row (ids stay with their rows), whichever stage tasks' requests the
    service batched together."""
    import ray

    from distill_ray.train.stages import with_teachers
    from distill_ray.teachers.spec import TeacherSpec
    from distill_ray.teachers.service import teacher_services

    dirs, _ = prepared
    x = small_fashion_mnist.val.inputs[:40]
    ds = ray.data.from_items([{"id": i, "x": x[i]} for i in range(len(x))])
    specs = tuple(TeacherSpec(name, str(path), num_cpus=0.25, batch_size=16) for name, path in dirs.items())
    with teacher_services(specs) as services:
        rows = with_teachers(ds, tuple(services.values())).to_pandas().sort_values("id")
    assert rows["id"].tolist() == list(range(len(x)))
    for name, path in dirs.items():
        model, _ = load_model(path)
        with torch.no_grad():
            direct = forward_logits(model, torch.as_tensor(x)).numpy()
        np.testing.assert_allclose(np.stack(rows[f"{name}/logits"].to_numpy()), direct, atol=1e-5)


def test_teachers_are_frozen(prepared):
    from distill_ray.teachers.runner import TeacherRunner

    dirs, _ = prepared
    runner = TeacherRunner("mlp_a", str(dirs["mlp_a"]))
    runner.assert_frozen()
    assert all(not p.requires_grad for p in runner.model.parameters())
    runner.model.train()
    with pytest.raises(AssertionError, match="trainable"):
        runner.infer(np.zeros((1, 1, 28, 28), np.float32))


@pytest.mark.parametrize("data_mode", ["memory", "stream"])
def test_train_loop_learns_resumes_after_failure_and_logs_weights(prepared, tiny_cfg, tiny_data, tmp_path, data_mode):
    """Killed at step 15 (last checkpoint at step 10), the run resumes and finishes every step once;
    the replayed steps train exactly what they trained before, and no epoch trains a sample twice,
    whether the worker keeps its shard in memory or streams it from Ray Data every epoch."""
    from distill_ray.train.loop import load_trained_student, run_training

    cfg = config_from_dict(apply_overrides(config_to_dict(tiny_cfg), [("train.data_mode", data_mode)]))
    data = _inputs(cfg, prepared, tiny_data)
    marker, trace = tmp_path / "failed_once", tmp_path / "trace.txt"
    result = run_training(cfg, data, str(tmp_path / "ray"), "student",
                          fail_once_at_step={"step": 15, "marker": str(marker)}, trace_file=str(trace))
    assert marker.exists(), "the injected failure did not fire"
    student, history, state = load_trained_student(cfg, data, result.checkpoint)

    # The run finished every step once, despite dying at step 15 (resumed from step 10's checkpoint).
    steps = [row["step"] for row in history if row.get("kind") != "epoch"]
    assert steps == sorted(set(steps)), "a step was logged twice after resume"
    epochs = [row for row in history if row.get("kind") == "epoch"]
    assert [row["epoch"] for row in epochs] == [0, 1]
    # Curriculum: stage 0 opens half the data at T=1, stage 1 all of it at T=2.
    assert {r["open_fraction"] for r in history if r["epoch"] == 0} == {0.5}
    assert {r["temperature"] for r in history if r["epoch"] == 1 and "temperature" in r} == {2.0}
    n, batch = tiny_data.info.counts["train"], cfg.train.batch_size
    assert state["step"] == (n // 2) // batch + n // batch
    records = _trace(trace)
    assert sorted(step for _, step in records) == list(range(1, state["step"] + 1))
    assert [len(records[(0, s)]) for s in (11, 15, 16)] == [2, 2, 1]  # steps 11-15 replayed, 16 not
    all_ids = set(tiny_data.train.to_pandas()["id"].tolist())
    _assert_resume_guarantee(records, {0: all_ids})
    # Teacher weights on the simplex, logged every logged step.
    weights = [sum(v for k, v in r.items() if k.startswith("teacher_weight/")) for r in history if "loss" in r]
    assert weights and all(abs(w - 1) < 1e-5 for w in weights)
    # It learned: validation accuracy well above chance (10 classes) and agrees with teachers.
    assert epochs[-1]["val_accuracy"] > 0.6
    assert epochs[-1]["agreement/mlp_a"] > 0.6


def _answered(path: Path) -> dict[str, list[int]]:
    """Teacher name -> every id its online stage answered, in order (one trace line per batch)."""
    out: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        name, ids, _pid = line.split(" ")
        out.setdefault(name, []).extend(map(int, ids.split(",")))
    return out


def test_online_teachers_are_a_stage_that_answers_exactly_the_rows_each_epoch_opens(prepared, tiny_cfg, tiny_data,
                                                                                     tmp_path):
    """Online mode: the teachers are Ray Data stages (asking their services) in front of the trainer. Each
    epoch they answer every row the curriculum opens once (stage 0 opens half) and nothing it holds back;
    the student trains on all of those rows but the last partial batch."""
    from distill_ray.train.loop import load_trained_student, run_training

    dirs, _ = prepared
    cfg = config_from_dict(apply_overrides(config_to_dict(tiny_cfg), [("train.mode", "online"), ("train.epochs", 1)]))
    answered_file, trace = tmp_path / "answered.txt", tmp_path / "trace.txt"
    with _online(cfg, dirs, answered_file) as services:
        data = _inputs(cfg, prepared, tiny_data, services=services)
        assert not data.keep_shard and data.epoch_stage and [t.name for t in data.online_teachers] == ["mlp_a", "cnn_b"]
        result = run_training(cfg, data, str(tmp_path / "ray"), "online", trace_file=str(trace))
    _, history, state = load_trained_student(cfg, data, result.checkpoint)
    trained = [i for attempts in _trace(trace).values() for i in attempts[-1][1:]]
    answered = _answered(answered_file)
    n = tiny_data.info.counts["train"]
    assert state["step"] == (n // 2) // cfg.train.batch_size
    for name in cfg.teacher_names():
        ids = answered[name]
        assert len(ids) == len(set(ids)) == -(-n // 2), f"{name}: answered {len(ids)} rows, {len(set(ids))} distinct"
        assert set(trained) <= set(ids) and len(ids) - len(trained) < cfg.train.batch_size
    # Validation reads the cache's targets: agreement is reported without asking the teachers again.
    assert history[-1]["val_accuracy"] > 0.4 and "agreement/cnn_b" in history[-1]


def test_a_teacher_killed_inside_a_running_trainer_does_not_fail_the_run(prepared, tiny_cfg, tiny_data, tmp_path):
    """Online mode, 3 epochs: each teacher's service is loaded once for the whole run, not once per
    epoch. The process of one teacher's replica is killed while it serves the running TorchTrainer: Ray
    starts the replica again (one more load) and sends it the lost requests again; the run finishes
    every step."""
    import os
    import signal
    import threading
    import time

    from distill_ray.train.loop import load_trained_student, run_training

    dirs, _ = prepared
    cfg = config_from_dict(apply_overrides(config_to_dict(tiny_cfg), [
        ("train.mode", "online"), ("train.epochs", 3), ("curriculum.scheduler", "none"),
        ("train.checkpoint_every_steps", 4)]))
    storage, answered = tmp_path / "ray", tmp_path / "answered.txt"
    outcome: dict = {}
    with _online(cfg, dirs, answered) as services:
        data = _inputs(cfg, prepared, tiny_data, services=services)
        runner = threading.Thread(target=lambda: outcome.update(result=run_training(cfg, data, str(storage), "kill")))
        runner.start()
        deadline, killed, seen = time.time() + 240, None, 0
        while killed is None and time.time() < deadline and runner.is_alive():
            time.sleep(0.05)
            # The replica that has just answered cnn_b's first train batch (the run has 3 epochs ahead).
            lines = [line.split(" ") for line in answered.read_text().splitlines()] if answered.exists() else []
            at_work = [int(line[2]) for line in lines if line[0] == "cnn_b" and len(line) == 3 and line[2]]
            if at_work:
                killed = at_work[0]
                os.kill(killed, signal.SIGKILL)  # the process dies: Ray restarts the replica, retries its calls
                _wait_until_dead(killed)
                seen = len(answered.read_text().splitlines())  # what it answered before it died
        assert killed is not None, "no teacher replica was seen at work"
        runner.join(timeout=300)
    assert "result" in outcome, "the run did not finish"
    _, history, state = load_trained_student(cfg, data, outcome["result"].checkpoint)
    steps_per_epoch = tiny_data.info.counts["train"] // cfg.train.batch_size
    assert state["step"] == cfg.train.epochs * steps_per_epoch
    # cnn_b went on answering after the kill, from another process.
    after = [line.split(" ") for line in answered.read_text().splitlines()[seen:]]
    pids_after = {int(pid) for name, _, pid in after if name == "cnn_b"}
    assert pids_after and killed not in pids_after, (killed, pids_after)
    # Three epochs, one load per teacher, and one more for the replica that was killed.
    assert sorted(_loads(answered)) == ["cnn_b", "cnn_b", "mlp_a"]
    assert history[-1]["val_accuracy"] > 0.4


def _wait_until_dead(pid: int, timeout: float = 30.0) -> None:
    """Until ``pid`` has exited (gone, or a zombie waiting for its parent)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still alive {timeout}s after SIGKILL")


def _teacher_actors_ever() -> int:
    """Teacher actors (pool actors and Ray Data UDF actors) ever created in this Ray, from the GCS."""
    from ray._private.state import actors

    return sum(1 for a in actors().values() if "Teacher" in a["ActorClassName"])


def _final_weights(result) -> dict[str, np.ndarray]:
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "train_state.pt", weights_only=True)
    return {k: v.numpy().copy() for k, v in state["student"].items()}


def test_two_ddp_workers_read_disjoint_shards_and_cached_equals_online(prepared, tiny_cfg, tiny_data, tmp_path):
    """Two Train workers (DDP), three teachers, float32 cache. Each rank reads only its own rows (by id
    hash; disjoint, together all of train) and both take the same number of steps. Cached and online
    targets are the same numbers, so the two modes give the same student. (With the default fp16
    cache the targets differ by fp16 rounding, ~1e-3 relative, and so do the students.)"""
    from distill_ray.pipeline import build_cache, prepare_teachers, training_inputs
    from distill_ray.train.streams import rank_of
    from distill_ray.train.loop import load_trained_student, run_training

    ids = np.array(sorted(tiny_data.train.to_pandas()["id"]))
    owner = rank_of(ids, 2)
    shards = {r: set(ids[owner == r].tolist()) for r in (0, 1)}
    last_step = min(len(s) for s in shards.values()) // (tiny_cfg.train.batch_size // 2)
    raw = apply_overrides(config_to_dict(tiny_cfg), [
        ("cache.dtype", "float32"), ("train.num_workers", 2), ("train.cpus_per_worker", 0.5),
        ("train.epochs", 1), ("curriculum.scheduler", "none"),
        # Online mode streams; so does the cached run here, both in storage order, so they see the
        # same batches.
        ("train.data_mode", "stream"), ("train.shuffle_buffer_rows", 0),
        # A checkpoint due at the last step, where the larger shard still has a batch and the smaller
        # does not: ranks must agree to skip it, or ray.train.report waits forever for one of them.
        ("train.checkpoint_every_steps", last_step)])
    raw["teachers"].append({"name": "mlp_c", "source": "recipe", "recipe": "mlp", "num_cpus": 0.25,
                            "options": {"hidden": [64], "epochs": 1}, "path": str(tmp_path / "teachers/mlp_c")})
    cfg = config_from_dict(raw)
    dirs = prepare_teachers(cfg, tiny_data)  # the first two are reused, the third is trained
    assert len(dirs) == 3
    cache = build_cache(cfg, tiny_data, dirs)
    trace = tmp_path / "trace.txt"
    cached = run_training(cfg, training_inputs(cfg, cache, tiny_data.info), str(tmp_path / "ray"), "cached",
                          trace_file=str(trace))

    online_cfg = config_from_dict(apply_overrides(config_to_dict(cfg), [("train.mode", "online")]))
    with _online(online_cfg, dirs) as services:
        online = run_training(online_cfg, training_inputs(online_cfg, cache, tiny_data.info, services=services),
                              str(tmp_path / "ray"), "online")
    _, history, state = load_trained_student(cfg, training_inputs(cfg, cache, tiny_data.info), cached.checkpoint)
    assert len(shards[0]) != len(shards[1]) and state["step"] == last_step
    assert not shards[0] & shards[1] and min(len(s) for s in shards.values()) > 0.4 * len(ids)
    half = cfg.train.batch_size // 2
    assert state["step"] == min(len(s) for s in shards.values()) // half  # the smaller shard sets the steps
    assert max(r["step"] for r in history if r.get("kind") != "epoch") == state["step"]  # the last step is logged
    records = _trace(trace)
    assert {rank for rank, _ in records} == {0, 1}
    _assert_resume_guarantee(records, shards)
    a, b = _final_weights(cached), _final_weights(online)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-4, err_msg=name)
    assert history[-1]["val_accuracy"] > 0.6


def test_topk_cache_feeds_training(prepared, tiny_cfg, tiny_data, tmp_path):
    """A top-k cache (k=3 of 10 classes) stores only k values per teacher; training rebuilds full
    distributions from them (tail mass spread evenly) and learns as well as from full logits."""
    from distill_ray.pipeline import build_cache, training_inputs
    from distill_ray.kd.objectives import teacher_signal
    from distill_ray.train.loop import load_trained_student, run_training

    dirs, full = prepared
    cfg = config_from_dict(apply_overrides(config_to_dict(tiny_cfg), [("loss.topk", 3), ("train.epochs", 1),
                                                                      ("train.checkpoint_every_steps", 1000)]))
    topk = build_cache(cfg, tiny_data, dirs)
    assert topk.directory != full.directory and topk.spec.topk == 3
    names = cfg.teacher_names()

    def val_targets(cache, k):
        rows = {c: torch.from_numpy(np.array(v)) for c, v in
                cache.dataset("val").to_pandas().sort_values("id").to_dict("list").items()
                if c.split("/")[0] in names or c == "id"}
        rows = {c: torch.from_numpy(np.stack([np.asarray(x) for x in v])) if isinstance(v, list) else v
                for c, v in rows.items()}
        return teacher_signal(rows, names, 10, k, False, "cpu").logits

    dense, exact = val_targets(topk, 3), val_targets(full, None)
    np.testing.assert_allclose(dense.double().exp().sum(-1).numpy(), 1.0, atol=2e-3)  # fp16 top-3 log-probs
    # The top-1 survives the top-k encoding (test_cache_encoding.py). The full cache holds the logits in
    # float16, and the two caches come from separate teacher passes: where the exact top two lie within
    # one float16 step of each other, either may come first. Everywhere else the classes agree.
    top2 = exact.topk(2, dim=-1).values
    step = torch.from_numpy(np.spacing(np.abs(top2[..., 0].numpy()).astype(np.float16)).astype(np.float32))
    decided = (top2[..., 0] - top2[..., 1]) > step
    assert decided.float().mean() > 0.95  # near-ties are rare: the check covers nearly every row
    assert (dense.argmax(-1) == exact.argmax(-1))[decided].all()
    inputs = training_inputs(cfg, topk, tiny_data.info)
    result = run_training(cfg, inputs, str(tmp_path / "ray"), "topk")
    _, history, _ = load_trained_student(cfg, inputs, result.checkpoint)
    assert history[-1]["val_accuracy"] > 0.4  # one epoch, half the data open (stage 0): well above chance


def test_unlabeled_rows_train_on_kd_alone_with_weights_fit_on_validation(prepared, tiny_cfg, tiny_data, tmp_path):
    """No train row labeled: the student learns from the teachers alone (no task loss anywhere), and
    the learned weights are fit once, before training, to the validation labels: fixed through the
    run, not the uniform init, favouring the stronger teacher."""
    from dataclasses import replace

    from distill_ray.train.loop import load_trained_student, run_training

    cfg = config_from_dict(apply_overrides(config_to_dict(tiny_cfg), [("train.epochs", 1),
                                                                      ("train.checkpoint_every_steps", 1000)]))
    data = _inputs(cfg, prepared, tiny_data)

    def unlabel(batch):  # nested: pickled by value into the Ray Data task
        batch["label"] = np.full_like(batch["label"], -1)
        return batch

    unlabeled = replace(data, train=data.train.map_batches(unlabel, batch_format="numpy"), all_labeled=False)
    result = run_training(cfg, unlabeled, str(tmp_path / "ray"), "unlabeled")
    _, history, _ = load_trained_student(cfg, unlabeled, result.checkpoint)
    steps = [r for r in history if "loss" in r]
    assert steps and all(r["task_loss"] == 0.0 and r["labeled_share"] == 0.0 and r["kd_loss"] > 0 for r in steps)
    weights = {round(r["teacher_weight/mlp_a"], 6) for r in steps}
    assert len(weights) == 1 and abs(weights.pop() - 0.5) > 0.05  # fit before the first step, then fixed
    epoch = [r for r in history if r.get("kind") == "epoch"][-1]
    assert epoch["blend_fit_rows"] == tiny_data.info.labeled["val"] and epoch["blend_fit_loss"] > 0
    assert history[-1]["val_accuracy"] > 0.5  # labels only used to score, never to train
