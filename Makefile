# deepfeat: `make demo`, `make test` (the fast tier: tests not marked slow) and `make test-all`
# (every test) each set up the virtual environment and run.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deepfeat-installed
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: all venv demo test test-all bench clean lint

all: test

# torch and torchvision come from this machine's disk (pinned releases); everything
# else from PyPI. The stamp is refreshed when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
