"""bench/streaming_memory.py end to end: streamed epochs train every batch, worker memory stays flat.

The bench starts its own local Ray in a subprocess; this test does not use the session fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_streamed_training_trains_every_row_with_flat_worker_memory(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, "bench/streaming_memory.py", "--rows", "6000", "--features", "64", "--scales", "1,2",
           "--object-store-mb", "80", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # the bench starts its own Ray, never joins one
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())

    assert result["mode"] == "stream"
    scales = {r["scale"]: r for r in result["scales"]}
    assert sorted(scales) == [1, 2]
    world, batch = result["num_workers"], result["batch_size"]
    per_rank = batch // world
    for r in scales.values():
        shards = r["rank_shard_rows"]
        assert r["rows"] == 6000 * r["scale"] and r["train_rows"] + r["val_rows"] == r["rows"]
        assert sum(shards) == r["train_rows"] and len(shards) == world
        # Every rank steps until the smaller shard runs out of full batches: all of them were trained.
        assert r["steps"] == min(shards) // per_rank == r["expected_steps"]
        assert r["rows_trained"] == r["steps"] * batch
        assert 0 <= world * min(shards) - r["rows_trained"] < batch
        assert r["rows_trained"] >= 0.9 * r["train_rows"]  # hashed shards are balanced
        assert r["val_accuracy"] > 0.2  # it learned something (chance is 0.1)
    assert scales[2]["disk_bytes"] > 1.8 * scales[1]["disk_bytes"]
    # Twice the data, the same worker memory: streaming does not hold the shard.
    assert scales[2]["worker_peak_rss_mb"] < 1.3 * scales[1]["worker_peak_rss_mb"], scales
    assert result["summary"]["worker_peak_rss_ratio"] < 1.3
