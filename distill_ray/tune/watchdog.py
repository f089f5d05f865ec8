"""A trial whose training stops making progress is failed, so the sweep goes on.

Nothing in Ray ends a Train run that waits forever: workers whose placement group is never granted
(a resource no node has; Train retries the worker group's start every 60 s without end) or workers
waiting for rows that no Ray Data task can read (every CPU held; see ``capacity.py``). Tune only waits
for the trial's next result, so the sweep would wait as long. ``watched`` runs a trial's Train run in
a thread and raises ``TrialStalled`` in the trial when none of the watched paths has changed for
``tune.stall_timeout_s`` seconds: rank 0 rewrites its progress file every logged step, and every report
adds a checkpoint to the run's directory. Tune marks the trial failed (ERROR, with this message) and
starts the next one; the trial's actor then ends, and its Train run with it (``release.release_callback``
frees the workers' placement group).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

PROGRESS_FILE = "progress.json"
T = TypeVar("T")


class TrialStalled(RuntimeError):
    """A trial's Train run showed no progress for ``tune.stall_timeout_s`` seconds."""


def watched(run: Callable[[], T], timeout_s: float, paths: Sequence[Path], poll_s: float = 2.0,
            between: Callable[[], object] | None = None) -> T:
    """``run()``'s result or exception, or ``TrialStalled`` once no path in ``paths`` has changed for
    ``timeout_s`` seconds (counted from the call; 0 or less: no watch). ``run`` goes in a daemon thread
    (after a stall it goes on until the process, a Tune trial's actor, ends); ``between()`` is called
    from the caller's thread every ``poll_s`` seconds while it runs (a trial forwards its reports)."""
    if timeout_s <= 0 and between is None:
        return run()
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = run()
        except BaseException as err:  # handed to the caller's thread as it is
            outcome["error"] = err

    started = time.time()
    thread = threading.Thread(target=target, name="watched-train-run", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(min(poll_s, timeout_s / 4) if timeout_s > 0 else poll_s)
        if between is not None:
            between()
        idle = time.time() - max([started, *(_mtime(p) for p in paths)])
        if timeout_s > 0 and thread.is_alive() and idle > timeout_s:
            raise TrialStalled(f"no training progress for {idle:.0f} s (tune.stall_timeout_s={timeout_s:g}): the Train "
                               f"run's workers were never placed, never got their rows, or stopped; this trial is "
                               f"failed so the sweep goes on (its Train logs: the Ray session's logs/train/)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
