"""How Ray Train's controller runs a TorchTrainer of this project: settings it reads from the environment.

Ray Train V2 starts a controller actor per run and hands it the driver's ``RAY_TRAIN_*`` variables.
Two of its defaults cost every short run seconds for nothing (``bench/overhead.py`` measures it):

- ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s): the controller polls its workers this often, and
  learns only at a poll that the training function returned, so a run ended up to 2 s after its last
  step; and a worker's ``ray.train.report`` waits until the previous report was polled (a queue of
  one), so reports less than 2 s apart (a checkpoint at an epoch's end, the next at the next one,
  in a short run) stalled training. Polling a few workers every 0.2 s costs one small remote call
  each; many workers keep Ray's default.
- ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` (on): an actor per run that polls whether a node is being
  drained for preemption. On a one-node Ray there is nothing to watch (a preempted only node takes
  the driver with it): one process fewer to start per run.

A value already in the environment (the user's) wins; the previous values are restored after the run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

FAST_POLL_S = "0.2"
FAST_POLL_MAX_WORKERS = 8  # beyond this, Ray's own 2 s


@contextmanager
def controller_env(num_workers: int) -> Iterator[dict[str, str]]:
    """The settings above in ``os.environ`` while a TorchTrainer starts and runs; yields those it set."""
    import ray

    wanted = {}
    if num_workers <= FAST_POLL_MAX_WORKERS:
        wanted["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = FAST_POLL_S
    if sum(1 for node in ray.nodes() if node.get("Alive")) == 1:
        wanted["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    added = {key: value for key, value in wanted.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield added
    finally:
        for key in added:
            os.environ.pop(key, None)
