# The toy benchmark (docs/toy/), included by the Makefile: `make -j2 toy-eval` (about 3.3 h on 2 cores).
#
# The runs, one make target each (toy-run-<selection>-seed<n>, toy-mk-M<m>-k<k>-seed<n>):
#
#   selection                       seeds       rounds   what
#   mi, random, toy_oracle,         0 1 2       3        MI-TUNE, the control's two sides, phrase MI
#     phrase_mi
#   mi, random, toy_oracle,         3 4         1
#     phrase_mi
#   toy_objects                     0-4         1        the busy-image control (most objects drawn)
#   M/k: mi, M in {4, 16} at k=1,   0 1 2       1        E.1's sensitivity (TOY_MK)
#     k in {2, 4} at M=8
#
# Each run trains on 75 train prompts and is evaluated (with the base model, round 0) after every round at
# CFG 3 and 7.5 on 50 unseen in-distribution prompts x 6 images. Then the tables, paired contrasts with
# bootstrap CIs, the rounds' diagnostics and plots are copied into docs/toy/ with the invocation's wall
# time (every stage resumes).
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
# Extra settings for every training run / evaluation of toy-run-% and toy-real (a reduced benchmark: docs/toy/real/).
TOY_TRAIN_ARGS :=
TOY_EVAL_ARGS :=
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
		rounds=$(call toy_rounds,$*) resume=true hydra.run.dir=$(TOY)/train/$* $(call toy_wandb,$*,$(TOY)/train) \
		$(TOY_TRAIN_ARGS)
	$(PY) -m mitune.evaluate -m +experiment=toy_eval generation.selection=$(call toy_selection,$*) \
		seed=$(call toy_seed,$*) eval.round=$$(seq -s, 0 $(call toy_rounds,$*)) generation.guidance_scale=$(TOY_CFGS) \
		toy_dir=$(TOY) $(TOY_EVAL_ARGS)

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

# MI + Real (the paper's Table 3; docs/toy/real/): `make toy-real` (one process: about 80 process-minutes on 2 cores).
# Per seed: the renderer's scenes of the 75 train prompts (the toy's "real" pairs, mitune.toy.real), then one round of
# MI-TUNE with f = 25, 50, 90 % of its fine-tuning set replaced by scenes (mi_real<f>), and the scenes alone (real, no
# generation), each evaluated at round 1 on the benchmark's 50 test prompts x 6 images at CFG $(TOY_REAL_CFGS), against the
# benchmark's own MI-TUNE run of the seed (its round 1: `toy-run-mi-seed<n>` with one round; a 3-round run's round 1
# is the same) and the base model (round 0, shared). Everything resumes; the tables go to docs/toy/real/.
TOY_REAL_SEEDS := 0 1 2
TOY_REAL_PCTS := 100 50 25 90
TOY_REAL_CFGS := 3.0
TOY_REAL_METHODS := mi_real25 mi_real50 mi_real90 real
TOY_REAL_CONTRASTS := $(foreach m,$(TOY_REAL_METHODS),$(m)-mi $(m)-base) mi-base real-mi_real90
toy_real_method = $(if $(filter 100,$(1)),real,mi_real$(1))
toy_real_fraction = $(if $(filter 100,$(1)),1.0,0.$(1))
toy_real_pct = $(firstword $(subst -seed, ,$(1)))
toy-real toy-real-summary toy-real-run-% toy-real-mi-%: export OMP_NUM_THREADS := 1
# Method-major: real images alone first (no generation), then the mixes; each seed's MI-TUNE run comes with its first.
toy-real: $(foreach p,$(TOY_REAL_PCTS),$(foreach n,$(TOY_REAL_SEEDS),toy-real-run-$(p)-seed$(n))) \
		$(foreach n,$(TOY_REAL_SEEDS),$(TOY)/eval/mi-seed$(n)/round_1-cfg_$(TOY_REAL_CFGS)/results.csv)
	$(MAKE) --no-print-directory toy-real-summary

# The benchmark's MI-TUNE run of a seed, one round, evaluated at rounds 0 (the base model) and 1 at TOY_REAL_CFGS.
toy-real-mi-seed%: $(STAMP)
	$(MAKE) --no-print-directory toy-run-mi-seed$* TOY_ROUND_SEEDS= TOY_CFGS=$(TOY_REAL_CFGS)

# Files that stand for finished work: never deleted by make (as intermediate files, or when a recipe is interrupted).
.PRECIOUS: $(TOY)/real/pairs/seed%/metadata.jsonl $(TOY)/train/mi-seed%/rounds/round_1/summary.json \
	$(TOY)/eval/mi-seed%/round_1-cfg_$(TOY_REAL_CFGS)/results.csv

# The scenes of a seed: written once, as one folder (mitune.toy.real writes it atomically).
$(TOY)/real/pairs/seed%/metadata.jsonl: | $(STAMP)
	$(PY) -m mitune.toy.real --out $(TOY)/real/pairs/seed$* --per-category 15 --seed $*

# The seed's MI-TUNE round (its candidates and picks), which the mixed runs take as theirs (rounds_from).
$(TOY)/train/mi-seed%/rounds/round_1/summary.json: | $(STAMP)
	$(MAKE) --no-print-directory toy-real-mi-seed$*

# Its evaluation (rounds 0 and 1), after the round: one make job per seed's MI-TUNE run at a time, also with -j2.
$(TOY)/eval/mi-seed%/round_1-cfg_$(TOY_REAL_CFGS)/results.csv: $(TOY)/train/mi-seed%/rounds/round_1/summary.json
	$(MAKE) --no-print-directory toy-real-mi-seed$*

# One run (<pct>-seed<n>): f = pct/100 of the set real, one round, and its round-1 evaluation. The mixed runs take the
# seed's MI-TUNE round as theirs (rounds_from: the same candidates and picks, generated once).
.SECONDEXPANSION:
toy-real-run-%: $(STAMP) $(TOY)/real/pairs/seed$$(call toy_seed,$$*)/metadata.jsonl \
		$(TOY)/train/mi-seed$$(call toy_seed,$$*)/rounds/round_1/summary.json
	$(PY) -m mitune.run +experiment=toy_real train.real_images=$(TOY)/real/pairs/seed$(call toy_seed,$*) \
		train.real_fraction=$(call toy_real_fraction,$(call toy_real_pct,$*)) seed=$(call toy_seed,$*) resume=true \
		$(if $(filter 100,$(call toy_real_pct,$*)),,rounds_from=$(TOY)/train/mi-seed$(call toy_seed,$*)) $(TOY_TRAIN_ARGS) \
		hydra.run.dir=$(TOY)/real/train/$(call toy_real_method,$(call toy_real_pct,$*))-seed$(call toy_seed,$*) \
		$(call toy_wandb,$(call toy_real_method,$(call toy_real_pct,$*))-seed$(call toy_seed,$*),$(TOY)/real/train)
	$(PY) -m mitune.evaluate -m +experiment=toy_eval seed=$(call toy_seed,$*) eval.round=1 \
		generation.guidance_scale=$(TOY_REAL_CFGS) toy_dir=$(TOY) \
		run_dir=$(TOY)/real/train/$(call toy_real_method,$(call toy_real_pct,$*))-seed$(call toy_seed,$*) \
		eval.method=$(call toy_real_method,$(call toy_real_pct,$*)) \
		hydra.sweep.dir=$(TOY)/real/eval/$(call toy_real_method,$(call toy_real_pct,$*))-seed$(call toy_seed,$*) \
		$(TOY_EVAL_ARGS)

# The tables: the real runs beside the seeds' MI-TUNE and base points, paired contrasts with bootstrap CIs.
toy-real-summary: $(STAMP)
	$(PY) -m mitune.summary $(TOY)/real/eval $(wildcard $(foreach n,$(TOY_REAL_SEEDS),$(TOY)/eval/mi-seed$(n)/round_[01]-cfg_$(TOY_REAL_CFGS))) \
		--out $(TOY)/real/summary --cfg $(TOY_REAL_CFGS) --contrast $(TOY_REAL_CONTRASTS)
	mkdir -p docs/toy/real && cp $(addprefix $(TOY)/real/summary/,table1.md table1.csv contrasts.csv contrasts.md) docs/toy/real/
