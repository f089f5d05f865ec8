"""Judging a run: metrics, every model scored on the test split, the verdict against the baseline,
the report with its plots, and the ablation table over seeds. (Named ``evaluation``, not ``eval``,
which would shadow a builtin.)

- ``metrics``: accuracy, calibration error, perplexity, latency. No Ray.
- ``scoring``: teachers, their blend, baseline and student scored on the test split; the final table.
- ``verdict``: did the student beat its baseline by more than the noise, and what to try. No Ray.
- ``report``: ``report.md`` and its plots in the run directory. No Ray.
- ``ablation``: the quality table: which parts of the recipe earn their keep, over seeds; the skeleton
  both tables share (rows over seeds, mean ± std, ablation.json and ablation.md).
- ``classifier_ablation``: the classifier's rows (blends, curricula, a broken teacher, a wider student).
- ``lm_ablation``: the causal language model's rows (token-level and sequence-level KD, POCL).
"""
