# `make demo` and `make test` install everything into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-gpu device-wheels data toy-model toy-eval toy-summary toy-started

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
	$(PY) -c "from mitune.prompts.sources import download_compbench; print(download_compbench())"

# Train the toy world's base model from scratch (CPU, ~25 min on 2 cores) into mitune/assets/toy-model.
toy-model: $(STAMP)
	$(PY) -m mitune.toy.base_model

# The toy benchmark (docs/toy/): per training seed 0-4, five selectors (MI, phrase MI, random, the oracle and the
# most objects drawn) each trained on 75 train prompts, one round; the first four three rounds on seeds 0-2
# (TOY_ROUND_*; the cost: docs/toy/README.md).
# Each run is evaluated (with the base model) after every round at CFG 3 and 7.5 on 50 unseen in-distribution
# prompts x 6 images. The M/k sensitivity (TOY_MK: M candidates, top k; MI selection, one round, seeds 0-2) adds
# runs beside them. Then the tables, paired contrasts with bootstrap CIs, the rounds' diagnostics and plots,
# copied into docs/toy/ with the wall time of this invocation (every stage resumes). Runs are independent
# targets: `make -j2 toy-eval` runs two at a time (about 3.3 h from scratch on 2 cores: docs/toy/README.md).
TOY := outputs/toy-eval
TOY_SEEDS := 0 1 2 3 4
TOY_SELECTIONS := mi random toy_oracle phrase_mi toy_objects
TOY_ROUNDS := 3
TOY_ROUND_SELECTIONS := mi random toy_oracle phrase_mi
TOY_ROUND_SEEDS := 0 1 2
TOY_MK := M4-k1 M16-k1 M8-k2 M8-k4
TOY_MK_SEEDS := 0 1 2
TOY_CFGS := 3.0,7.5
TOY_CONTRASTS := toy_oracle-random mi-random mi-base toy_oracle-base random-base mi-toy_oracle phrase_mi-random phrase_mi-mi phrase_mi-base toy_objects-random toy_objects-base mi-toy_objects
# The M/k tables hold the benchmark's mi, random and oracle runs of the M/k seeds too: M=8, k=1 and the control on them.
TOY_MK_CONTRASTS := $(foreach c,$(TOY_MK),mi-$(c)-mi mi-$(c)-random mi-$(c)-base) mi-random mi-base toy_oracle-random
TOY_DOCS := table1.md table1.csv contrasts.csv contrasts.md rounds.png rounds.csv
TOY_ANALYSIS := cdf_toy_oracle.png cdf_toy_objects.png kendall_toy_oracle.json kendall_toy_objects.json
# Runs <selection>-seed<n>, the multi-round ones first (the longest); rounds of a run; M/k runs M<m>-k<k>-seed<n>.
toy_runs = $(foreach s,$(1),$(foreach n,$(2),$(s)-seed$(n)))
TOY_RUNS := $(call toy_runs,$(TOY_ROUND_SELECTIONS),$(TOY_ROUND_SEEDS)) \
	$(filter-out $(call toy_runs,$(TOY_ROUND_SELECTIONS),$(TOY_ROUND_SEEDS)),$(call toy_runs,$(TOY_SELECTIONS),$(TOY_SEEDS)))
toy_selection = $(firstword $(subst -seed, ,$(1)))
toy_seed = $(lastword $(subst -seed, ,$(1)))
toy_rounds = $(if $(filter $(1),$(call toy_runs,$(TOY_ROUND_SELECTIONS),$(TOY_ROUND_SEEDS))),$(TOY_ROUNDS),1)
toy_wandb = logger.wandb.name=toy-$(1) logger.wandb.group=$(2)
toy_mk = $(patsubst $(2)%,%,$(filter $(2)%,$(subst -, ,$(1))))
# One thread per process: the toy model's ops are too small to gain from more, and the numbers then do not
# depend on the machine's core count.
toy-eval toy-summary toy-run-% toy-mk-%: export OMP_NUM_THREADS := 1
toy-eval: toy-started $(addprefix toy-run-,$(TOY_RUNS)) $(addprefix toy-mk-,$(call toy_runs,$(TOY_MK),$(TOY_MK_SEEDS)))
	$(MAKE) --no-print-directory toy-summary
	echo "make toy-eval: $$(( $$(date +%s) - $$(cat $(TOY)/summary/.started) )) s wall time, finished $$(date -u +%FT%TZ)" \
		> $(TOY)/summary/wall_time.txt
	cp $(TOY)/summary/wall_time.txt docs/toy/

# The tables, diagnostics and plots from the runs' saved images (also alone: `make toy-summary`).
toy-summary: $(STAMP)
	$(PY) -m mitune.analysis $(TOY)/train --metric toy_oracle toy_objects --out $(TOY)/summary
	for r in $$(seq 1 $(TOY_ROUNDS)); do \
		$(PY) -m mitune.analysis $(TOY)/train/mi-seed0/rounds/round_$$r --metric toy_oracle toy_objects \
			--out $(TOY)/summary/round_$$r && mkdir -p docs/toy/round_$$r && \
		cp $(addprefix $(TOY)/summary/round_$$r/,$(TOY_ANALYSIS)) docs/toy/round_$$r/ || exit 1; done
	$(PY) -m mitune.summary $(TOY)/eval --out $(TOY)/summary --cfg 3.0 7.5 --contrast $(TOY_CONTRASTS)
	$(PY) -m mitune.analysis $(TOY)/mk/train --metric toy_oracle toy_objects --out $(TOY)/mk/summary
	$(PY) -m mitune.summary $(TOY)/mk/eval $(wildcard $(foreach s,mi random toy_oracle,$(TOY)/eval/$(s)-seed[$(subst $() ,,$(TOY_MK_SEEDS))]/round_[01]-*)) \
		--out $(TOY)/mk/summary --cfg 3.0 7.5 --contrast $(TOY_MK_CONTRASTS)
	cp $(addprefix $(TOY)/summary/,$(TOY_DOCS)) docs/toy/
	mkdir -p docs/toy/mk && cp $(addprefix $(TOY)/mk/summary/,table1.md table1.csv contrasts.csv contrasts.md rounds.csv) \
		docs/toy/mk/

# One run (<selection>-seed<n>): its rounds, then every round's evaluation (round 0, the base model, is shared
# by a seed's runs: the first job writes its images, the others wait and reuse them). Runs are single Hydra
# runs, not one sweep, so parallel targets share no sweep record; W&B groups them by their folder.
toy-run-%: $(STAMP)
	$(PY) -m mitune.run +experiment=toy generation.selection=$(call toy_selection,$*) seed=$(call toy_seed,$*) \
		rounds=$(call toy_rounds,$*) resume=true hydra.run.dir=$(TOY)/train/$* $(call toy_wandb,$*,$(TOY)/train)
	$(PY) -m mitune.evaluate -m +experiment=toy_eval generation.selection=$(call toy_selection,$*) \
		seed=$(call toy_seed,$*) eval.round=$$(seq -s, 0 $(call toy_rounds,$*)) generation.guidance_scale=$(TOY_CFGS) \
		toy_dir=$(TOY)

# One M/k run (M<m>-k<k>-seed<n>): MI selection of the top k of m candidates, one round, and its evaluation.
toy-mk-%: $(STAMP)
	$(PY) -m mitune.run +experiment=toy generation.num_candidates=$(call toy_mk,$*,M) \
		generation.top_k=$(call toy_mk,$*,k) seed=$(call toy_mk,$*,seed) resume=true \
		hydra.run.dir=$(TOY)/mk/train/mi-$* $(call toy_wandb,mi-$*,$(TOY)/mk/train)
	$(PY) -m mitune.evaluate -m +experiment=toy_eval seed=$(call toy_mk,$*,seed) eval.round=1 \
		generation.guidance_scale=$(TOY_CFGS) toy_dir=$(TOY) run_dir=$(TOY)/mk/train/mi-$* \
		eval.method=mi-$(subst -seed$(call toy_mk,$*,seed),,$*) hydra.sweep.dir=$(TOY)/mk/eval/mi-$*

toy-started: $(STAMP)
	mkdir -p $(TOY)/summary && date +%s > $(TOY)/summary/.started
