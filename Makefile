# `make demo` runs the main job, `make test` runs the whole suite, `make test-fast` the unit
# tier (no jail, no training, no service: tests/tiers.py), `make lint` runs ruff and checks the
# import contracts in pyproject.toml (lint-imports).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_ALLOW_FILE_STORE := true
# Bytecode is cached even where the environment says not to write it: otherwise every pytest
# worker compiles and assertion-rewrites every test module again (about 3 s of CPU each).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-main test-slurm test-fast lint install

install: $(STAMP)

# uv installs what pip would (the same versions, measured) in 32-36 s instead of 89 s, byte-
# code compiled as pip does it (a jail's read-only venv cannot cache it). torch goes in first
# and pinned, from the wheels pip is configured to find on disk (the CPU build) instead of a
# CUDA build; uv reads no pip.conf, so those folders are passed on.
UV         := $(VENV)/bin/uv
FIND_LINKS  = $(or $(PIP_FIND_LINKS),$(shell python3 -m pip config get global.find-links 2>/dev/null))
UV_INSTALL  = $(UV) pip install -q --compile-bytecode --python $(PY) \
              $(foreach folder,$(FIND_LINKS),--find-links $(folder))
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(UV_INSTALL) torch==2.13.0
	$(UV_INSTALL) -e '.[dev]'
	touch $@

# DEMO=smoke: the same steps sized to a minute or two (CI runs it on a fresh clone).
DEMO ?= full
demo: $(STAMP)
	$(PY) -m runner.demo $(DEMO)

# The suite: the xdist workers (--dist loadgroup keeps the smoke demo's browser tests on one)
# and, beside them, the SLURM tests in a session of their own, on the one-node cluster: they
# mostly wait on it (68 CPU-s in 183 s alone), so they fill the CPU the workers leave instead
# of adding minutes after them. Each tier's output comes whole when it ends. Nothing is
# deselected: `test-main` and `test-slurm` run one tier each.
WORKERS ?= 3
test: $(STAMP)
	$(MAKE) --no-print-directory -j2 --output-sync=target test-main test-slurm

test-main: $(STAMP)
	$(PY) -m pytest -q -ra --durations=30 -n $(WORKERS) --dist loadgroup -m "not slurm"

test-slurm: $(STAMP)
	$(PY) -m pytest -q -ra --durations=10 -m slurm

# The unit tier: no jail, no training, no service (tests/tiers.py says what each marker means).
FAST := not (slow or sandbox or train or postgres or slurm or browser or mlflow_server)
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra --durations=10 -m "$(FAST)" -n $(WORKERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
