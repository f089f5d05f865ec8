"""The model registry of students: MLflow's Model Registry with aliases and lineage, and what tells a
registered version is stale. One job per module:

- ``store``: register a student (an MLflow run with its config, metrics, card and lineage, plus a model
  version), aliases (``champion``, ``challenger``, ``previous``), promote / rollback, and
  ``models:/NAME@ALIAS`` / ``models:/NAME/N`` resolved to a local student directory. Imports mlflow
  when called (extra ``registry``).
- ``lineage``: what a student was made from as fingerprints (teachers' weights, data files) that can be
  recomputed later, and what changed since. No MLflow.
- ``drift``: the served predicted-class mix (Prometheus text) against the validation split's, by total
  variation distance. Pure.
- ``status``: ``registry status``: stale versions (teachers or data changed, or drift).
- ``legacy``: the 0.2 file registry (``registry/NAME/vN`` + ``latest``) read, and imported into MLflow.

Importing this package imports neither Ray nor mlflow.
"""
