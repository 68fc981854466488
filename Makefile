# `make test` is the one command that sets everything up and runs the test suite (CI runs exactly this).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.critnet-installed

.PHONY: install test wheel-check docs bench clean

comma := ,
# The tests cover the Hugging Face family (transformers), and the docs extra (MkDocs) once the project has a site.
EXTRAS := test$(comma)transformers$(if $(wildcard mkdocs.yml),$(comma)docs)

install: $(STAMP)

# --no-compile: byte-compiling every module of torch's wheels took about as long as unpacking them; Python
# compiles the modules a run imports, once, on first import.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The architecture's import contracts first (pyproject.toml, [tool.importlinter]), then the tests.
# Two workers on the 2-core CI machine, one per core (every test runs one intra-op thread); whole files go to one
# worker so that module-scoped fixtures are built once (tests/conftest.py shares the session-scoped launches).
WORKERS ?= auto

test: install
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile

# The built wheel, installed into a fresh environment outside the checkout: `critnet validate -c resnet20_cifar10`
# on the whole shared test split and the documentation's Python example, run from other folders (.ci/wheel_check.py).
wheel-check: install
	$(BIN)/python .ci/wheel_check.py

# The documentation site, warnings as errors, into build/site (ignored by git); a venv made before mkdocs.yml
# existed gets the docs extra here.
docs: install
ifneq ($(wildcard mkdocs.yml),)
	test -x $(BIN)/mkdocs || $(BIN)/python -m pip install --quiet --no-compile -e ".[$(EXTRAS)]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site
else
	@echo "docs: no mkdocs.yml, no site to build"
endif

bench: install
	$(BIN)/python bench/ranking.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
