"""Entry point of ``serve run serve.app:build_app student_dir=RUN_DIR`` and ``serve run serve/config.yaml``.

The deployment itself (``StudentDeployment``, FastAPI ingress, batching) lives in the library,
``distill_ray.serving.app``; this file only re-exports it, so the app imports the library and never
the other way round. Importing it defines nothing new and does no work (no model loading, no Ray
calls). ``distill-ray serve RUN_DIR`` reaches the same deployment without this file. See serve/README.md.
"""

from distill_ray.serving.app import StudentDeployment, build_app, build_student_app

__all__ = ["StudentDeployment", "build_app", "build_student_app"]
