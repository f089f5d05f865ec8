"""Knowledge distillation as pure tensor functions: the losses, how several teachers' distributions
are blended into one target, the curriculum and the schedules, and what one training step optimises.
Plain PyTorch, no Ray: every module here imports without it, so the Train loop, Tune and the tests
call the same functions.

- ``losses``: the distillation losses (KL and its kin, top-k, across tokenizers, DKD, focal, margin), batch-meaned.
- ``feature_losses``: hint (FitNets) and attention-transfer terms on hidden features.
- ``labels``: label-smoothed cross-entropy, MixUp and CutMix.
- ``long_tail``: long-tailed classes: per-class KD weights and temperatures, logit-adjusted cross-entropy.
- ``blending``: ``TeacherBlend``, K teachers' distributions mixed by fixed or learned weights.
- ``curriculum``: difficulty measures, which rows are open, temperature and alpha over training.
- ``schedules``: learning-rate factor as a pure function of the step; the KD warm-up by epoch.
- ``self_ema``: self-distillation's teacher, an exponential moving average of the student's own weights.
- ``objectives``: one step's teacher signal from a batch's columns and ``batch_loss``, its loss and parts
  (KD and task per row, token-level KD on sequences, on-policy GJSD, hints); no optimizer steps here.
- ``on_policy``: on-policy distillation's pieces: which steps, the batch of the student's own responses,
  the teachers' scores on it, the facts logged per step, the guard against collapsed responses.
"""
