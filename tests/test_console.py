"""The driver's live progress line, fed by the file a Ray Train rank rewrites."""

import io
import time

from distill_ray.console import RunProgress, write_progress


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
