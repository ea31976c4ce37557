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
SETTINGS ?=
SEEDS ?=
RESULTS ?= leaderboard/records
LEADERBOARD ?= leaderboard
PYTEST_ARGS ?=
# Device pool of `make bench`/`make regress`: GPUS=0,1,2,3 (one run per GPU; empty = every visible GPU,
# none = CPU), DEVICES=N (each run trained with DDP on N devices), WORKERS=N (parallel runs on CPU;
# auto = one one-thread run per core).
GPUS ?=
DEVICES ?= 1
WORKERS ?= auto
FORCE ?=
JUNIT ?=
POOL = --gpus "$(GPUS)" --devices $(DEVICES) --workers $(WORKERS)

.PHONY: help venv test bench leaderboard regress regress-update wandb-sync report clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: SUITE=$(SUITE) ALGOS=<a,b> SETTINGS=<20w1s,..> SEEDS=<0,1,2> RESULTS=$(RESULTS) LEADERBOARD=$(LEADERBOARD) GPUS=<0,1,..|none>"
	@echo "             DEVICES=$(DEVICES) WORKERS=$(WORKERS) FORCE=1 JUNIT=<file.xml> WANDB_MODE=$(WANDB_MODE)"
	@echo "             METABENCH_DATA=$(METABENCH_DATA)"

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

bench: $(STAMP)  ## run a suite's pending runs (SUITE, ALGOS, SETTINGS, SEEDS, GPUS, DEVICES, WORKERS, FORCE), then the leaderboard
	$(PY) -m bench suite $(SUITE) --results $(RESULTS) $(POOL) $(if $(ALGOS),--algorithms $(ALGOS)) \
		$(if $(SETTINGS),--settings $(SETTINGS)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(FORCE),--force); status=$$?; \
	$(PY) -m bench leaderboard --records $(RESULTS) --out $(LEADERBOARD) --wandb-group $(basename $(notdir $(SUITE))); exit $$status

leaderboard: $(STAMP)  ## rebuild leaderboard/README.md, leaderboard.csv, leaderboard.html and plots from the records
	$(PY) -m bench leaderboard --records $(RESULTS) --out $(LEADERBOARD)

regress: $(STAMP)  ## run the ci suite and compare with this machine's baseline (leaderboard/baselines/ci.<family>.json, else ci.json; JUNIT=report.xml optional)
	$(PY) -m bench regress $(POOL) $(if $(ALGOS),--algorithms $(ALGOS)) $(if $(JUNIT),--junit $(JUNIT)) \
		$(if $(GITHUB_ACTIONS),--github)

regress-update: $(STAMP)  ## rerun the ci suite, rewrite this kernel family's baseline (ALGOS=a,b: only theirs); review, commit
	$(PY) -m bench regress --update $(POOL) $(if $(ALGOS),--algorithms $(ALGOS))

wandb-sync: $(STAMP)  ## upload offline W&B runs (needs WANDB_API_KEY or `wandb login`, and network)
	$(PY) -m bench wandb-sync

report: $(STAMP)  ## build a W&B report of SUITE (online), else point to leaderboard/leaderboard.html
	$(PY) -m bench report --suite $(SUITE) --records $(RESULTS)

# Benchmarks against learn2learn (not tests; ~10 min on 2 cores). PERF_ARGS passes options, e.g. --device cuda.
PERF_ARGS ?=
.PHONY: perf perf-data perf-allocator
perf: $(STAMP)  ## speed vs learn2learn: sampler, MAML/FOMAML/ProtoNet, proxy; writes leaderboard/perf.{md,json}
	$(PY) -m bench.perf $(PERF_ARGS)

perf-allocator: $(STAMP)  ## training steps with glibc's default allocator vs bench/allocator.py's; writes leaderboard/perf-allocator.{md,json}
	$(PY) -m bench.perf_allocator $(PERF_ARGS)

perf-data: $(STAMP)  ## episodes/s of our sampler vs learn2learn's TaskDataset; writes leaderboard/perf-data.{md,json}
	$(PY) -m bench.perf --sections sampling --name perf-data $(PERF_ARGS)

clean:  ## remove caches and scratch outputs (keeps .venv and committed records)
	rm -rf .cache results lightning_logs wandb .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
