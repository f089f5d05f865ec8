"""Ray Data's two Parquet readers side by side on the small local files a run reads many times.

Ray 2.60 reads Parquet through its V2 datasource by default: files are listed by a pool of
footer-reading actors (new worker processes, started per read). distill-ray's local Ray switches to
the V1 reader (``pipeline.local_parquet_settings``); this prints what that buys, per read, in one Ray
session, alternating the two readers so that machine load hits both alike::

    python bench/parquet_read.py                 # 1,200 rows x 784 floats in 1 file, 5 rounds
    python bench/parquet_read.py --rows 54000 --files 8

Each round reads the whole table to the last batch (``iter_batches``), as a Train worker does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_table(directory: Path, rows: int, files: int, width: int) -> None:
    rng = np.random.default_rng(0)
    for i, ids in enumerate(np.array_split(np.arange(rows), files)):
        x = rng.random((len(ids), width), dtype=np.float32)
        table = pa.table({"id": ids, "x": pa.FixedSizeListArray.from_arrays(x.reshape(-1), width),
                          "label": rng.integers(0, 10, len(ids))})
        pq.write_table(table, directory / f"part-{i:03d}.parquet")


def read_seconds(path: str, v2: bool) -> tuple[float, int]:
    import ray

    ray.data.DataContext.get_current().use_datasource_v2 = v2
    start = time.perf_counter()
    n = sum(len(b["id"]) for b in ray.data.read_parquet(path).iter_batches(batch_size=256))
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--files", type=int, default=1)
    parser.add_argument("--width", type=int, default=784)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    # V2's footer pool as a local distill-ray run sizes it (cores / 2), not Ray's 32 actors.
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(1, (os.cpu_count() or 2) // 2)))
    import ray

    ray.init(num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        write_table(Path(tmp), args.rows, args.files, args.width)
        times: dict[str, list[float]] = {"v2": [], "v1": []}
        for round_ in range(args.rounds + 1):  # round 0 warms both up and is not counted
            for name in ("v2", "v1"):
                seconds, n = read_seconds(tmp, name == "v2")
                assert n == args.rows, (name, n)
                if round_:
                    times[name].append(seconds)
    v2, v1 = statistics.median(times["v2"]), statistics.median(times["v1"])
    print(f"{args.rows:,} rows x {args.width} float32 in {args.files} file(s), {args.rounds} rounds, "
          f"footer actors {os.environ['RAY_DATA_PARQUET_FOOTER_NUM_ACTORS']}, {os.cpu_count()} cores")
    print("| reader | median s per full read | min | max |\n|---|---:|---:|---:|")
    for name in ("v2", "v1"):
        print(f"| {name} | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} | {max(times[name]):.3f} |")
    print(f"V2 / V1 time per read: {v2 / v1:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
