# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv in the repo (or VENV=<path>) and install every version pinned by constraints.txt: torch 2.14.1 with
# its torchvision (~5.5 GB), the package with its dev and rewards extras, then hpsv2 and image-reward without their
# stale pins (--no-deps) and the BPE vocabulary hpsv2's wheel lacks.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch torchvision
	$(PIP) -e '.[dev,rewards]'
	$(PIP) --no-deps hpsv2 image-reward
	$(VENV)/bin/python -c 'from didr.rewards.hps import install_vocabulary; install_vocabulary()'
	touch $(STAMP)

setup: $(STAMP)

# The closed-form study, then the whole DAG on the embedded default (params.yaml), its HTML report and stage times.
demo: $(STAMP)
	$(VENV)/bin/didr demo
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH snakemake --cores all all
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH snakemake --report reports/report.html
	$(VENV)/bin/python benchmarks/pipeline_times.py --experiment embedded

lint: $(STAMP)
	$(VENV)/bin/ruff check didr tests examples benchmarks
	$(VENV)/bin/ruff format --check didr tests examples benchmarks

test: lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
