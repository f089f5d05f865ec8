"""Ray Jobs entrypoint for a Ray Tune sweep (`distill-ray tune`): teachers and cache once, then trials.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/sweep.py --config jobs/configs/quickstart.yaml --space tune_spaces/kd_basic.yaml --samples 8

Resume an interrupted sweep with ``--resume SWEEP_DIR`` (only that flag). Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "distill_ray" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from distill_ray.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/sweep.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiment YAML")
    parser.add_argument("--space", help="tune_spaces/NAME.yaml")
    parser.add_argument("--samples", type=int)
    parser.add_argument("--max-concurrent", type=int)
    parser.add_argument("--resume", metavar="SWEEP_DIR")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--address", default=None)
    args = parser.parse_args(argv)
    cli_args = ["tune"] + ([args.config] if args.config else [])
    for flag, value in (("--space", args.space), ("--samples", args.samples),
                        ("--max-concurrent", args.max_concurrent), ("--resume", args.resume),
                        ("--address", args.address)):
        if value is not None:
            cli_args += [flag, str(value)]
    cli_args += [f"--set={item}" for item in args.overrides]
    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
