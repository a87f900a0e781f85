# The two commands of the README. Both create .venv (if needed) and install the project into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench-perf

$(BIN)/bench: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(BIN)/bench

# the example plugin (examples/plugin), installed as a user installs one: its entry points are what
# tests/test_plugin.py and `bench check` exercise
PLUGIN_STAMP := $(VENV)/.example-plugin-installed
$(PLUGIN_STAMP): $(BIN)/bench examples/plugin/pyproject.toml
	$(BIN)/pip install -q -e examples/plugin
	@touch $(PLUGIN_STAMP)

demo: $(BIN)/bench        ## the quick suite over all three tasks: local executor, offline data, report at the end
	$(BIN)/bench run experiments/grids/quick.yaml

test: $(BIN)/bench $(PLUGIN_STAMP)  ## lint, the whole test suite (SLURM tests run when the cluster is up), the regression check
	$(BIN)/ruff check bench tricks experiments tests examples
	$(BIN)/python -m pytest -q
	$(BIN)/bench check --no-progress

lint: $(BIN)/bench
	$(BIN)/ruff check bench tricks experiments tests examples
	$(BIN)/ruff format --check bench tricks experiments tests examples
