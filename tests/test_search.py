"""The search built into a run (`distill-ray run CONFIG --search N`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from distill_ray.config import config_from_dict
from distill_ray.tune.search import ALPHAS, TEMPERATURES, config_values, search_space


def _cfg(tmp_path: Path, **data) -> object:
    return config_from_dict({
        "name": "mine", "run_dir": str(tmp_path / "runs"), "cache": {"dir": str(tmp_path / "cache")},
        "data": {"format": "parquet", "path": str(tmp_path / "t.parquet"), "label_field": "y", **data},
        "teachers": [{"name": "big", "recipe": "mlp", "options": {"hidden": [64], "epochs": 5},
                      "path": str(tmp_path / "big"), "num_cpus": 0.25}],
        "student": {"arch": "mlp", "options": {"hidden": [8]}},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.01, "checkpoint_every_steps": 1000},
        "tune": {"cpus_per_trial": 0.25}, "tracking": {"wandb": "disabled"}})


def _info(kind="tabular", train=5000, labeled=1000, transfer_rows=4000, transfer="mixup", task="classification"):
    return SimpleNamespace(counts={"train": train}, labeled={"train": labeled}, transfer_rows=transfer_rows,
                           transfer=transfer, kind=kind, task=task)


def test_the_space_holds_the_config_own_values_first_and_one_transfer_key(tmp_path):
    choices, own = search_space(_cfg(tmp_path), _info())
    assert choices["loss.temperature"] == TEMPERATURES and choices["loss.alpha"] == ALPHAS
    assert choices["transfer"] == ("none", "mixup x2", "mixup x4", "mixup x8", "noise x2", "noise x4", "noise x8")
    assert own == {"loss.temperature": 2.0, "loss.alpha": 0.5, "transfer": "mixup x4"}
    assert config_values(own) == {"loss.temperature": 2.0, "loss.alpha": 0.5, "data.transfer": "mixup",
                                  "data.transfer_size": 4}
    assert config_values({"transfer": "none"}) == {"data.transfer": "none"}
    images, _ = search_space(_cfg(tmp_path), _info(kind="image"))
    assert images["transfer"][1:4] == ("mixup x2", "mixup x4", "mixup x8") and "augment x8" in images["transfer"]
    text, _ = search_space(_cfg(tmp_path), _info(kind="text"))
    assert text["transfer"] == ("none", "augment x2", "augment x4", "augment x8")


def test_data_with_unlabeled_rows_of_its_own_keeps_its_transfer_set_and_a_huge_one_drops_large_sizes(tmp_path):
    choices, own = search_space(_cfg(tmp_path), _info(train=50_000, labeled=5_000, transfer_rows=0, transfer="none"))
    assert set(choices) == {"loss.temperature", "loss.alpha"} and "transfer" not in own
    choices, _ = search_space(_cfg(tmp_path), _info(train=100_000, labeled=100_000, transfer_rows=0, transfer="none"))
    assert choices["transfer"] == ("none", "mixup x2", "mixup x4", "noise x2", "noise x4")  # x8: 800k rows


@pytest.mark.slow
@pytest.mark.ray
def test_a_search_tries_the_config_first_and_hands_the_winner_to_the_run(ray_local, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    from distill_ray.tune.search import with_values, run_search

    digits = load_digits()
    keep = np.random.default_rng(0).permutation(len(digits.target))[:600]
    pq.write_table(pa.table({**{f"p{i}": digits.data[keep, i] for i in range(64)},
                             "y": [str(v) for v in digits.target[keep]]}), tmp_path / "t.parquet")
    cfg = _cfg(tmp_path, transfer="mixup")  # a transfer set of its own (the default is none): the first trial keeps it
    picked_cfg, found = run_search(cfg, samples=2)
    trials = found["trials"]
    assert len(trials) == 2 and all(t["val_accuracy"] is not None for t in trials)
    assert found["own"] == {"loss.temperature": 2.0, "loss.alpha": 0.5, "data.transfer": "mixup", "data.transfer_size": 4}
    assert found["own_val_accuracy"] in [t["val_accuracy"] for t in trials]  # the config's values ran
    best = max(trials, key=lambda t: t["val_accuracy"])
    assert found["picked"] == best["params"] and picked_cfg == with_values(cfg, best["params"])
    search_dir = tmp_path / "runs" / "mine" / "search"
    assert json.loads((search_dir / "search.json").read_text())["picked"] == found["picked"]
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cache per transfer kind (mixup, noise) at x8
    terminal = capsys.readouterr().out
    assert "search: picked " in terminal and "Configuration for experiment" not in terminal
    assert (search_dir / "tune.log").is_file()
