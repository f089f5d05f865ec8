"""Ray Jobs entrypoint for the first two phases only: train the recipe teachers and cache their
soft targets (Parquet shards), so later `jobs/distill.py` runs and Tune trials just read them.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/cache_teachers.py --config jobs/configs/cluster_gpu.yaml

Locally: ``python jobs/cache_teachers.py --config jobs/configs/laptop.yaml``. A bad config exits
with status 2 and one line.
"""

import sys

from _cli import run

if __name__ == "__main__":
    sys.exit(run("cache", "jobs/cache_teachers.py"))
