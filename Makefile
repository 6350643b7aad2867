# Quick start: `make demo` runs the offline demo, `make test` runs the suite.
# Both create (or refresh, when pyproject.toml changes) the virtual
# environment in .venv; a second run installs nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flatjax-installed

.PHONY: demo test lint docs bench results clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flatjax demo

lint: $(STAMP)
	$(VENV)/bin/ruff check flatjax tests experiments

test: lint
	$(PY) -m pytest -q -n 2 --durations=15

# The API reference from the docstrings, offline; any warning fails the build.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html -d build/docs/.doctrees docs/api build/docs
	@echo "API reference: build/docs/index.html"

# The target table of experiments/benchmarks/README.md (about 12 min on 2 CPU
# cores): writes experiments/benchmarks/results/targets.json and rewrites the
# table; `$(PY) -m experiments.benchmarks.run --full` runs every older study too.
bench: $(STAMP)
	$(PY) -m experiments.benchmarks.run

results: $(STAMP)
	$(PY) -m experiments.study

clean:
	rm -rf $(VENV) runs build
