"""What every ``jobs/*.py`` entrypoint shares: ``--config FILE`` plus the CLI's own flags, handed to
``distill-ray`` so a job does exactly what the command does (same validation, same one-line errors).

The entrypoints run as ``python jobs/NAME.py`` (under ``ray job submit --working-dir .`` too), which
puts jobs/ on sys.path but not the checkout: the checkout goes first so the code that runs is the
code that was submitted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "distill_ray" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def run(command: str, prog: str, argv: list[str] | None = None) -> int:
    """``python jobs/X.py --config C [flags]`` -> ``distill-ray COMMAND C [flags]``."""
    from distill_ray.cli import main

    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    parser.add_argument("--config")
    args, rest = parser.parse_known_args(argv)
    if any(flag in rest for flag in ("-h", "--help")):
        return main([command, "--help"])
    return main([command, *([args.config] if args.config else []), *rest])
