# `make demo` and `make test` install everything into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast smoke-sd21 smoke-sdxl bench bench-gpu device-wheels data toy-model toy-features toy-eval toy-summary toy-started

# clean-fid (FID's Inception) is installed without its torchvision dependency, which mitune never imports and
# whose wheels would replace the pinned torch: so the FID path is tested here too. open_clip_torch for the BPE
# vocabulary file it ships (CLIP's real tokenizer in the full-size builders), read from its files, never
# imported: no-deps for the same reason. Quiet: `make demo` prints one line for the install.
$(STAMP): pyproject.toml
	@echo "installing mitune and its dependencies into $(VENV) (first run only; pip's output in $(VENV)/install.log)"
	@python3 -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@$(PY) -m pip install --quiet -e '.[dev]' >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@$(PY) -m pip install --quiet --no-deps 'clean-fid>=0.1.35' >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@$(PY) -m pip install --quiet --no-deps 'open_clip_torch>=2.20' >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@touch $(STAMP)

install: $(STAMP)

# The design card end to end on the toy model, offline (mitune/demo.py): train R=2, evaluate rounds 0-2 x CFG,
# Table 1, Table 2, tradeoff.png and the W&B trade-off charts; prints where they are.
demo: $(STAMP)
	@$(PY) -m mitune.demo

# One thread per process: the tests' models are tiny, and on the 2-core CI machine extra threads only
# contend (the suite took 9.5 min so, against 18.5 min with torch's default threads).
test test-fast: export OMP_NUM_THREADS := 1
test: $(STAMP)
	$(PY) -m pytest -q

# The development loop: every test but the end-to-end runs (marked slow: whole tasks, subprocesses, sweeps).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Full-size smoke runs on CPU (benchmarks/smoke.py): random-init SD-2.1-base / SDXL-base with the real
# architectures and tokenizers through mitune.run and mitune.evaluate at minimal counts; each writes
# outputs/smoke/<sd21|sdxl>/report.json. Times and memory: README, "Full-size smoke runs".
smoke-sd21 smoke-sdxl: $(STAMP)
	$(PY) benchmarks/smoke.py $(@:smoke-%=%)

# CPU benchmarks (about 15 min on 2 cores), each writing its results under docs/benchmarks/. The GPU
# benchmark runs here at reduced size, so its code stays tested where no GPU is.
bench: $(STAMP)
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/gpu.py --device cpu --latent 16 --gen-batches 2 4 --steps 5 --train-batch 2 --accumulation 2 --repeats 5

# On a GPU machine: benchmarks/device.py's suite. SD-2.1-base and SDXL UNets (random init, real configs):
# generation with MI at micro-batch 25/50/100, training step, peak memory and MFU; the main job on CUDA;
# then the torch.compile and channels-last variants, each in its own file, so a speed-up is kept only
# where it shows. The lent machine (no network, a 15 min lease): see docs/benchmarks/README.md.
bench-gpu: $(STAMP)
	$(PY) benchmarks/device.py --out docs/benchmarks

# What a GPU machine without network lacks (benchmarks/device-requirements.txt), as wheels in .whl/.
device-wheels: $(STAMP)
	rm -rf .whl
	$(PY) -m pip wheel --quiet --no-deps -r benchmarks/device-requirements.txt -w .whl

data: $(STAMP)
	$(PY) -c "from mitune.prompts.sources import download_compbench; print(download_compbench())"

# Train the toy world's base model from scratch (CPU, ~25 min on 2 cores) into mitune/assets/toy-model.
toy-model: $(STAMP)
	$(PY) -m mitune.toy.base_model

# Train the toy world's feature network (toy_fd's "Inception"; CPU, ~3 min) into mitune/assets/toy-features.
toy-features: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m mitune.toy.features

# The toy benchmark's runs, evaluations and summary (`make -j2 toy-eval`): a table of runs in benchmarks/toy.mk.
include benchmarks/toy.mk
include benchmarks/toy_best.mk
