#!/usr/bin/env bash
# One benchmark-sized training round (the toy benchmark's settings: 75 train prompts, M=8, 25 steps, 150
# optimizer steps) with MI selection after successive halving (generation.prune=$PRUNE) against full MI,
# per training seed; then each run's round-1 model evaluated on the toy benchmark's 50 test prompts x 6
# images at CFG $CFGS with the oracle, and the paired contrast mi_pruned - mi with a crossed bootstrap CI
# (mitune.summary). Every stage resumes: rerun the same command after a kill.
#   OMP_NUM_THREADS=1 bash benchmarks/pruning_train.sh            (SEEDS="0 1 2", outputs under outputs/pruning)
set -euo pipefail
PY=${PY:-.venv/bin/python}
ROOT=${ROOT:-outputs/pruning}
SEEDS=${SEEDS:-0 1 2}
CFGS=${CFGS:-7.5}
PRUNE=${PRUNE:-[[0.25,0.5],[0.5,0.4]]}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline}
for seed in $SEEDS; do
  for method in ${METHODS:-mi_pruned mi}; do
    extra=""; [ "$method" = mi_pruned ] && extra="generation.prune=$PRUNE"
    $PY -m mitune.run +experiment=toy seed=$seed rounds=1 resume=true logger=csv $extra \
      hydra.run.dir=$ROOT/train/$method-seed$seed
    $PY -m mitune.evaluate -m +experiment=toy_eval seed=$seed eval.round=1 generation.guidance_scale=$CFGS \
      toy_dir=$ROOT run_dir=$ROOT/train/$method-seed$seed eval.method=$method
  done
done
[ "${SUMMARY:-1}" = 1 ] && $PY -m mitune.summary $ROOT/eval --out $ROOT/summary --cfg ${CFGS//,/ } --contrast mi_pruned-mi
