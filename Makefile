# `make demo` and `make test` install everything into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-gpu device-wheels data toy-model toy-eval toy-started

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

# One thread per process: the tests' models are tiny, and on the 2-core CI machine extra threads only
# contend (the suite took 9.5 min so, against 18.5 min with torch's default threads).
test: export OMP_NUM_THREADS := 1
test: $(STAMP)
	$(PY) -m pytest -q

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
	$(PY) -c "from mitune.prompts import download_compbench; print(download_compbench())"

# Train the toy world's base model from scratch (CPU, ~25 min on 2 cores) into mitune/assets/toy-model.
toy-model: $(STAMP)
	$(PY) -m mitune.toy.base_model

# The toy benchmark (docs/toy/): per training seed, {mi, random, toy_oracle, phrase_mi} selection trained one round on 75
# train prompts, evaluated (with the base model) at CFG 3 and 7.5 on 50 unseen in-distribution prompts x 6
# images; then the tables, paired contrasts with bootstrap CIs, the rounds' diagnostics and plots, copied into
# docs/toy/ with the wall time of this invocation (every stage resumes). Seeds are independent targets:
# `make -j2 toy-eval` runs two at a time (79 min on this project's 2-core machine: docs/toy/README.md).
TOY := outputs/toy-eval
TOY_SEEDS := 0 1 2 3 4
TOY_SELECTIONS := mi,random,toy_oracle,phrase_mi
TOY_EVAL := eval.round=0,1 generation.guidance_scale=3.0,7.5
TOY_CONTRASTS := toy_oracle-random mi-random mi-base toy_oracle-base random-base mi-toy_oracle phrase_mi-random phrase_mi-mi
TOY_DOCS := table1.md table1.csv contrasts.csv contrasts.md rounds.png rounds.csv cdf_toy_oracle.png \
	cdf_toy_objects.png kendall_toy_oracle.json kendall_toy_objects.json wall_time.txt
# One thread per process: the toy model's ops are too small to gain from more, and the numbers then do not
# depend on the machine's core count.
toy-eval: export OMP_NUM_THREADS := 1
toy-eval: $(addprefix toy-seed-,$(TOY_SEEDS))
	$(PY) -m mitune.analysis $(TOY)/train --metric toy_oracle toy_objects --out $(TOY)/summary
	$(PY) -m mitune.analysis $(TOY)/train/mi-seed0/rounds/round_1 --metric toy_oracle toy_objects \
		--out $(TOY)/summary
	$(PY) -m mitune.summary $(TOY)/eval --out $(TOY)/summary --cfg 3.0 7.5 --contrast $(TOY_CONTRASTS)
	echo "make toy-eval: $$(( $$(date +%s) - $$(cat $(TOY)/summary/.started) )) s wall time, finished $$(date -u +%FT%TZ)" \
		> $(TOY)/summary/wall_time.txt
	cp $(addprefix $(TOY)/summary/,$(TOY_DOCS)) docs/toy/

toy-seed-%: toy-started
	$(PY) -m mitune.run -m +experiment=toy generation.selection=$(TOY_SELECTIONS) seed=$* resume=true \
		hydra.sweep.dir=$(TOY)/train 'hydra.sweep.subdir=$${generation.selection}-seed$${seed}'
	$(PY) -m mitune.evaluate -m +experiment=toy_eval generation.selection=$(TOY_SELECTIONS) seed=$* $(TOY_EVAL) \
		toy_dir=$(TOY)

toy-started: $(STAMP)
	mkdir -p $(TOY)/summary && date +%s > $(TOY)/summary/.started
