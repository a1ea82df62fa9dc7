# `make demo` and `make test` do all set-up themselves on a machine that has only Python (>= 3.11).
# The CPU install takes torch's CPU build: a staged local wheel when pip's find-links has one (offline, seconds),
# else PyTorch's CPU wheel index TORCH_INDEX (PyPI's torch for Linux is the CUDA build). Then the constraints
# file stops any dependency from pulling a CUDA torch. GPU clusters: `make install-gpu`.
PYTHON ?= python3
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints/cpu.txt)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rayft-installed
PIP    := $(BIN)/python -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-gpu assets demo test test-fast test-multinode lint bench bench-sweep clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null || { \
	  echo "no local torch $(TORCH_VERSION) wheel: taking the CPU build from $(TORCH_INDEX)"; \
	  $(PIP) install -q --no-deps --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION); }
	$(PIP) install -q -c constraints/cpu.txt -e '.[dev]'
	$(BIN)/python -c "import torch; assert not torch.version.cuda, 'CUDA torch installed on the CPU path'"
	touch $@

install-gpu:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev,vllm]'

assets: install
	$(BIN)/python -m rayft.tiny --out assets

demo: assets
	$(BIN)/python jobs/pipeline.py --config configs/pipeline_tiny.yaml $(DEMO_FLAGS)

test: install
	$(BIN)/python -m pytest -q --durations=25 tests

test-multinode: install
	$(BIN)/python -m pytest -q tests/test_multinode_ray.py

test-fast: install
	$(BIN)/python -m pytest -q -m "not ray and not gpu and not slow" tests

lint: install
	$(BIN)/ruff check .

bench: assets
	$(BIN)/python bench/sft_throughput.py

bench-sweep: assets
	$(BIN)/python bench/sweep_asha_vs_grid.py

clean:
	rm -rf $(VENV) runs adapters assets
