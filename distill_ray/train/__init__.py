"""Training the student with Ray Train: the per-worker loop and its driver, what each run reads, the
Ray Data stages that feed a worker (online teachers included), how a worker reads its shard, and
validation.

- ``loop``: the distillation loop (one per-worker function) and ``run_training``, its driver.
- ``options``: ``WorkerOptions``, everything a worker is told, one frozen value built on the driver.
- ``state``: ``TrainState``, what the loop changes and a checkpoint keeps (save, restore).
- ``epochs``: a worker's rows and each epoch's selection (curriculum stage, open fraction, order).
- ``controller_env``: the Ray Train controller settings a run starts with (how often it polls workers).
- ``inputs``: the datasets and step budgets of a run, its baseline and the ablation's rows.
- ``stages``: the Ray Data stages between a split and a Train worker, built on the driver.
- ``streams``: a worker's own stream of rows, kept in memory or streamed.
- ``rollouts``: an on-policy step's batch: the student writes in the worker, the teachers' services score it.
- ``validation``: learned teacher weights fit to validation labels; per-epoch metrics across ranks.
"""
