"""Optional dependencies (pyproject.toml's extras): nothing imports them when the package is imported,
and a path that needs a missing one names the extra to install. No Ray."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from distill_ray.extras import EXTRAS, MissingExtra, require

REPO = Path(__file__).resolve().parents[1]


def test_every_extra_named_in_errors_is_declared_and_all_holds_them():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras)
    # check: jobs/make_check_data.py's readers (`make check-data`), outside `all` on purpose
    assert extras["all"] == [f"distill-ray[{','.join(k for k in extras if k not in ('all', 'dev', 'check'))}]"]


def test_importing_every_module_needs_no_extra():
    blocked = list(EXTRAS)
    package = REPO / "distill_ray"
    modules = sorted(".".join(("distill_ray", *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
                     for p in package.rglob("*.py") if p.stem != "__main__")
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            f"for m in {modules!r}: __import__(m)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtra, match=r"reading GGUF needs the gguf package: pip install 'distill-ray\[lm\]'"):
        require("gguf", "reading GGUF")


def test_a_sweep_without_wandb_says_so_before_any_work(monkeypatch):
    from distill_ray.config import ConfigError, load_config
    from distill_ray.tune.sweep import check_tracking

    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml")
    with pytest.raises(ConfigError, match=r"distill-ray\[wandb\].*tracking.wandb=disabled"):
        check_tracking(cfg)
    check_tracking(load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["tracking.wandb=disabled"]))
