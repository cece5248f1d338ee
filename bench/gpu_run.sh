#!/usr/bin/env bash
# The device check on a GPU machine (docs/gpu.md): its own Python ($PYTHON, default python3), no venv; with
# `run`, no network either (the wheels it lacks come in gpu_bundle/partN, written by `make gpu-bundle`).
#
#   bash bench/gpu_run.sh plan [TOTAL] [--bundle]       # the time plan (any machine); exit 1 if it does not fit
#   bash bench/gpu_run.sh stage gpu_bundle/partN        # one command per part but the last (15 s each, in the plan)
#   bash bench/gpu_run.sh run [TOTAL]                   # stage the last part, install the bundle, every check, the preset
#   bash bench/gpu_run.sh checks [TOTAL]                # every check and the preset, nothing installed (`make gpu-check`)
#
# TOTAL: seconds for everything, the stage commands before `run` included (default 600). Every part runs under its
# own timeout (bench/gpu_check.py); the preset gets what is left. Results: $OUT/gpu_check.json (else
# runs/gpu_check.json), $OUT/gpu_run.log, $OUT/paper_regime/results.{json,md}. Exit 1 when a part failed, 2 when the
# plan does not fit or a stage command failed. PRESET_BUDGET=N (`checks`): at most N seconds for the preset.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CMD=${1:-run}
TOTAL=${2:-${TOTAL:-600}}
export RESULTS_DIR=${RESULTS_DIR:-runs/paper_regime}  # the preset's checkpoints live here (GBs on a GPU)

case "$CMD" in
    plan)
        "$PY" bench/gpu_check.py --dry-run --total "$TOTAL" ${3:+"$3"}
        ;;
    stage)
        [ $# -ge 2 ] || { echo "usage: bash bench/gpu_run.sh stage gpu_bundle/partN" >&2; exit 2; }
        timeout -k 5 10 "$PY" bench/gpu_bundle.py stage "$2" || exit 2
        ;;
    run)
        exec > >(tee ${OUT:+"$OUT/gpu_run.log"}) 2>&1
        export RELEX_GPU_CHECK_STRICT=1  # the bundle brought every requirement: a missing one fails, never skips
        export RELEX_REAL_MODEL_CACHE=${RELEX_REAL_MODEL_CACHE:-$PWD/gpu_bundle/smollm2-135m-instruct}
        "$PY" bench/gpu_check.py --bundle --total "$TOTAL"
        ;;
    checks)
        "$PY" bench/gpu_check.py --total "$TOTAL" ${PRESET_BUDGET:+--preset-budget "$PRESET_BUDGET"}
        ;;
    *)
        echo "usage: bash bench/gpu_run.sh plan [TOTAL] [--bundle] | stage gpu_bundle/partN | run [TOTAL] | checks [TOTAL]" >&2
        exit 2
        ;;
esac
