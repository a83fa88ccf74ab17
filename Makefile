# Two entry points: `make demo` (the main job) and `make test` (the fast suite, <= 5 min).
# `make test-all` runs every test, the long ones behind the `slow` marker too; `make test-slow`
# runs only those but the whole-preset rehearsals, `make rehearse-presets` only those (CI runs
# `make test` then `make test-slow`: each test once; the rehearsals of every preset, ~1 h 35 min
# here, do not fit its time).
# Each creates .venv from the pinned requirements on first use. `make test` runs the fast suite on
# TEST_WORKERS processes (pytest-xdist; 0 runs it in one process); the slow tests run one at a time
# (most start several processes of their own: two at a time, they take longer, not shorter).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.distillab-installed
TEST_WORKERS ?= 2

.PHONY: demo test test-all test-slow rehearse-presets bench clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# byte-compiled on every core (pip compiles on one: 87 s -> 67 s for the whole install here); as under
	@# pip, the few files of dependencies that do not compile on this Python are left as they are
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distillab demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not presets" $(ARGS)

rehearse-presets: $(STAMP)
	$(BIN)/python -m pytest -m presets --durations=0 $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_benchmarks.py

clean-venv:
	rm -rf $(VENV)
