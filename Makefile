# `make test` is the one command that sets everything up and runs the test suite (CI runs exactly this).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.critnet-installed

.PHONY: install test bench clean

install: $(STAMP)

# --no-compile: byte-compiling every module of torch's wheels took about as long as unpacking them; Python
# compiles the modules a run imports, once, on first import.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e ".[test]"
	touch $(STAMP)

# Two workers on the 2-core CI machine, one per core (every test runs one intra-op thread); whole files go to one
# worker so that module-scoped fixtures are built once (tests/conftest.py shares the session-scoped launches).
WORKERS ?= auto

test: install
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile

bench: install
	$(BIN)/python bench/ranking.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
