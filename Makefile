# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.optorch-installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: demo test lint typecheck pytest soak bench docs clean compat

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build that lies on this machine's disk; then the
# package with its test and demo extras (a range that the installed torch satisfies).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,demo,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m optorch demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

test: lint typecheck docs pytest

# the test suite under another torch release, in a venv of its own under build/ (where
# ruff does not look): `make compat TORCH=2.14.1` (on disk here; others download)
TORCH ?= 2.14.1
compat:
	$(MAKE) pytest VENV=build/venv-torch$(TORCH) TORCH_SPEC=torch==$(TORCH)

bench: $(STAMP)
	$(PY) -m optorch bench

clean:
	rm -rf $(VENV) build dist *.egg-info
