# metabench: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The virtualenv is (re)built when the pins or the learn2learn build recipe change.
PIN_HASH := $(shell cat requirements.txt scripts/install_learn2learn.sh | sha1sum | cut -c1-12)
STAMP := $(VENV)/.metabench-$(PIN_HASH)

export METABENCH_DATA ?= $(CURDIR)/data
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

SUITE ?= quick
ALGOS ?=
RESULTS ?= leaderboard/records
PYTEST_ARGS ?=

.PHONY: help venv test bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: SUITE=$(SUITE) ALGOS=<a,b> RESULTS=$(RESULTS) METABENCH_DATA=$(METABENCH_DATA)"

$(STAMP): requirements.txt scripts/install_learn2learn.sh
	rm -f $(VENV)/.metabench-*
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements.txt
	bash scripts/install_learn2learn.sh $(VENV) > $(VENV)/learn2learn-build.log 2>&1 \
		|| { tail -40 $(VENV)/learn2learn-build.log; exit 1; }
	touch $@

venv: $(STAMP)  ## create or refresh the project virtualenv (.venv)

test: $(STAMP)  ## run the test suite (CPU, tiny budgets, real data)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)  ## run a suite (SUITE=quick, ALGOS=protonet,maml), write records, print the table
	$(PY) -m bench suite $(SUITE) --results $(RESULTS) $(if $(ALGOS),--algorithms $(ALGOS))

clean:  ## remove caches and scratch outputs (keeps .venv and committed records)
	rm -rf .cache results lightning_logs wandb .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
