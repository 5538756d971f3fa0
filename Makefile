PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test bench clean

# the venv's own pip (Python 3.11's) installs editable pyproject projects; upgrading it first costs a download
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# --no-compile: the suite imports a fraction of the ~7,000 installed modules; Python compiles those on first import
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(BIN)/usage-agent demo

# two workers per core (pytest-xdist, tests/conftest.py): many tests wait on processes and sockets;
# worksteal keeps every worker busy when a long crash test comes last.
# Bytecode is cached under .venv even where PYTHONDONTWRITEBYTECODE is set: the suite starts the
# CLI as a process over a hundred times, and each would compile every module it imports again.
test: $(STAMP)
	env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=$(CURDIR)/$(VENV)/pycache \
		$(BIN)/python -m pytest -q --numprocesses=auto --dist=worksteal

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
