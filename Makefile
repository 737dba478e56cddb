# cfa-lightning: `make help` lists the targets.
VENV   ?= .venv
PYTHON ?= $(VENV)/bin/python
SYSTEM_PYTHON ?= python3
PEER_VENV   ?= .venv-peer
PEER_PYTHON ?= $(PEER_VENV)/bin/python
# anomalib 2.7.0 for make peer-bench: it needs `lightning`, so it never shares the project's venv.
PEER_PACKAGES = torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0
PEER_MISSING = no anomalib at $(PEER_PYTHON): install the peer environment with `make peer-env` ($(SYSTEM_PYTHON) -m venv $(PEER_VENV) && $(PEER_PYTHON) -m pip install $(PEER_PACKAGES)), then run make peer-bench
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-slow lint format demo train bench peer-env peer-bench gpu-check clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(PYTHON):
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip

install: $(PYTHON) ## Create the venv and install the package (editable) with its test and cluster extras
	$(PYTHON) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install --quiet -e '.[test,cluster]'

test: ## Run the test suite (no network, under 10 minutes on 2 cores)
	$(PYTHON) -m pytest

test-slow: ## Run the slow tests only (DDP, Ray and submitit sweeps, the wheel installed outside the checkout)
	$(PYTHON) -m pytest -m slow

lint: ## Check style with ruff
	$(PYTHON) -m ruff check src tests experiments
	$(PYTHON) -m ruff format --check src tests experiments

format: ## Format the code with ruff
	$(PYTHON) -m ruff check --fix src tests experiments
	$(PYTHON) -m ruff format src tests experiments

demo: ## Train and test on generated synthetic data with real lite0 weights (a few minutes on CPU)
	$(PYTHON) -m cfa_lightning.train +experiment=demo $(ARGS)

train: ## Train and test, e.g. make train ARGS="+experiment=wide_resnet50 data.category=screw"
	$(PYTHON) -m cfa_lightning.train $(ARGS)

bench: ## Speed/memory, fast path vs naive (quick: ~170 CPU-seconds; full grid: python experiments/benchmark.py)
	$(PYTHON) experiments/benchmark.py --quick $(ARGS)

peer-env: ## Create .venv-peer with anomalib 2.7.0 from PyPI, for peer-bench (never touches .venv)
	$(SYSTEM_PYTHON) -m venv $(PEER_VENV)
	$(PEER_PYTHON) -m pip install $(PEER_PACKAGES)

peer-bench: ## Our CFA vs anomalib's, alternating rounds: img/s, peak RSS (needs peer-env; not in test or CI)
	$(if $(shell $(PEER_PYTHON) -c "import anomalib" 2>/dev/null && echo ok),,$(error $(PEER_MISSING)))
	$(PYTHON) experiments/peer_speed.py --peer-python $(PEER_PYTHON) $(ARGS)

gpu-check: ## Device, versions, bench cells, bf16 demo vs fp32, 2-job sweep (GPU machine: PYTHON=python3 ARGS="--wheels DIR")
	$(PYTHON) experiments/gpu_check.py $(ARGS)

clean: ## Remove run outputs and caches (keeps the venv)
	rm -rf outputs multirun wandb lightning_logs .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
