#!/usr/bin/env bash
# One lent GPU, one call: train-step throughput and MFU, TensorRT FP16/INT8 latency, serve throughput.
#
#   bash benchmarks/gpu_suite.sh [--dry-run]        (or: make bench-gpu; DRY_RUN=1 bash benchmarks/gpu_suite.sh)
#
# Steps (benchmarks/gpu_bench.py; each in its own process under `timeout`, so one failing or hanging
# step prints one line and the others still run), in this order:
#   train_world  YOLO-World-S v2 train step, batch 32 at 640: detectkit eager fp32 vs bf16 autocast +
#                channels_last (+ torch.compile); ultralytics' own step when it imports; img/s and MFU
#   tensorrt     YOLO-NAS-S at 640, batch 1: FP16 and INT8 (PTQ Q/DQ) engines from detectkit's export
#                path, beside super-gradients' published T4 figures (a different card)
#   serve        dynamic batching: the server's backend in process, then bench_serve.py's HTTP run
#   train_nas    the YOLO-NAS-S train step, as train_world (last: its compile is the most expendable)
# Each step writes $OUT/<step>.json (its output in $OUT/<step>.log); the end is a table and ONE JSON line.
# --dry-run: CPU, 64 px, batch 2, no compile, no HTTP server: the whole script in well under a minute.
#
# Environment: PYTHON (default .venv/bin/python, else python3), OUT (default benchmarks/gpu_results),
# STEPS (default "train_world tensorrt serve train_nas"), SUITE_BUDGET (seconds for everything, default
# 570: a step's timeout is cut to what is left, a step with under 20 s left is skipped), STEP_TIMEOUT
# (seconds per step; default train_world 240, tensorrt 200, serve and train_nas 150; dry run 120),
# GPU_SUITE_SIZE / GPU_SUITE_BATCH / GPU_SUITE_RUNS (real run), GPU_SUITE_COMPILE=1 (compile in the dry
# run), SERVE_HTTP=1 (HTTP server run in the dry run), SERVE_BACKEND (default torch).
# Exit status: 0 when no step errored (skipped steps are fine), 1 otherwise; the report prints either way.
set -u

DRY=${DRY_RUN:-0}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$arg' (only --dry-run)" >&2; exit 2 ;;
    esac
done
case "$DRY" in 0|""|false|no) DRY=0 ;; *) DRY=1 ;; esac

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-benchmarks/gpu_results}
STEPS=${STEPS:-train_world tensorrt serve train_nas}
BUDGET=${SUITE_BUDGET:-570}
FLAG=
[ "$DRY" = 1 ] && FLAG=--dry-run
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=offline YOLO_OFFLINE=1
mkdir -p "$OUT" || exit 2
HAVE_TIMEOUT=0
command -v timeout >/dev/null 2>&1 && HAVE_TIMEOUT=1

step_timeout() {  # default seconds for one step
    if [ -n "${STEP_TIMEOUT:-}" ]; then echo "$STEP_TIMEOUT"; return; fi
    if [ "$DRY" = 1 ]; then echo 120; return; fi
    case "$1" in train_world) echo 240 ;; tensorrt) echo 200 ;; *) echo 150 ;; esac
}

mark() {  # mark STEP STATUS REASON: a result file for a step that wrote none
    "$PYTHON" benchmarks/gpu_bench.py mark --out "$OUT/$1.json" --status "$2" --reason "$3" 2>/dev/null \
        || printf '{"step": "%s", "status": "%s", "reason": "see %s.log", "rows": []}\n' "$1" "$2" "$1" >"$OUT/$1.json"
}

SECONDS=0
echo "gpu_suite: python $PYTHON, results in $OUT, steps: $STEPS$([ "$DRY" = 1 ] && echo ' (dry run)')" >&2
for step in $STEPS; do
    rm -f "$OUT/$step.json"
    limit=$(step_timeout "$step")
    left=$(( BUDGET - SECONDS - 15 ))  # 15 s kept for the report
    if [ "$left" -lt 20 ]; then
        mark "$step" skipped "the suite's time budget (SUITE_BUDGET=$BUDGET s) was spent before this step"
        echo "gpu_suite: step $step SKIPPED (time budget spent)" >&2
        continue
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t0=$SECONDS
    if [ "$HAVE_TIMEOUT" = 1 ]; then
        timeout -k 10 "$limit" "$PYTHON" benchmarks/gpu_bench.py "$step" --out "$OUT/$step.json" $FLAG >"$OUT/$step.log" 2>&1
    else
        "$PYTHON" benchmarks/gpu_bench.py "$step" --out "$OUT/$step.json" $FLAG >"$OUT/$step.log" 2>&1
    fi
    rc=$?
    if [ $rc -ne 0 ] || [ ! -s "$OUT/$step.json" ]; then
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            why="timed out after $limit s"
        else
            why="exit $rc: $(grep -v '^[[:space:]]*$' "$OUT/$step.log" | tail -n 1 | cut -c1-300)"
        fi
        mark "$step" error "$why"
        echo "gpu_suite: step $step FAILED ($why); log: $OUT/$step.log" >&2
    elif grep -q '^{"step": "[^"]*", "status": "error"' "$OUT/$step.json"; then
        echo "gpu_suite: step $step ran in $(( SECONDS - t0 )) s with an ERROR in a figure (see the table)" >&2
    else
        echo "gpu_suite: step $step done in $(( SECONDS - t0 )) s" >&2
    fi
done
"$PYTHON" benchmarks/gpu_bench.py report --results "$OUT" --steps "$(echo $STEPS | tr ' ' ',')" --wall-s "$SECONDS" $FLAG
