"""The driver's live progress line, fed by the file a Ray Train rank rewrites."""

import io
import time
from pathlib import Path

from distill_ray.console import RunProgress, write_progress

REPO = Path(__file__).resolve().parents[1]


def test_run_progress_draws_what_rank_zero_last_wrote(tmp_path):
    path, out = tmp_path / "progress.json", io.StringIO()
    with RunProgress(path, "student", poll_s=0.02, file=out):
        write_progress(str(path), step=30, total=120, epoch=2, loss=0.5)
        time.sleep(0.2)
        write_progress(str(path), step=60, total=120, epoch=3, loss=0.25, val_accuracy=0.81)
        time.sleep(0.2)
    text = out.getvalue()
    assert "student" in text and "30/120" in text and "60/120" in text and "val_accuracy=0.81" in text
    assert not (tmp_path / "progress.json.tmp").exists()  # replaced atomically


def test_a_missing_or_half_written_file_is_skipped(tmp_path):
    path, out = tmp_path / "progress.json", io.StringIO()
    with RunProgress(path, "baseline", poll_s=0.02, file=out):
        time.sleep(0.1)
        path.write_text("{not json")
        time.sleep(0.1)
    write_progress(None, step=1)  # no file configured: nothing written, no error
    assert "baseline: 0step" in out.getvalue()  # no step count was ever read


def test_native_stderr_goes_to_a_file_while_python_stderr_stays_on_the_terminal(tmp_path):
    """Ray's C++ core worker writes to file descriptor 2; on a terminal that goes to a log file,
    while sys.stderr (progress lines, warnings, logging handlers) still reaches the terminal."""
    import os
    import pty
    import subprocess
    import sys

    log = tmp_path / "native.err"
    code = f"""
import logging, os, sys
from distill_ray.console import native_stderr_to
handler = logging.StreamHandler()  # captured the old sys.stderr
logging.getLogger("probe").addHandler(handler)
assert native_stderr_to({str(log)!r}) and not native_stderr_to({str(log)!r})
os.write(2, b"native chatter\\n")
print("python line", file=sys.stderr, flush=True)
logging.getLogger("probe").warning("logged warning")
"""
    master, slave = pty.openpty()
    proc = subprocess.run([sys.executable, "-c", code], stderr=slave, stdout=subprocess.DEVNULL,
                          cwd=REPO, timeout=120)
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    assert proc.returncode == 0, terminal.decode()
    assert b"python line" in terminal and b"logged warning" in terminal
    assert b"native chatter" not in terminal
    assert log.read_text() == "native chatter\n"


def test_ray_datas_wrapped_memory_advice_leaves_the_terminal_and_errors_stay(tmp_path):
    """The issue detector's advice, as Ray 2.60 wraps it, is a routine notice (to the log file only);
    a real warning still reaches the terminal's handler."""
    import io
    import logging

    from distill_ray.console import quiet_ray_loggers

    logger, terminal = logging.getLogger("ray.data"), io.StringIO()
    handler = logging.StreamHandler(terminal)
    logger.addHandler(handler)
    try:
        quiet_ray_loggers()
        logger.warning("\n\nOperator\n'MapBatches(_rows)->MapBatches(TeacherColumns)'\nuses 3.0GiB of memory per "
                       "worker on average (up to 3.1GiB), but Ray\nonly requests 0.0B per worker at the start of "
                       "the pipeline.\n\nTo avoid out-of-memory errors, consider setting `memory=4150579200`")
        logger.warning("Failed to read shard-00001.parquet")
    finally:
        logger.removeHandler(handler)
    assert terminal.getvalue() == "Failed to read shard-00001.parquet\n"
