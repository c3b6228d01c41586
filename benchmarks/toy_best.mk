# The paper's protocol on the toy world (docs/toy/best/, issue #31), included by the Makefile: `make -j2 toy-best`.
#
# Each method's best (round, CFG) is chosen on a dev split and reported on a disjoint test split
# (`mitune.summary --dev`), with paired bootstrap CIs over training seeds and test prompts. Runs, one make target
# each (toy-best-run-<method>-seed<n>: its training, then its evaluation; every stage resumes):
#
#   method                         rounds  what
#   mi, random, toy_oracle         3       MI-TUNE and the control's two sides (the benchmark's recipe, rank 32)
#   toy_objects, mi_contrast       1       the busy-image control; contrastive MI (MI beyond busyness)
#   <sel>_r2, <sel>_r4             1 / 3   the adapter rank study: mi to round 3, random and toy_oracle round 1 (run:
#                                          rank 4, and the control at rank 2; TOY_RANKS="2 4 8" adds rank 8)
#   mi_cfg3, mi_restart, mi_empty, 2       round recipes: training sets sampled at CFG 3; each round a fresh adapter
#   mi_cfg3_restart                        on the union of the rounds' sets (train.restart); 10% empty prompts; both
#                                          of the first two
#
# Round 1's candidates come from the base model whatever the method, so every run but mi's and mi_cfg3's takes
# them from the seed's mi run (rounds_from) and selects them itself.
# Evaluation: test = the benchmark's 50 unseen in-distribution prompts (10 per category after the 15 trained on),
# dev = the next 10 per category of color, texture, spatial and complex (40 prompts: shape has no unseen train-side
# prompt left). The main methods are evaluated on both at CFG TOY_BEST_CFGS (test 2 images per prompt, dev 1);
# the rank study and the recipes on test at TOY_SCREEN_CFGS.
TOY_BEST := outputs/toy-best
comma := ,
TOY_BEST_SEEDS := 0 1 2
TOY_BEST_CFGS := 1.5,3.0,5.0,7.5
TOY_SCREEN_CFGS := 1.5,3.0
TOY_BEST_MAIN := mi random toy_oracle toy_objects mi_contrast
TOY_RANKS := 2 4
TOY_RANK_METHODS := $(foreach r,$(TOY_RANKS),mi_r$(r) random_r$(r) toy_oracle_r$(r))
TOY_CONTROL_METHODS := random toy_oracle $(foreach r,$(TOY_RANKS),random_r$(r) toy_oracle_r$(r))
TOY_RECIPES := mi_cfg3 mi_restart mi_empty mi_cfg3_restart
TOY_BEST_CONTRASTS := mi-base toy_oracle-base random-base toy_objects-base mi_contrast-base toy_oracle-random mi-random \
	mi-toy_objects mi_contrast-toy_objects mi_contrast-mi mi-toy_oracle
# The control, MI - random, MI - base and random - base at each rank (32: the benchmark's), and MI's rounds 2 and 3
# against its round 1.
rank_contrasts = toy_oracle$(1)-random$(1) mi$(1)-random$(1) mi$(1)-base random$(1)-base mi$(1)@2-mi$(1)@1 mi$(1)@3-mi$(1)@1
# The summaries contrast the methods that were evaluated (toy_done: those with evaluation folders), so a partial
# campaign (-k, or an interrupted one) still gets its tables.
toy_done = $(strip $(foreach m,$(1),$(if $(wildcard $(TOY_BEST)/$(2)/$(m)-seed*),$(m))))
TOY_RANK_CONTRASTS = $(call rank_contrasts,) $(foreach r,$(patsubst mi_r%,%,$(call toy_done,$(addprefix mi_r,$(TOY_RANKS)),test)),\
	$(call rank_contrasts,_r$(r)) mi_r$(r)-mi)
TOY_RECIPE_CONTRASTS = mi-base mi@2-mi@1 $(foreach m,$(call toy_done,$(TOY_RECIPES),test),$(m)-base $(m)@2-$(m)@1 $(m)-mi)
TOY_CONTROL_CONTRASTS = toy_oracle-random $(foreach r,$(TOY_RANKS),$(if $(call toy_done,toy_oracle_r$(r) random_r$(r),control),\
	toy_oracle_r$(r)-random_r$(r) random_r$(r)-random))

# Per method: its selection, rounds, training settings, and whether round 1 comes from the seed's mi run.
toy_best_sel = $(if $(filter toy_oracle%,$(1)),toy_oracle,$(if $(filter random%,$(1)),random,$(if $(filter toy_objects,$(1)),toy_objects,$(if $(filter mi_contrast,$(1)),mi_contrast,mi))))
toy_best_rounds = $(if $(filter mi random toy_oracle $(filter mi_r%,$(TOY_RANK_METHODS)),$(1)),3,$(if $(filter $(TOY_RECIPES),$(1)),2,1))
toy_best_rank = $(patsubst r%,%,$(lastword $(subst _, ,$(1))))
toy_best_args = $(if $(filter $(1),$(TOY_RANK_METHODS)),adapter.rank=$(call toy_best_rank,$(1)) adapter.alpha=$(call toy_best_rank,$(1))) \
	$(if $(filter mi_cfg3%,$(1)),generation.guidance_scale=3.0) $(if $(filter %restart,$(1)),train.restart=true) \
	$(if $(filter mi_empty,$(1)),train.empty_prompt_prob=0.1)
# The run whose round 1 (the same candidates) a run takes: the seed's mi run, or its mi_cfg3 run for CFG-3 sets.
toy_best_source = $(if $(filter mi_cfg3%,$(1)),mi_cfg3,mi)
toy_best_from = $(if $(filter mi mi_cfg3,$(1)),,rounds_from=$(TOY_BEST)/train/$(call toy_best_source,$(1))-seed$(2))
toy_best_main = $(filter $(TOY_BEST_MAIN),$(1))
# Evaluated rounds: the base model (round 0) once per seed, with the seed's mi run.
toy_best_eval_rounds = $(shell seq -s, $(if $(filter mi,$(1)),0,1) $(call toy_best_rounds,$(1)))
toy_best_evaluate = $(PY) -m mitune.evaluate -m +experiment=$(1) seed=$(call toy_seed,$(2)) \
	eval.method=$(call toy_selection,$(2)) run_dir=$(TOY_BEST)/train/$(2) toy_dir=$(TOY_BEST) \
	eval.round=$(call toy_best_eval_rounds,$(call toy_selection,$(2))) generation.selection=$(call toy_best_sel,$(call toy_selection,$(2)))

toy-best toy-best-summary toy-best-run-% toy-best-train-% toy-best-eval-%: export OMP_NUM_THREADS := 1
toy-best: $(foreach m,$(TOY_BEST_MAIN) $(TOY_RANK_METHODS) $(TOY_RECIPES),$(foreach n,$(TOY_BEST_SEEDS),toy-best-run-$(m)-seed$(n)))
	$(MAKE) --no-print-directory toy-best-summary

.SECONDEXPANSION:
toy-best-run-%: toy-best-train-% toy-best-eval-% $$(if $$(filter $$(call toy_selection,$$*),$$(TOY_CONTROL_METHODS)),toy-best-control-$$*) ;

# Files that stand for finished work: never deleted by make.
.PRECIOUS: $(TOY_BEST)/train/mi-seed%/rounds/round_1/summary.json $(TOY_BEST)/train/mi_cfg3-seed%/rounds/round_1/summary.json
$(TOY_BEST)/train/mi-seed%/rounds/round_1/summary.json: | $(STAMP)
	$(MAKE) --no-print-directory toy-best-train-mi-seed$*
$(TOY_BEST)/train/mi_cfg3-seed%/rounds/round_1/summary.json: | $(STAMP)
	$(MAKE) --no-print-directory toy-best-train-mi_cfg3-seed$*

toy-best-train-%: $(STAMP) $$(if $$(call toy_best_from,$$(call toy_selection,$$*),x),$(TOY_BEST)/train/$$(call toy_best_source,$$(call toy_selection,$$*))-seed$$(call toy_seed,$$*)/rounds/round_1/summary.json)
	$(PY) -m mitune.run +experiment=toy generation.selection=$(call toy_best_sel,$(call toy_selection,$*)) \
		seed=$(call toy_seed,$*) rounds=$(call toy_best_rounds,$(call toy_selection,$*)) resume=true \
		hydra.run.dir=$(TOY_BEST)/train/$* $(call toy_best_from,$(call toy_selection,$*),$(call toy_seed,$*)) \
		$(call toy_best_args,$(call toy_selection,$*)) $(call toy_wandb,best-$*,$(TOY_BEST)/train)

toy-best-eval-%: toy-best-train-%
	$(call toy_best_evaluate,toy_eval,$*) eval.num_images=2 hydra.sweep.dir=$(TOY_BEST)/test/$* \
		generation.guidance_scale=$(if $(call toy_best_main,$(call toy_selection,$*)),$(TOY_BEST_CFGS),$(TOY_SCREEN_CFGS))
	$(if $(call toy_best_main,$(call toy_selection,$*)),$(call toy_best_evaluate,toy_dev,$*) eval.num_images=1 \
		hydra.sweep.dir=$(TOY_BEST)/dev/$* generation.guidance_scale=$(TOY_BEST_CFGS))

# The control at round 1 for the rank study, at the benchmark's evaluation size (6 images per test prompt, CFG 3:
# 2 images did not resolve it at rank 32).
toy-best-control-%: toy-best-train-%
	$(PY) -m mitune.evaluate -m +experiment=toy_eval seed=$(call toy_seed,$*) eval.method=$(call toy_selection,$*) \
		run_dir=$(TOY_BEST)/train/$* toy_dir=$(TOY_BEST) eval.round=1 eval.num_images=6 generation.guidance_scale=3.0 \
		generation.selection=$(call toy_best_sel,$(call toy_selection,$*)) hydra.sweep.dir=$(TOY_BEST)/control/$*

# The tables: best.csv and the contrasts at each method's best point (docs/toy/best/; at every point: best/points/),
# the rank study and the round recipes at every evaluated point (docs/toy/rank/, docs/toy/recipes/).
toy-best-summary: $(STAMP)
	$(PY) -m mitune.analysis $(TOY_BEST)/train --metric toy_oracle toy_objects --out $(TOY_BEST)/summary/rounds
	$(PY) -m mitune.summary $(wildcard $(addprefix $(TOY_BEST)/test/,$(addsuffix -seed*,$(TOY_BEST_MAIN)))) \
		--dev $(wildcard $(addprefix $(TOY_BEST)/dev/,$(addsuffix -seed*,$(TOY_BEST_MAIN)))) \
		--out $(TOY_BEST)/summary/best --cfg $(subst $(comma), ,$(TOY_BEST_CFGS)) --contrast $(TOY_BEST_CONTRASTS) --no-wandb
	$(PY) -m mitune.summary $(wildcard $(addprefix $(TOY_BEST)/test/,$(addsuffix -seed*,$(TOY_BEST_MAIN)))) \
		--out $(TOY_BEST)/summary/points --cfg $(subst $(comma), ,$(TOY_BEST_CFGS)) --contrast $(TOY_BEST_CONTRASTS) --no-wandb
	$(PY) -m mitune.summary $(wildcard $(addprefix $(TOY_BEST)/test/,$(addsuffix -seed*,mi random toy_oracle $(TOY_RANK_METHODS)))) \
		--out $(TOY_BEST)/summary/rank --cfg $(subst $(comma), ,$(TOY_SCREEN_CFGS)) --contrast $(TOY_RANK_CONTRASTS) --no-wandb
	$(PY) -m mitune.summary $(wildcard $(TOY_BEST)/control/*) --out $(TOY_BEST)/summary/control --cfg 3.0 --no-wandb \
		--contrast $(TOY_CONTROL_CONTRASTS)
	$(PY) -m mitune.summary $(wildcard $(addprefix $(TOY_BEST)/test/,$(addsuffix -seed*,mi $(TOY_RECIPES)))) \
		--out $(TOY_BEST)/summary/recipes --cfg $(subst $(comma), ,$(TOY_SCREEN_CFGS)) --contrast $(TOY_RECIPE_CONTRASTS) --no-wandb
	mkdir -p docs/toy/best docs/toy/rank docs/toy/recipes
	cp $(addprefix $(TOY_BEST)/summary/best/,best.csv best.md contrasts.csv contrasts.md table1.md table1.csv) docs/toy/best/
	cp $(TOY_BEST)/summary/rounds/rounds.csv docs/toy/best/
	mkdir -p docs/toy/best/points && cp $(addprefix $(TOY_BEST)/summary/points/,contrasts.csv contrasts.md rounds.png) \
		docs/toy/best/points/
	cp $(addprefix $(TOY_BEST)/summary/rank/,contrasts.csv contrasts.md table1.md table1.csv rounds.png) docs/toy/rank/
	mkdir -p docs/toy/rank/control && cp $(addprefix $(TOY_BEST)/summary/control/,contrasts.csv contrasts.md table1.md) \
		docs/toy/rank/control/
	cp $(addprefix $(TOY_BEST)/summary/recipes/,contrasts.csv contrasts.md table1.md table1.csv rounds.png) docs/toy/recipes/
