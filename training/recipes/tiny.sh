#!/usr/bin/env bash
# Reproduce every shipped tiny checkpoint from scratch on a 2-core CPU, in order:
#   1. the toy-world SigLIP teacher          -> assets/teacher-tiny
#   2. DualToken, Table 3 row (d)            -> assets/dualtoken-tiny
#   3. the VILA-U-style baseline, row (a)    -> assets/vilau-tiny
#   4. the unified model                       -> assets/unified-tiny
#   5. ablation rows (b) and (c) for RESULTS.md -> runs/row-b-tiny/export, runs/row-c-tiny/export (not shipped)
#   6. Table 4: VQA-only models reading semantic vs pixel + semantic tokens -> runs/table4-*/export (not shipped)
#
# Every stage checkpoints into runs/ and is resumable: re-running this script continues an interrupted stage
# (bitwise as if it had not stopped) and re-exports finished ones. Step budgets are the variables below; the
# defaults total about 3 hours on a 2-core CPU with one torch thread, from measured times per step (1 thread):
# teacher 4.1 s at batch 64, tokenizer 2.8 s at batch 16 (6.4 s at batch 32). One thread because two were 3x
# slower whenever anything else ran on the machine; on an otherwise idle machine THREADS=2 may be faster.
# Override any of them from the environment, e.g.
#   TEACHER_STEPS=200 DUALTOKEN_STEPS=100 VILAU_STEPS=100 ABLATION_STEPS=50 bash training/recipes/tiny.sh
#   RUNS=/tmp/runs ASSETS=/tmp/assets ...       # somewhere else than runs/ and assets/
set -euo pipefail
cd "$(dirname "$0")/../.."

SEED=${SEED:-0}
TEACHER_STEPS=${TEACHER_STEPS:-600}      # x 64 images, ~41 min
DUALTOKEN_STEPS=${DUALTOKEN_STEPS:-1100}  # x 16 images, ~53 min
VILAU_STEPS=${VILAU_STEPS:-1000}          # x 16 images, ~47 min
ABLATION_STEPS=${ABLATION_STEPS:-350}     # x 16 images each for rows b and c, ~16 min each
EVAL_SIZE=${EVAL_SIZE:-1000}             # toy val images measured for each model card (~1-2 min per model)
THREADS=${THREADS:-1}
RUNS=${RUNS:-runs}
ASSETS=${ASSETS:-assets}

python -m training.train_teacher --preset tiny --data toy --seed "$SEED" --threads "$THREADS" \
    --steps "$TEACHER_STEPS" --batch-size 64 --lr 3e-4 --warmup 100 --weight-decay 0.1 \
    --save-every 100 --log-every 10 --eval-size "$EVAL_SIZE" --out "$RUNS/teacher-tiny" --resume \
    --export "$ASSETS/teacher-tiny"

# Toy-scale tokenizer settings shared by every row (the full-size defaults are REFERENCE.md's): LR 1e-3 instead of
# 7.2e-5 (at batch 8, 1e-3 led 3e-4 by ~0.5 dB PSNR and halved the semantic loss after 600 images), 100 warmup
# steps instead of 10k, a half-width PatchGAN, and the GAN on for the last quarter of each run only.
tokenizer() {  # tokenizer ROW STEPS NAME EXPORT
    python -m training.train_tokenizer --teacher "$ASSETS/teacher-tiny" --row "$1" --data toy --seed "$SEED" \
        --threads "$THREADS" \
        --steps "$2" --batch-size 16 --lr 1e-3 --warmup 100 --gan-start $(( $2 * 3 / 4 )) --disc-ndf 32 \
        --save-every 100 --log-every 10 --eval-size "$EVAL_SIZE" --out "$RUNS/$3" --resume --export "$4"
}

tokenizer d "$DUALTOKEN_STEPS" dualtoken-tiny "$ASSETS/dualtoken-tiny"
tokenizer a "$VILAU_STEPS" vilau-tiny "$ASSETS/vilau-tiny"
tokenizer b "$ABLATION_STEPS" row-b-tiny "$RUNS/row-b-tiny/export"
tokenizer c "$ABLATION_STEPS" row-c-tiny "$RUNS/row-c-tiny/export"
