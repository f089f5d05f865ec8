"""What the terminal shows: our phase lines and final tables; Ray's own chatter goes to files.

Without ``--verbose``, worker output stays in Ray's session logs (``log_to_driver=False``: no tqdm
lines from tasks, no per-checkpoint reports, no placement-group cleaner retries) and the driver-side
Ray loggers write INFO to ``RUN_DIR/logs/driver.log`` while the terminal keeps their warnings.
``RUN_DIR/logs/ray`` links to the local Ray session's logs (every worker's stdout and stderr).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
_state = {"verbose": False}


def set_verbose(verbose: bool) -> None:
    """Set once by the CLI (``-v``); read by ``connect_ray`` and the loggers below."""
    _state["verbose"] = verbose
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")  # no per-trial W&B run summaries in a sweep


def is_verbose() -> bool:
    return _state["verbose"]


# Notices that say how Ray works, not what went wrong for the user: to the log file, not the terminal.
ROUTINE_NOTICES = ("Progress bars disabled", "worker processes have been started on node",
                   "Token authentication is enabled",
                   # Ray Data's issue detectors: memory advice for actors whose size Ray was not told
                   "Ray only requests", "To disable issue detection")


class _NotRoutine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # Ray Data wraps its issue detectors' messages at ~70 columns ("but Ray\nonly requests").
        message = " ".join(record.getMessage().split())
        return not any(notice in message for notice in ROUTINE_NOTICES)


def quiet_ray_loggers() -> None:
    """The driver's Ray loggers show warnings and errors only (everything, with ``--verbose``); they
    keep INFO for ``RUN_DIR/logs/driver.log``. The raylet's worker-pool notices (many workers start
    at once when actors take fractions of a CPU, as here by design) go to the log too."""
    if is_verbose():
        return
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
                if not any(isinstance(f, _NotRoutine) for f in handler.filters):
                    handler.addFilter(_NotRoutine())
    import ray._private.worker as ray_worker

    printed = ray_worker.print_to_stdstream
    if getattr(printed, "routes_routine_notices", False):
        return

    def print_or_log(data, ignore_prefix: bool):
        # The driver prints raylet notices through this function whatever log_to_driver says.
        if data.get("pid") == "raylet" and any(n in line for line in data.get("lines", ()) for n in ROUTINE_NOTICES):
            for line in data["lines"]:
                logging.getLogger("ray").info("raylet: %s", line)
            return
        printed(data, ignore_prefix)

    print_or_log.routes_routine_notices = True
    ray_worker.print_to_stdstream = print_or_log


def native_stderr_to(path: Path) -> bool:
    """Send what native code writes to this process's stderr (Ray's C++ core worker: e.g. "Actor ...
    has constructor arguments in the object store" once per teacher pool) to ``path``, while Python's
    ``sys.stderr`` (our progress lines, warnings, tracebacks) stays on the terminal. Only for an
    interactive terminal without ``--verbose``, once per process; returns whether it redirected.
    (C++ writes to file descriptor 2 directly, which no logging setting reaches.)"""
    if is_verbose() or _state.get("native_stderr") or not sys.stderr.isatty():
        return False
    old = sys.stderr
    old.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = terminal
    # Handlers that captured the old stderr object (it writes to descriptor 2, now the file) follow.
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(terminal)
    _state["native_stderr"] = str(path)
    return True


def quiet_transformers() -> None:
    """transformers' own bars ("Loading weights ...", one per model the driver loads to score it) stay
    off the terminal unless ``--verbose``."""
    if is_verbose():
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the text and lm extras are optional
        return
    hf_logging.disable_progress_bar()


def log_to_run_dir(run_dir: Path) -> Path:
    """Ray's driver-side log records (INFO and up) into ``run_dir/logs/driver.log``; a link to the
    local Ray session's worker logs beside it. Returns the logs directory."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    target = str(logs / "driver.log")
    handler = logging.FileHandler(target)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if name != "ray" and logger.propagate:
            continue  # its records reach the "ray" logger's handlers already
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == target for h in logger.handlers):
            logger.addHandler(handler)
            logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    try:
        import ray

        session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        link = logs / "ray"
        if session.is_dir() and not link.exists():
            link.symlink_to(session, target_is_directory=True)
    except Exception:  # joined a remote cluster: its logs live there (`ray logs`), nothing to link
        pass
    return logs


class RunProgress:
    """One live progress bar on the driver for a Ray Train run, fed by the file its rank 0 rewrites
    every few steps (``write_progress``; the file lives in the run's storage, which every node of a
    cluster shares). A thread polls the file while ``trainer.fit()`` blocks; tqdm draws nothing when
    stderr is not a terminal (logs, CI), so those get only the start and summary lines."""

    def __init__(self, path: Path, desc: str, poll_s: float = 0.5, file=None):
        import threading

        self.path, self.desc, self.poll_s, self.file = Path(path), desc, poll_s, file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RunProgress":
        self.path.unlink(missing_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import json

        from tqdm.auto import tqdm

        # disable=None: off when the output is not a terminal; a given file is always drawn to.
        with tqdm(desc=self.desc, unit="step", disable=None if self.file is None else False, leave=False,
                  dynamic_ncols=True, file=self.file) as bar:
            while not self._stop.wait(self.poll_s):
                try:
                    state = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    continue
                bar.total = state.get("total")
                bar.n = state.get("step", 0)
                bar.set_postfix({k: v for k, v in state.items() if k not in ("step", "total")}, refresh=False)
                bar.refresh()


def write_progress(path: str | None, **state) -> None:
    """Rank 0's side of ``RunProgress``: the latest step, total and a few figures, replaced atomically."""
    if not path:
        return
    import json

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)
