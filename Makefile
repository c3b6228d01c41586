# `make demo` and `make test` install everything into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-gpu data

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
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
