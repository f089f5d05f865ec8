"""Ray Jobs entrypoint for a Ray Tune sweep (`distill-ray tune`): teachers and cache once, then trials.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/sweep.py --config jobs/configs/quickstart.yaml --space tune_spaces/kd_basic.yaml --samples 8

Resume an interrupted sweep with ``--resume SWEEP_DIR`` (only that flag). Bad input exits 2 with one line.
"""

import sys

from _cli import run

if __name__ == "__main__":
    sys.exit(run("tune", "jobs/sweep.py"))
