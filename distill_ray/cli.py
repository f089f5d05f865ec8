"""The ``distill-ray`` command (also ``python -m distill_ray``).

Each subcommand parses its arguments, loads and validates the config once, and calls one function.
Bad input exits with status 2 and a one-line reason; nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    from distill_ray.pipeline import connect_ray, load_data, outside_teachers, prepare_teachers

    cfg = outside_teachers(load_config(args.config, args.overrides))  # self-distillation's are the student

    connect_ray(args.address)
    for name, path in prepare_teachers(cfg, load_data(cfg), retrain=args.retrain_teachers).items():
        print(f"{name}\t{path}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from distill_ray.pipeline import build_cache, connect_ray, load_data, outside_teachers, prepare_teachers

    cfg = outside_teachers(load_config(args.config, args.overrides))  # self-distillation's are the student

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


SERVE_ACTIONS = ("promote", "rollback")
"""``distill-ray serve promote|rollback`` act on the running canary instead of serving a path."""
CANARY_FLAGS = ("challenger", "challenger_fraction", "sticky_header")


def _cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from distill_ray.config import ServeConfig
    from distill_ray.serving.launch import change_traffic, start_serve
    from distill_ray.serving.model import StudentLoadError
    from distill_ray.serving.options import serve_config_from_dict

    if args.path in SERVE_ACTIONS:
        given = [f"--{k.replace('_', '-')}" for k in (*CANARY_FLAGS, "config", "quantize", "host", "port",
                                                      "metrics_port") if getattr(args, k) is not None] + (["--set"] if args.overrides else [])
        if given:
            raise ConfigError(f"serve {args.path} acts on the running canary and takes only --address; drop "
                              f"{', '.join(given)}")
        split = change_traffic(args.path, args.address)
        print(f"{args.path}: {split.champion} now answers every request", flush=True)
        return 0
    if args.address:
        raise ConfigError("--address is for serve promote|rollback; serve PATH joins RAY_ADDRESS or a local Ray")
    serve_cfg = load_config(args.config, args.overrides).serve if args.config else ServeConfig()
    if args.quantize:
        serve_cfg = replace(serve_cfg, quantize=args.quantize)
    flags = {k: getattr(args, k) for k in CANARY_FLAGS if getattr(args, k) is not None}
    if args.metrics_port is not None:  # validated as the config key is: serve.metrics_port, 1..65535
        flags["metrics_port"] = args.metrics_port
    if flags:
        # The flags go through the same validation as the YAML serve: section (ranges, header name).
        serve_cfg = serve_config_from_dict({**asdict(serve_cfg), **flags})
    try:
        start_serve(args.path, host=args.host, port=args.port, serve_config=serve_cfg, blocking=True,
                    ingress=args.ingress)
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


STALE_EXIT = 1
"""``registry status``'s exit status when a version is stale (a scheduler retrains on it); 2 is an error."""


def _cmd_registry(args: argparse.Namespace) -> int:
    from distill_ray.registry import store

    uri = store.tracking_uri_for(args.run_root, args.tracking_uri)
    return _REGISTRY_COMMANDS[args.registry_command](args, uri, store)


def _registry_register(args, uri, store) -> int:
    from distill_ray.serving.model import resolve_student_dir

    student_dir = resolve_student_dir(args.path)
    version = store.register(student_dir, args.name, tracking_uri=uri, alias=args.alias or "auto")
    aliases = store.get_version(args.name, version, uri).aliases
    print(f"registered {student_dir} as models:/{args.name}/{version}" + (f" ({', '.join(aliases)})" if aliases else ""))
    return 0


def _registry_list(args, uri, store) -> int:
    rows = [("version", "aliases", "metric", "teachers", "data")]
    for v in store.versions(args.name, uri):
        lineage = v.lineage
        teachers = ", ".join(f"{t}={fp[:12]}" for t, fp in sorted(lineage.teacher_fingerprints.items())) or "-"
        rows.append((str(v.version), ",".join(v.aliases) or "-", v.key_metric(), teachers,
                     lineage.data_fingerprint or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def _registry_promote(args, uri, store) -> int:
    old, new = store.promote(args.name, args.version, uri)
    print(f"{args.name}: champion is version {new}" + (f" (was {old}, now alias previous)" if old else ""))
    return 0


def _registry_rollback(args, uri, store) -> int:
    old, new = store.rollback(args.name, uri)
    print(f"{args.name}: champion is version {new} again (version {old} is now alias previous)")
    return 0


def _registry_import(args, uri, store) -> int:
    from distill_ray.registry.legacy import import_file_registry

    numbers = import_file_registry(args.path, args.name, uri)
    name = args.name or Path(args.path).name
    champion = [v for v in store.versions(name, uri) if v.version in numbers and v.aliases]
    print(f"imported {len(numbers)} versions of {args.path} as models:/{name}/{numbers[0]}..{numbers[-1]}"
          + (f"; the latest is version {champion[0].version} ({', '.join(champion[0].aliases)})" if champion else ""))
    return 0


def _registry_status(args, uri, store) -> int:
    from distill_ray.registry.drift import fetch_metrics
    from distill_ray.registry.status import registry_status

    text = fetch_metrics(args.metrics_url) if args.metrics_url else None
    found = registry_status(args.name, uri, text, args.drift_threshold, args.min_predictions, args.all)
    for status in found:
        print("\n".join(status.lines()))
    if not found:
        print(f"{args.name}: no version holds an alias; --all checks every version")
    return STALE_EXIT if any(s.stale for s in found) else 0


_REGISTRY_COMMANDS = {"register": _registry_register, "list": _registry_list, "promote": _registry_promote,
                      "rollback": _registry_rollback, "import": _registry_import, "status": _registry_status}


def _add_registry_parser(sub) -> None:
    from distill_ray.config import RegistryConfig

    p = sub.add_parser("registry", help="students in MLflow's Model Registry: register, list, promote, rollback, "
                                        "import a 0.2 file registry, status (stale versions; exit 1)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///RUN_ROOT/mlflow.db)")
    p.add_argument("--run-root", default="runs", help="RUN_ROOT of the default store (a config's run_dir; default runs)")
    rsub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    r = rsub.add_parser("register", help="register a run's student (champion if first, else challenger)")
    r.add_argument("path", help="a run directory (its config, metrics and lineage are recorded) or a student directory")
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument("--alias", default=None, help="set this alias instead of champion/challenger")
    r = rsub.add_parser("list", help="versions with aliases, key metric, teacher and data fingerprints")
    r.add_argument("name")
    r = rsub.add_parser("promote", help="champion -> the challenger (or VERSION); the old champion becomes previous")
    r.add_argument("name")
    r.add_argument("version", nargs="?", type=int, default=None)
    r = rsub.add_parser("rollback", help="swap champion and previous")
    r.add_argument("name")
    r = rsub.add_parser("import", help="move a 0.2 file registry entry (registry/NAME) into MLflow, in order; "
                                       "its latest becomes champion")
    r.add_argument("path", help="the entry directory, registry/NAME")
    r.add_argument("--name", default=None, help="registered model name (default: the entry's directory name)")
    r = rsub.add_parser("status", help="flag versions whose teachers or data changed, or whose served class mix "
                                       "drifted; exit 1 when one is stale")
    r.add_argument("name")
    r.add_argument("--metrics-url", default=None,
                   help="Prometheus endpoint of the serving cluster (Ray's metrics export, e.g. http://127.0.0.1:8080/metrics)")
    r.add_argument("--drift-threshold", type=float, default=RegistryConfig.drift_threshold,
                   help="total variation distance above which the served class mix is drift (default %(default)s)")
    r.add_argument("--min-predictions", type=int, default=RegistryConfig.drift_min_predictions,
                   help="predictions needed before drift is judged (default %(default)s)")
    r.add_argument("--all", action="store_true", help="every version, not only those holding an alias")
    p.set_defaults(func=_cmd_registry)


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

    p = sub.add_parser("serve", help="serve a student over HTTP with Ray Serve (binds 127.0.0.1 unless told); "
                                     "`serve promote` / `serve rollback` end a running canary")
    p.add_argument("path", help="a run directory, a student directory, a registered version (models:/NAME@champion, "
                                "models:/NAME/3); or "
                                "promote (the challenger takes all traffic) or rollback (the champion does)")
    p.add_argument("--challenger", default=None, metavar="PATH",
                   help="canary / A/B test: a second student answering --challenger-fraction of the requests")
    p.add_argument("--challenger-fraction", type=float, default=None, metavar="F",
                   help="share of requests for the challenger, in [0, 1] (default: serve.challenger_fraction, 0)")
    p.add_argument("--sticky-header", default=None, metavar="NAME",
                   help="request header whose value pins a client to one version (default: X-Distill-Key)")
    p.add_argument("--address", default=None, help="with promote/rollback: the Ray cluster running the app "
                                                   "(default: auto, the one on this machine)")
    p.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port, 8000)")
    p.add_argument("--config", default=None, help="experiment YAML whose serve: section sets batching and limits")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (with --config), e.g. --set serve.max_batch_size=64")
    p.add_argument("--quantize", choices=QUANTIZE_KINDS, default=None,
                   help="dynamic int8 quantization of the student's linear layers at load")
    p.add_argument("--ingress", choices=("proxy", "haproxy"), default="proxy",
                   help="what answers HTTP: Ray Serve's proxy (default) or HAProxy in front of the replicas "
                        "(faster; its stats and metrics ports listen on every interface)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus port of the Ray this command starts (default: serve.metrics_port, 8081)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("eval", help="score a student (run dir, student dir or registry entry) on a config's data: "
                       "accuracy and ECE, or perplexity for a causal LM")
    p.add_argument("path", help="a run directory, a student directory, or a registered version (models:/NAME@champion, models:/NAME/3)")
    p.add_argument("--data", required=True, metavar="CONFIG", help="experiment YAML whose data: section to score on")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.max_eval_samples=1000")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_cmd_eval)

    _add_registry_parser(sub)

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
