# The verbs a newcomer needs. Each target creates .venv and installs the project on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# deepspeed: the ZeRO-2/3 engine and its tests (tests/test_engines*.py skip, saying why, without it);
# `make test EXTRAS=dev` leaves it out. DS_BUILD_OPS=0: no DeepSpeed kernel is compiled at install time.
EXTRAS ?= dev,deepspeed

.PHONY: demo demo-cross-tokenizer test test-all lint format bench bench-e2e docs clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)  ## quickstart: tiny teacher and student built offline, KD, figures before and after
	$(PY) -m examples.quickstart

demo-cross-tokenizer: $(STAMP)  ## the quickstart with a teacher of another tokenizer (docs/quickstart.md)
	$(PY) -m examples.cross_tokenizer_demo

test: $(STAMP)  ## the fast suite CI runs
	$(PY) -m pytest -q

test-all: $(STAMP)  ## including the slow end-to-end runs
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(PY) -m ruff check easydistill tests benchmarks examples
	$(PY) -m ruff format --check easydistill tests benchmarks examples

format: $(STAMP)
	$(PY) -m ruff format easydistill tests benchmarks examples
	$(PY) -m ruff check --fix easydistill tests benchmarks examples

docs: $(STAMP)  ## regenerate docs/config.md from the schema
	$(PY) -m easydistill.config.docs --write docs/config.md

bench: $(STAMP)  ## in-process step benchmark vs TRL, logits store, validate time (~15 min)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),bench]"
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.logits_store
	$(PY) -m benchmarks.validate_time

bench-e2e: $(STAMP)  ## whole processes: kd.train against TRL's GKDTrainer and SFTTrainer (~1 h on 2 cores)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m benchmarks.e2e

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
