# `make demo` and `make test` install everything into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-gpu data toy-model toy-eval

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# clean-fid (FID's Inception) without its torchvision dependency, which mitune never imports
	# and whose wheels would replace the pinned torch: so the FID path is tested here too.
	$(PY) -m pip install --quiet --no-deps 'clean-fid>=0.1.35'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mitune.run

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/training.py

# On a GPU machine: SD-2.1-base UNet generation/training throughput, peak memory and MFU.
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py --device cuda --gen-batches 25 50 100 --steps 50 --train-batch 16

data: $(STAMP)
	$(PY) -c "from mitune.prompts import download_compbench; print(download_compbench())"

# Train the toy world's base model from scratch (CPU, ~25 min on 2 cores) into mitune/assets/toy-model.
toy-model: $(STAMP)
	$(PY) -m mitune.toy.base_model

# The toy experiment: base vs MI-TUNE vs random vs oracle selection, 3 seeds (CPU, < 60 min).
toy-eval: $(STAMP)
	$(PY) -m mitune.toy.experiment --out outputs/toy-eval --docs docs/toy
