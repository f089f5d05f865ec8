"""The ``distill-ray`` command (also ``python -m distill_ray``).

Each subcommand parses its arguments, loads and validates the config once, and calls one function.
Bad input exits with status 2 and a one-line reason; nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys

from distill_ray import __version__
from distill_ray.config import QUANTIZE_KINDS, ConfigError, dump_config, load_config
from distill_ray.data.rows import DataError


ADDRESS_HELP = ("Ray cluster to join: HOST:PORT, or auto for the one running on this machine (default: "
                "RAY_ADDRESS, else a new local Ray of this command's own)")


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
    found = None
    if args.search:
        from distill_ray.tune.search import run_search

        cfg, found = run_search(cfg, args.search)
    # run_experiment prints the run directory itself: the verdict must stay the run's last lines.
    run_experiment(cfg, retrain_teachers=args.retrain_teachers, rebuild_cache=args.rebuild, search=found)
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
    dirs = prepare_teachers(cfg, data, retrain=args.retrain_teachers)
    targets = build_cache(cfg, data, dirs, rebuild=args.rebuild)
    for name, path in dirs.items():
        print(f"teacher {name}: {path}")
    print(f"soft targets: {targets.directory}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from distill_ray.pipeline import connect_ray
    from distill_ray.tune.sweep import resume_sweep, run_sweep

    if args.resume:
        if args.config or args.space or args.samples or args.max_concurrent or args.overrides:
            raise ConfigError("--resume finishes a sweep as it was started: give only --resume SWEEP_DIR")
        connect_ray(args.address)
        out = resume_sweep(args.resume)
    else:
        if not args.config or not args.space:
            raise ConfigError("tune needs CONFIG and --space tune_spaces/NAME.yaml (or --resume SWEEP_DIR)")
        cfg = load_config(args.config, args.overrides)
        connect_ray(args.address)
        out = run_sweep(cfg, args.space, samples=args.samples, max_concurrent=args.max_concurrent)
    best = out["best"]
    print(f"\nbest trial {best['trial_id']}: {best['metric']:.4f} with {best['params']}")
    print(f"sweep directory: {out['sweep_dir']}")
    print(f"winner: {out['student_dir']} (registered as {out['registered']})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from distill_ray.config import ServeConfig
    from distill_ray.serving.launch import start_serve
    from distill_ray.serving.model import StudentLoadError
    from distill_ray.serving.options import serve_config_from_dict

    serve_cfg = load_config(args.config, args.overrides).serve if args.config else ServeConfig()
    if args.quantize:
        serve_cfg = replace(serve_cfg, quantize=args.quantize)
    if args.metrics_port is not None:  # validated as the config key is: serve.metrics_port, 1..65535
        serve_cfg = serve_config_from_dict({**asdict(serve_cfg), "metrics_port": args.metrics_port})
    try:
        start_serve(args.path, host=args.host, port=args.port, serve_config=serve_cfg, blocking=True)
    except StudentLoadError as err:
        raise ValueError(str(err)) from None
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from distill_ray.evaluation.metrics import classifier_scores, lm_scores, single_sample_latency_ms
    from distill_ray.models import load_model, num_params
    from distill_ray.pipeline import connect_ray, load_data
    from distill_ray.evaluation.scoring import split_outputs
    from distill_ray.serving.model import StudentLoadError, resolve_student_dir

    cfg = load_config(args.data, args.overrides)
    try:
        student_dir = resolve_student_dir(args.path)
    except StudentLoadError as err:
        raise ValueError(str(err)) from None
    model, _ = load_model(student_dir)
    connect_ray(args.address)
    data = load_data(cfg)
    causal = data.info.task == "causal_lm"
    outputs, y, example = split_outputs(data.splits[args.split], {"student": model}, causal)
    result = {"student": str(student_dir), "split": args.split, "num_samples": int(len(y))}
    if causal:
        scores = lm_scores(*outputs["student"], y)
        result.update(perplexity=scores["perplexity"], token_accuracy=scores["accuracy"])
    else:
        result.update(classifier_scores(outputs["student"].softmax(-1), y))
    result.update(params=num_params(model), latency_ms=single_sample_latency_ms(model, example))
    print(json.dumps(result, indent=2))
    return 0


def _cmd_ablation(args: argparse.Namespace) -> int:
    from distill_ray.evaluation.ablation import ablation_main

    load_config(args.config, args.overrides)  # a bad config fails here, before any Ray work
    ablation_main(args.config, overrides=args.overrides, seeds=args.seeds, address=args.address,
                  out_dir=args.out, rows=args.rows.split(",") if args.rows else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-ray",
        description="Distil several frozen teachers into one small student on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"distill-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's own logs and every worker's output (default: RUN_DIR/logs/)")
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
        p.add_argument("--address", default=None, help=ADDRESS_HELP)
        p.add_argument("--retrain-teachers", action="store_true", help="train recipe teachers even if saved")
        p.add_argument("--rebuild", action="store_true", help="rebuild the soft-target cache even if valid")
        if name == "run":
            p.add_argument("--search", type=int, default=0, metavar="N",
                           help="first a Ray Tune search of N trials over loss.temperature, loss.alpha and the "
                                "transfer set (data.transfer, data.transfer_size) on the validation split; the "
                                "student then trains with the winner")
        p.set_defaults(func=func)

    p = sub.add_parser("tune", help="Ray Tune sweep over config keys named in a space file; the winner is "
                                    "exported and registered")
    p.add_argument("config", nargs="?", help="experiment YAML (not needed with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path; repeatable")
    p.add_argument("--space", help="search space YAML, e.g. tune_spaces/kd_basic.yaml")
    p.add_argument("--samples", type=int, default=None, help="trials to sample (default: tune.num_samples)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: tune.max_concurrent)")
    p.add_argument("--resume", metavar="SWEEP_DIR", default=None,
                   help="finish an interrupted sweep: unfinished trials run, finished ones are kept")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("serve", help="serve a student over HTTP with Ray Serve (binds 127.0.0.1 unless told)")
    p.add_argument("path", help="a run directory, a student directory, or a registry entry (registry/NAME)")
    p.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port, 8000)")
    p.add_argument("--config", default=None, help="experiment YAML whose serve: section sets batching and limits")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (with --config), e.g. --set serve.max_batch_size=64")
    p.add_argument("--quantize", choices=QUANTIZE_KINDS, default=None,
                   help="dynamic int8 quantization of the student's linear layers at load")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus port of the Ray this command starts (default: serve.metrics_port, 8081)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("eval", help="score a student (run dir, student dir or registry entry) on a config's data: "
                       "accuracy and ECE, or perplexity for a causal LM")
    p.add_argument("path", help="a run directory, a student directory, or a registry entry (registry/NAME)")
    p.add_argument("--data", required=True, metavar="CONFIG", help="experiment YAML whose data: section to score on")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.max_eval_samples=1000")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("ablation", help="the quality table: scratch, single teacher, each blend, each curriculum, "
                                        "a broken extra teacher; for a causal LM (data.task=causal_lm) scratch, "
                                        "token/sequence-level KD and POCL; mean +- std over seeds")
    _add_config_args(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (train.seed = 0..N-1)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR's sibling NAME-ablation)")
    p.add_argument("--rows", default=None, help="comma-separated subset of rows (default: all of the config's "
                                                "task; a row of the other task is refused, naming the valid ones)")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_cmd_ablation)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distill_ray.console import set_verbose

    set_verbose(args.verbose)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"distill-ray: config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"distill-ray: data error: {err}", file=sys.stderr)
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
