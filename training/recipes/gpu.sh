#!/usr/bin/env bash
# Retrain the tiny checkpoints on one GPU, sized for about 9 minutes (the default budgets: 170 + 140 + 110 s of
# training, plus probes and evaluation): the commands of tiny.sh (same models, losses, learning rates and seed),
# with larger batches and many more steps. Stages, in order:
#   teacher     the toy-world SigLIP teacher                         -> assets/teacher-tiny
#   tokenizers  Table 3 rows d, a, b, c side by side, same budget    -> assets/dualtoken-tiny, assets/vilau-tiny,
#                                                                       runs/row-{b,c}-tiny/export
#   unified     the unified model on row d's codes                   -> assets/unified-tiny
# (Table 4 is tiny.sh's table4 stage, run on the CPU afterwards with the same RUNS.)
# Runs go to runs/gpu by default, not tiny.sh's runs/: the batch sizes differ, and a run folder refuses to resume
# with another batch size.
#
# Each budget is either a step count (TEACHER_STEPS, TOKENIZER_STEPS, UNIFIED_STEPS: set them to reproduce a run)
# or, when unset, seconds (TEACHER_SECONDS, ...) turned into steps by a 30-step timing probe of the same command on
# the same machine. The steps used are printed and written to $RUNS/gpu-steps.env. The tokenizer probes run beside
# the real teacher and the unified probe beside the real tokenizers, on the probes' own exports, so probing costs
# little wall time and errs towards fewer steps.
#
# Status: run end to end on the 2-core CPU with small budgets (RUNS=/tmp/r ASSETS=/tmp/a EVAL_SIZE=16
# TEACHER_BATCH=8 TOKENIZER_BATCH=4 UNIFIED_BATCH=4 UNIFIED_TRAIN_SIZE=1000 *_SECONDS=5: 7 minutes). It has not yet
# run on a GPU, and the shipped checkpoints come from tiny.sh, not from this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
TINY=training/recipes/tiny.sh

export SEED=${SEED:-0} RUNS=${RUNS:-runs/gpu} ASSETS=${ASSETS:-assets} EVAL_SIZE=${EVAL_SIZE:-1000}
export TEACHER_BATCH=${TEACHER_BATCH:-128} TOKENIZER_BATCH=${TOKENIZER_BATCH:-32} UNIFIED_BATCH=${UNIFIED_BATCH:-64}
export UNIFIED_TRAIN_SIZE=${UNIFIED_TRAIN_SIZE:-50000} SAVE_EVERY=${SAVE_EVERY:-500}
export THREADS=${THREADS:-2} TEACHER_THREADS=${TEACHER_THREADS:-2}
TEACHER_SECONDS=${TEACHER_SECONDS:-170}
TOKENIZER_SECONDS=${TOKENIZER_SECONDS:-140}
UNIFIED_SECONDS=${UNIFIED_SECONDS:-110}
CPUS=$(nproc)
TEACHER_WORKERS=${TEACHER_WORKERS:-$(( CPUS > 4 ? CPUS - 4 : 1 ))}       # the teacher alone: rendering is its limit
TOKENIZER_WORKERS=${TOKENIZER_WORKERS:-$(( CPUS > 8 ? (CPUS - 4) / 4 : 1 ))}  # four rows share the CPUs
STAGES=${STAGES:-"teacher tokenizers unified"}
PROBE=$RUNS/probe
LOGS=$RUNS/gpu-logs
mkdir -p "$PROBE" "$LOGS"

want() { [[ " $STAGES " == *" $1 "* ]]; }

steps_for() {  # steps_for SECONDS BATCH RUN_DIR... -> steps that fit SECONDS at the slowest run's images/s
    python - "$@" <<'PY'
import json, sys
seconds, batch, dirs = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
rates = []
for d in dirs:
    rows = [json.loads(line) for line in open(f"{d}/log.jsonl")]
    timed = [r["images_per_s"] for r in rows if r["step"] > 10] or [rows[-1]["images_per_s"]]  # past the start-up
    rates.append(sum(timed) / len(timed))
print(max(100, int(seconds * min(rates) / batch) // 50 * 50))
PY
}

run_tiny() {  # run_tiny LOG VAR=VALUE...: tiny.sh under these settings, its output in $LOGS/LOG.log
    env "${@:2}" bash "$TINY" > "$LOGS/$1.log" 2>&1 || { echo "$1 failed:"; tail -n 40 "$LOGS/$1.log"; return 1; }
}

probe() {  # probe NAME VAR=VALUE...: a 30-step tiny.sh stage under $PROBE/NAME, no evaluation
    run_tiny "probe-$1" RUNS="$PROBE/$1" ASSETS="$PROBE/$1" EVAL_SIZE=0 SAVE_EVERY=1000 "${@:2}"
}

stage() {  # stage NAME VAR=VALUE...: one tiny.sh stage, timed
    echo "$(date +%T) $1: start"
    run_tiny "$@"
    echo "$(date +%T) $1: done"
}

side_by_side() {  # side_by_side FUNCTION ARGS...: FUNCTION ROW ARGS for Table 3 rows d a b c at once
    local pids=() row
    for row in d a b c; do "$1" "$row" "${@:2}" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

probe_row() {  # probe_row ROW TEACHER_DIR
    probe "row-$1" STAGES="$1" TOKENIZER_STEPS=30 TEACHER="$2" WORKERS="$TOKENIZER_WORKERS"
}
probe_tokenizers() { side_by_side probe_row "$1"; }  # probe_tokenizers TEACHER_DIR: the rows as they will run
TOKENIZER_PROBE_RUNS="$PROBE/row-d/dualtoken-tiny $PROBE/row-a/vilau-tiny $PROBE/row-b/row-b-tiny"
TOKENIZER_PROBE_RUNS+=" $PROBE/row-c/row-c-tiny"

train_row() { stage "row-$1" STAGES="$1" TOKENIZER_STEPS="$TOKENIZER_STEPS" WORKERS="$TOKENIZER_WORKERS"; }

probe_unified() {  # probe_unified TOKENIZER_DIR (a small code cache: only the step time matters)
    probe unified STAGES=unified UNIFIED_STEPS=30 UNIFIED_TRAIN_SIZE=2000 TOKENIZER="$1" WORKERS=2
}

tokenizer_probe_pid=""
if want teacher; then
    if [[ -z "${TEACHER_STEPS:-}" ]]; then
        probe teacher STAGES=teacher TEACHER_STEPS=30 WORKERS="$TEACHER_WORKERS"
        TEACHER_STEPS=$(steps_for "$TEACHER_SECONDS" "$TEACHER_BATCH" "$PROBE/teacher/teacher-tiny")
        if want tokenizers && [[ -z "${TOKENIZER_STEPS:-}" ]]; then
            probe_tokenizers "$PROBE/teacher/teacher-tiny" & tokenizer_probe_pid=$!
        fi
    fi
    echo "teacher: $TEACHER_STEPS steps x $TEACHER_BATCH"
    stage teacher STAGES=teacher TEACHER_STEPS="$TEACHER_STEPS" WORKERS="$TEACHER_WORKERS"
fi

unified_probe_pid=""
if want tokenizers; then
    if [[ -z "${TOKENIZER_STEPS:-}" ]]; then
        if [[ -n "$tokenizer_probe_pid" ]]; then wait "$tokenizer_probe_pid"
        else probe_tokenizers "$ASSETS/teacher-tiny"; fi
        # shellcheck disable=SC2086
        TOKENIZER_STEPS=$(steps_for "$TOKENIZER_SECONDS" "$TOKENIZER_BATCH" $TOKENIZER_PROBE_RUNS)
        if want unified && [[ -z "${UNIFIED_STEPS:-}" ]]; then
            probe_unified "$PROBE/row-d/dualtoken-tiny" & unified_probe_pid=$!
        fi
    fi
    echo "tokenizers: $TOKENIZER_STEPS steps x $TOKENIZER_BATCH, rows d a b c side by side"
    side_by_side train_row
fi

if want unified; then
    if [[ -z "${UNIFIED_STEPS:-}" ]]; then
        if [[ -n "$unified_probe_pid" ]]; then wait "$unified_probe_pid"
        else probe_unified "$ASSETS/dualtoken-tiny"; fi
        UNIFIED_STEPS=$(steps_for "$UNIFIED_SECONDS" "$UNIFIED_BATCH" "$PROBE/unified/unified-tiny")
    fi
    echo "unified: $UNIFIED_STEPS steps x $UNIFIED_BATCH"
    stage unified STAGES=unified UNIFIED_STEPS="$UNIFIED_STEPS" WORKERS="$TEACHER_WORKERS"
fi

{
    echo "TEACHER_STEPS=${TEACHER_STEPS:-}"
    echo "TOKENIZER_STEPS=${TOKENIZER_STEPS:-}"
    echo "UNIFIED_STEPS=${UNIFIED_STEPS:-}"
} | tee "$RUNS/gpu-steps.env"
