"""Searching configs with Ray Tune: sweeps over any config field (ASHA or Population Based
Training) with the winner exported and registered, and the small search built into ``distill-ray run``.

- ``sweep``: ``run_sweep`` / ``resume_sweep``, the trainable, the winner's export.
- ``pbt``: Population Based Training's slots, population, mutations and scheduler.
- ``space``: search spaces from YAML, validated against the base config.
- ``summary``: the trial table, the metric plot and ``sweep_summary.md``.
- ``search``: ``distill-ray run CONFIG --search N``, a short ASHA search before the run trains.
- ``terminal``: a line per trial result on the terminal, Tune's tables to the sweep's log.
- ``reports``: a trial's Train reports reach Tune from the trial's own thread.
- ``release``: a stopped trial's Train workers are freed once its actor is dead.
- ``capacity``: how many trials run at once: the free CPUs, with one kept for reading data.
- ``watchdog``: a trial whose training makes no progress is failed, so the sweep goes on.
"""
