"""The ``distill-ray`` command (also ``python -m distill_ray``).

Each subcommand parses its arguments, loads and validates the config once, and calls one function.
Bad input exits with status 2 and a one-line reason; nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys

from distill_ray import __version__
from distill_ray.config import ConfigError, dump_config, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path, e.g. --set loss.temperature=4 "
                             "(teachers by index or name: teachers.cnn.num_cpus=0.5); repeatable")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from distill_ray.pipeline import connect_ray, run_experiment

    connect_ray(args.address)
    run_experiment(cfg, retrain_teachers=args.retrain_teachers)
    print(f"\nrun directory: {cfg.run_path().resolve()}")
    return 0


def _cmd_teachers(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from distill_ray.pipeline import connect_ray, load_data, prepare_teachers

    connect_ray(args.address)
    for name, path in prepare_teachers(cfg, load_data(cfg), retrain=args.retrain_teachers).items():
        print(f"{name}\t{path}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from distill_ray.pipeline import build_cache, connect_ray, load_data, prepare_teachers

    connect_ray(args.address)
    data = load_data(cfg)
    build_cache(cfg, data, prepare_teachers(cfg, data), rebuild=args.rebuild)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-ray",
        description="Distil several frozen teachers into one small student on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"distill-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="validate a config (with --set overrides) and print it as YAML")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    for name, func, text in (
        ("run", _cmd_run, "the main job: teachers -> soft-target cache -> student + baseline -> test -> RUN_DIR"),
        ("teachers", _cmd_teachers, "train the config's teacher recipes (reused when recipe and data are unchanged)"),
        ("cache", _cmd_cache, "compute and store the teachers' soft targets as verified Parquet shards"),
    ):
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, a cluster "
                                                       "on this machine, or a new local Ray)")
        p.add_argument("--retrain-teachers", action="store_true", help="train recipe teachers even if saved")
        p.add_argument("--rebuild", action="store_true", help="rebuild the soft-target cache even if valid")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"distill-ray: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        # Known failure kinds (missing data, corrupt cache, bad model dir) end in one line, not a trace.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"distill-ray: {type(err).__name__}: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
