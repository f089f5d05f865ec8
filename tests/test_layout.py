"""The package's layout is its architecture: subpackages named by their job, a few modules at the top,
the pure ones importable without Ray, and a sweep saved before the layout existed refused with what to
do. No Ray is started here."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "distill_ray"

SUBPACKAGES = {"kd", "data", "teachers", "cache", "train", "lm", "evaluation", "tune", "serving", "registry"}
TOP_LEVEL_MODULES = {"__init__", "__main__", "cli", "config", "pipeline", "models", "console", "extras"}

# Modules that say "No Ray" (or "pure") and keep their word: importing them must not import Ray, so
# tests, the Serve replica's request handling and anything numeric run without a Ray install's cost.
PURE = ["distill_ray.kd", *(f"distill_ray.kd.{p.stem}" for p in sorted((PACKAGE / "kd").glob("*.py"))
                            if p.stem != "__init__"),
        "distill_ray.lm.sequence_kd", "distill_ray.lm.generation", "distill_ray.evaluation.metrics",
        "distill_ray.evaluation.verdict", "distill_ray.evaluation.report", "distill_ray.data.transfer",
        "distill_ray.data.chat", "distill_ray.data.rows", "distill_ray.data.preprocess", "distill_ray.data.bundled",
        "distill_ray.cache.files", "distill_ray.cache.topk_encoding", "distill_ray.teachers.recipes",
        "distill_ray.teachers.token_alignment", "distill_ray.teachers.cross_tokenizer", "distill_ray.serving.model",
        "distill_ray.serving.metrics", "distill_ray.serving.schemas", "distill_ray.serving.options", "distill_ray.serving.canary", "distill_ray.serving",
        "distill_ray.models", "distill_ray.config", "distill_ray.registry", "distill_ray.registry.drift"]


def test_the_pure_modules_import_without_ray():
    """One interpreter imports them in turn (a process per module took 1.5-3 s each) and names the
    first that brought Ray in: the ones before it did not."""
    code = ("import importlib, sys\n"
            f"for module in {PURE!r}:\n"
            "    importlib.import_module(module)\n"
            "    ray = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "    assert not ray, f'importing {module} imported Ray: {ray[:5]}'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_top_level_holds_only_the_subpackages_and_the_allowed_modules():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert modules == TOP_LEVEL_MODULES, (
        f"distill_ray/ grows flat again: {sorted(modules - TOP_LEVEL_MODULES)} belong in a subpackage "
        f"({', '.join(sorted(SUBPACKAGES))}); missing: {sorted(TOP_LEVEL_MODULES - modules)}")
    assert folders == SUBPACKAGES, f"unexpected: {sorted(folders - SUBPACKAGES)}, missing: {sorted(SUBPACKAGES - folders)}"
    for name in sorted(SUBPACKAGES):
        assert (PACKAGE / name / "__init__.py").is_file(), f"distill_ray/{name}/ is not a package"
        assert not [p for p in (PACKAGE / name).iterdir() if p.is_dir() and p.name != "__pycache__"], \
            f"distill_ray/{name}/ nests a package: keep one level"


def test_every_subpackage_says_what_it_does_and_names_each_module():
    import ast

    for name in sorted(SUBPACKAGES):
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        assert doc, f"distill_ray/{name}/__init__.py has no docstring"
        for module in sorted(p.stem for p in (PACKAGE / name).glob("*.py") if p.stem != "__init__"):
            assert f"``{module}``" in doc, f"distill_ray/{name}/__init__.py does not list {module}"


def _global_pickle(module: str, name: str) -> bytes:
    """A pickle whose loading imports ``module`` and takes ``name`` from it (the GLOBAL opcode)."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."


@pytest.mark.parametrize("module, name", [
    ("distill_ray.tune", "_actor_dead"),       # now a package without that name: AttributeError
    ("distill_ray.tune_pbt", "ClampToSpace"),  # gone: ModuleNotFoundError
])
def test_a_sweep_saved_before_the_subpackages_is_refused_before_any_work(tmp_path, monkeypatch, module, name):
    from distill_ray.config import ConfigError, dump_config, load_config
    from distill_ray.tune.sweep import resume_sweep

    if module != "distill_ray.tune":  # gone, even where an older checkout is installed beside this one
        monkeypatch.setitem(sys.modules, module, None)

    sweep = tmp_path / "old"
    (sweep / "trials").mkdir(parents=True)
    cfg = load_config(REPO / "jobs/configs/tiny.yaml", ["tracking.wandb=disabled"])
    (sweep / "config.yaml").write_text(dump_config(cfg))
    (sweep / "space.yaml").write_text((REPO / "tune_spaces/kd_basic.yaml").read_text())
    (sweep / "trials" / "tuner.pkl").write_bytes(_global_pickle(module, name))
    with pytest.raises(ConfigError, match=rf"saved by distill-ray before 0\.2 .*{module}.*cannot resume: start it again"):
        resume_sweep(sweep)


def test_a_sweep_saved_after_the_move_passes_the_check(tmp_path):
    from distill_ray.tune.sweep import check_resumable

    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "tuner.pkl").write_bytes(_global_pickle("distill_ray.tune.pbt", "ClampToSpace"))
    check_resumable(tmp_path)
    # and an unpickling error that names no old module is not hidden behind the message
    (tmp_path / "trials" / "tuner.pkl").write_bytes(_global_pickle("no_such_module_here", "x"))
    with pytest.raises(ModuleNotFoundError):
        check_resumable(tmp_path)
    assert pickle.loads(_global_pickle("distill_ray.tune.pbt", "ClampToSpace")).__name__ == "ClampToSpace"
