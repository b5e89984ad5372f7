# Two commands do everything on a fresh machine: `make demo` and `make test` (the whole suite, as CI runs it).
# `make test-fast` leaves out the tests marked integration; `make lint` runs the checkers (CI runs it before the tests).
# Both create .venv in the repo (or VENV=<path>) and install every version pinned by constraints.txt: torch 2.14.1 with
# its torchvision (~5.5 GB), the package with its dev and rewards extras, then hpsv2 and image-reward without their
# stale pins (--no-deps) and the BPE vocabulary hpsv2's wheel lacks.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed
PYTEST := $(VENV)/bin/python -m pytest -q -p no:cacheprovider
PY_SOURCES := didr tests examples benchmarks

.PHONY: setup demo demo-study demo-pipeline test test-fast lint lint-ruff lint-snakefmt lint-mypy clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch torchvision
	$(PIP) -e '.[dev,rewards]'
	$(PIP) --no-deps hpsv2 image-reward
	$(VENV)/bin/python -c 'from didr.rewards.hps import install_vocabulary; install_vocabulary()'
	touch $(STAMP)

setup: $(STAMP)

# The closed-form study (one thread; its progress in logs/closed_form_study.log, its table printed at the end) side by
# side with the whole DAG on the embedded default (params.yaml), whose teacher then takes one thread, not two; then
# the HTML report and the stage times. `python benchmarks/demo_time.py` times all of it from nothing.
demo: $(STAMP)
	$(MAKE) --no-print-directory -j2 demo-study demo-pipeline
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH snakemake --report reports/report.html
	cat reports/closed_form_study.md
	$(VENV)/bin/python benchmarks/pipeline_times.py --experiment embedded

demo-study: $(STAMP)
	mkdir -p logs
	$(VENV)/bin/didr demo > logs/closed_form_study.log

demo-pipeline: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH snakemake all --cores all --set-threads teacher=1

# Each checker is one lint-* target listed here (`snakemake --lint` runs in the suite, tests/test_workflow.py).
lint: lint-ruff lint-snakefmt lint-mypy

lint-ruff: $(STAMP)
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)

# Settings in pyproject.toml's [tool.snakefmt].
lint-snakefmt: $(STAMP)
	$(VENV)/bin/snakefmt --check workflow Snakefile

# Settings in pyproject.toml's [tool.mypy]: the package, didr/.
lint-mypy: $(STAMP)
	$(VENV)/bin/mypy

# The whole suite (its 30 slowest tests listed at the end), about 25 minutes on 2 cores. Where SLURM is not
# installed the SLURM tests skip, saying so, unless DIDR_INSTALL_SLURM=1 (or DIDR_REQUIRE_SLURM=1, as CI sets) has
# them install it with apt-get.
test: $(STAMP)
	$(PYTEST) --durations=30

# All but the integration tests (the pipeline in subprocesses: Snakemake, DVC, SLURM, the launcher; package-built or
# full-size models; the README example).
test-fast: $(STAMP)
	$(PYTEST) -m "not integration"

clean:
	rm -rf $(VENV) build *.egg-info
