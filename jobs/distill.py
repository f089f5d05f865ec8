"""Ray Jobs entrypoint for the main job: teachers -> soft-target cache -> student -> test -> RUN_DIR.

Run it on this machine with the package installed (``make setup``: .venv holds it, editable), which
joins a Ray already running here, else starts a local one::

    .venv/bin/python jobs/distill.py --config jobs/configs/laptop.yaml

or submit it to a cluster (the dashboard address; the job's driver runs on the head node)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/distill.py --config jobs/configs/cluster_gpu.yaml --set train.epochs=4

``--working-dir .`` uploads this checkout (files .gitignore excludes stay behind) and Ray puts it
first on the PYTHONPATH of the driver and every worker, so they all import the submitted
``distill_ray``. Inside a job Ray sets RAY_ADDRESS, and the
script joins that cluster. Re-submitting with the same config (same ``name`` and ``run_dir``)
resumes the student from its latest checkpoint. A bad config exits with status 2 and one line.
"""

import sys

from _cli import run

if __name__ == "__main__":
    sys.exit(run("run", "jobs/distill.py"))
