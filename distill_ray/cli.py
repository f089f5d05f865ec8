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


def _cmd_smoke(args: argparse.Namespace) -> int:
    from distill_ray.smoke import run_smoke

    run_smoke(train_samples=args.train_samples, epochs=args.epochs, seed=args.seed)
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

    p = sub.add_parser("smoke", help="a tiny distillation on real Fashion-MNIST in pure PyTorch on CPU "
                                     "(no Ray): checks the install and the distillation core")
    p.add_argument("--train-samples", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"distill-ray: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
