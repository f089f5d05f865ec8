"""A trial's Train reports reach Tune from the trial's own thread.

Train V2 runs a trial's TorchTrainer controller in an actor of its own, so each report has to cross
to the trial's process. Ray's ``TuneReportCallback`` hands it to the trial actor's *main* thread
(``_TrainSession._get_result_from_queues``), which then puts it on the one-slot queue that the trial
function's thread also writes when the function returns (``RESULT_DUPLICATE``). When the run's last
report arrives as the function returns, both land on that slot and the main thread blocks on a full
queue that only it reads: the trial never ends and the sweep waits forever (seen in Ray 2.60 with a
py-spy dump: the main thread in ``Queue.put`` under ``_report_training_result``, the function's
thread gone, the controller idle).

Here the controller's callback only appends each report to a Ray queue, and the trial function's
own thread moves them to Tune with ``tune.report`` while the Train run goes on in another thread
(``watchdog.watched(..., between=...)``) and once more after it ends: every result takes the
documented path, from the function's thread, one at a time, so nothing races for that slot.
"""

from __future__ import annotations

from typing import Any, Callable


def train_to_tune() -> tuple[Any, Callable[[], None], Callable[[], None]]:
    """``(callback, forward, close)``: pass ``callback`` to the trial's TorchTrainer, call ``forward()``
    from the trial function's thread while it runs and after (it reports what has arrived), then
    ``close()`` (ends the queue's actor)."""
    from ray import tune
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})

    class ReportsToTrial(UserCallback):
        def __init__(self, reports: Queue):
            self.reports = reports

        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            row = dict(metrics[0])  # rank 0's metrics, as TuneReportCallback takes them
            if checkpoint is not None:  # already in storage: Tune gets its path, not a second copy
                row["checkpoint_path"] = checkpoint.path  # the key the sweep reads, as TuneReportCallback writes it
            self.reports.put(row)

    def forward() -> None:
        while True:
            try:
                row = queue.get_nowait()
            except Empty:
                return
            tune.report(row)

    return ReportsToTrial(queue), forward, lambda: queue.shutdown(force=True)
