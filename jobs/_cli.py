"""What every ``jobs/*.py`` entrypoint shares: ``--config FILE`` plus the CLI's own flags, handed to
``distill-ray`` so a job does exactly what the command does (same validation, same one-line errors).

The entrypoints run as ``python jobs/NAME.py`` and import ``distill_ray`` like any other program:
from the package ``make setup`` installs (editable, so it is this checkout), or, under
``ray job submit --working-dir .``, from the uploaded checkout, which Ray puts first on the
PYTHONPATH of the driver and of every worker. Nothing here edits ``sys.path``.
"""

from __future__ import annotations

import argparse


def run(command: str, prog: str, argv: list[str] | None = None) -> int:
    """``python jobs/X.py --config C [flags]`` -> ``distill-ray COMMAND C [flags]``."""
    from distill_ray.cli import main

    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    parser.add_argument("--config")
    args, rest = parser.parse_known_args(argv)
    if any(flag in rest for flag in ("-h", "--help")):
        return main([command, "--help"])
    return main([command, *([args.config] if args.config else []), *rest])
