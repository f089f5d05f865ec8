"""Freeing the Train workers of a trial that Tune stopped or that failed.

A trial's actor records its own id and its Train run's placement group in its storage directory
(``sweep.trial_storage_dir``); the callback here removes the group once that actor is dead."""

from __future__ import annotations

from pathlib import Path

PLACEMENT_GROUP_FILE = "placement_group_id"
TRIAL_ACTOR_FILE = "trial_actor_id"


def release_callback(storage: str):
    """A Tune callback that frees a stopped trial's Train workers.

    When ASHA stops a trial, Tune kills the trial's actor mid-``fit()``; the TorchTrainer's controller
    dies with it, but its workers' placement group outlives it (its lifetime is the driver's job),
    and Train's own cleaner needs the dashboard's state API, which a local Ray may not run. Left
    alone, the CPUs stay reserved and the next trial's workers wait forever. The group is removed
    only once the trial's actor is dead: removed earlier, a live controller would restart its
    workers in a new group."""
    import time

    from ray import tune

    class ReleaseTrainWorkers(tune.Callback):
        def __init__(self):
            self.pending: dict[str, float] = {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.pending[trial.trial_id] = time.monotonic()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.pending[trial.trial_id] = time.monotonic()

        def on_step_begin(self, iteration, trials, **info):
            for trial_id, since in list(self.pending.items()):
                if _actor_dead(_read(trial_id, TRIAL_ACTOR_FILE)) or time.monotonic() - since > 120:
                    _remove_group(_read(trial_id, PLACEMENT_GROUP_FILE))
                    del self.pending[trial_id]

        def on_experiment_end(self, trials, **info):
            deadline = time.monotonic() + 30
            while self.pending and time.monotonic() < deadline:
                self.on_step_begin(0, trials)
                time.sleep(0.5)

    def _read(trial_id: str, name: str) -> str | None:
        path = Path(storage) / f"train-{trial_id}" / name
        return path.read_text().strip() if path.is_file() else None

    return ReleaseTrainWorkers()


def _actor_dead(actor_id: str | None) -> bool:
    from ray._private.state import actors  # GCS table: works without the dashboard

    if actor_id is None:
        return True
    return (actors(actor_id=actor_id) or {}).get("State") in (None, "DEAD")


def _remove_group(group_id: str | None) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    if group_id is None:
        return
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
    if placement_group_table(pg).get("state") not in (None, "REMOVED"):
        remove_placement_group(pg)
