# The two commands a newcomer types: `make demo` and `make test`. Each sets itself up first (idempotent).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export LMLOOP_HOME ?= $(HOME)/.cache/lmloop

.PHONY: setup demo demo-finetune test test-fast lint format bench bench-infer bench-serve bench-dapt clean help

help:
	@echo "make demo   - set up, then run the closed loop on a domain shift (lmloop demo: train, serve, drift,"
	@echo "              feedback, gated retrain, hot swap; 8-18 min; report in runs/demo/demo.html)"
	@echo "make demo-finetune - fine-tune MiniLM on all of vader-sentiment (recipes/sentiment.yaml)"
	@echo "make test   - set up, then run the test suite (incl. one slow end-to-end test)"
	@echo "make test-fast - tests without the slow end-to-end ones"
	@echo "make lint   - ruff check + format check"
	@echo "make bench  - benchmarks/finetune.py --quick"
	@echo "make bench-infer / bench-serve - inference and serving benchmarks on runs/sentiment (after make demo-finetune)"
	@echo "make bench-dapt - benchmarks/dapt.py --quick (DAPT vs none on one VADER domain; full run ~30 min)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned first: the CPU build installs from local disk; an unpinned torch pulls GBs of CUDA
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# the assets the demo and tests use; smollm2 (a 93 MB GGUF converted to 538 MB of safetensors) is fetched
# on first use (lmloop generate / chat / its slow test), or with `lmloop assets --fetch smollm2`
setup: $(STAMP)
	$(BIN)/lmloop assets --fetch minilm-l6 vader-sentiment shakespeare

# the whole loop on a real domain shift (8 min on a bf16 CPU, 18 on an fp32-only one): train, serve, drift, feedback, gated retrain, hot swap
demo: setup
	$(BIN)/lmloop demo --recipe recipes/domain-shift.yaml --out runs/demo

# fine-tune MiniLM on all of vader-sentiment (~15 min): the model bench-infer / bench-serve use
demo-finetune: setup
	$(BIN)/lmloop run recipes/sentiment.yaml --force

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/finetune.py --quick

bench-infer: setup
	$(BIN)/python benchmarks/inference.py --model runs/sentiment

bench-serve: setup
	$(BIN)/python benchmarks/serve_load.py --model runs/sentiment

bench-dapt: setup
	$(BIN)/python benchmarks/dapt.py --quick

clean:
	rm -rf runs .pytest_cache .ruff_cache
