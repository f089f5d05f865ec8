"""What a sweep prints: one line per trial result and per failed trial on the terminal, while Ray
Tune's own status tables and tracebacks go to the sweep's log (all of it on the terminal with ``-v``)."""

from __future__ import annotations

import contextlib
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from distill_ray.config import ExperimentConfig
from distill_ray.console import is_verbose
from distill_ray.tune.space import SearchSpace


def trial_lines(cfg: ExperimentConfig, space: SearchSpace):
    """A Tune callback printing one line per trial result (epoch reports only) and per failed trial to the
    terminal (``_terminal``: Tune's own tables go to the sweep's log meanwhile, ``tune_output``)."""
    from ray import tune

    keys = [k for k, _, _ in space.params]
    metric, epochs = cfg.tune.metric, cfg.train.epochs

    def values(trial) -> str:
        return " ".join(f"{k}={_short(trial.config.get(k))}" for k in keys)

    class TrialLines(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("kind", "epoch") == "epoch" and metric in result:
                print(f"tune: trial {trial.trial_id} epoch {result.get('epoch')}/{epochs} "
                      f"{metric} {result[metric]:.4f}  {values(trial)}", file=_terminal(), flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"tune: trial {trial.trial_id} failed ({values(trial)}): {_error_line(trial)}", file=_terminal(),
                  flush=True)

    return TrialLines()


def _short(value) -> str:
    value = getattr(value, "item", lambda: value)()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _error_line(trial) -> str:
    """The last line of the trial's error file (the exception and its message), else where to look."""
    try:
        lines = [line.strip() for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):  # no error file (yet)
        lines = []
    return lines[-1] if lines else f"see {trial.path or 'the sweep directory'}"


_TERMINAL: dict = {}  # the stream stdout was before tune_output redirected it (a callback must stay picklable)


def _terminal():
    return _TERMINAL.get("stream") or sys.stdout


@contextmanager
def tune_output(log: Path):
    """Tune's status tables and its error tracebacks go to ``log`` (the terminal reads one line per
    trial result, ``trial_lines``, and the final table); with ``-v``, to the terminal as well."""
    if is_verbose():
        yield
        return
    tune_logger = logging.getLogger("ray.tune")
    _TERMINAL["stream"] = sys.stdout
    with log.open("a") as stream, contextlib.redirect_stdout(stream):
        handler = logging.StreamHandler(stream)
        propagate = tune_logger.propagate
        tune_logger.addHandler(handler)
        tune_logger.propagate = False
        try:
            yield
        finally:
            tune_logger.removeHandler(handler)
            tune_logger.propagate = propagate
            _TERMINAL.clear()
