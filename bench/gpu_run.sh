#!/usr/bin/env bash
# The GPU checks and the paper-regime preset, on a machine with its own Python and no network (see docs/gpu.md).
# Uses that machine's interpreter ($PYTHON, default python3): no venv, nothing from an index.
#
#   bash bench/gpu_run.sh stage gpu_bundle/partN   # one command per part (each with that part copied there)
#   bash bench/gpu_run.sh run [BUDGET]             # assemble + install the bundle, check imports, then `checks`
#   bash bench/gpu_run.sh checks [BUDGET]          # bench/gpu_check.py, then the preset (what `make gpu-check` runs)
#
# BUDGET: seconds for the preset, start-up included (default 360). Where $OUT is set (a directory the caller collects), the log
# and the results go there. Exit 1 when a check or the preset failed, 2 when the bundle is incomplete or an assumed
# package is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CMD=${1:-run}
BUDGET=${2:-${BUDGET:-360}}
RESULTS=${RESULTS_DIR:-runs/paper_regime}  # its checkpoints live here (GBs on a GPU); results.* are copied to $OUT
SITE=gpu_bundle/site

checks() {
    local rc=0 t0=$SECONDS
    echo "gpu_run: [1/2] bench/gpu_check.py (the checks that need a GPU; <= 2 minutes)"
    "$PY" bench/gpu_check.py 2>&1 | tee ${OUT:+"$OUT/gpu_check.txt"} || rc=1
    echo "gpu_run: gpu_check.py took $((SECONDS - t0)) s"
    t0=$SECONDS
    echo "gpu_run: [2/2] recipes/replicate/paper_regime.py --preset auto --budget-seconds $BUDGET --out $RESULTS"
    # the preset stops itself inside its budget; the timeout (SIGTERM: it writes what it has) is for a hang
    timeout -s TERM -k 20 $((${BUDGET%.*} + 60)) "$PY" recipes/replicate/paper_regime.py --preset auto \
        --budget-seconds "$BUDGET" --out "$RESULTS" || rc=1
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/paper_regime" && cp "$RESULTS"/results.json "$RESULTS"/results.md "$OUT/paper_regime/" || rc=1
    fi
    echo "gpu_run: the preset took $((SECONDS - t0)) s; results in $RESULTS${OUT:+ and $OUT/paper_regime} (exit so far: $rc)"
    return $rc
}

case "$CMD" in
    stage)
        [ $# -ge 2 ] || { echo "usage: bash bench/gpu_run.sh stage gpu_bundle/partN" >&2; exit 2; }
        "$PY" bench/gpu_bundle.py stage "$2" || exit 2
        ;;
    run)
        exec > >(tee ${OUT:+"$OUT/gpu_run.log"}) 2>&1
        t_all=$SECONDS
        "$PY" bench/gpu_bundle.py assemble || exit 2
        "$PY" bench/gpu_bundle.py install --target "$SITE" || exit 2
        export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
        export RELEX_GPU_CHECK_STRICT=1  # the bundle brought every requirement: a missing one fails, never skips
        export RELEX_REAL_MODEL_CACHE=${RELEX_REAL_MODEL_CACHE:-$PWD/gpu_bundle/smollm2-135m-instruct}
        "$PY" bench/gpu_bundle.py check || exit 2
        echo "gpu_run: bundle ready in $((SECONDS - t_all)) s"
        checks
        rc=$?
        echo "gpu_run: done in $((SECONDS - t_all)) s, exit $rc"
        exit $rc
        ;;
    checks)
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        checks
        ;;
    *)
        echo "usage: bash bench/gpu_run.sh stage gpu_bundle/partN | run [BUDGET] | checks [BUDGET]" >&2
        exit 2
        ;;
esac
