#!/usr/bin/env bash
# One prepared device session for the CUDA provider (issues 7 and 17), to run as the LAST call of
# ../shared/gpu/README.md's sequence, after unpack.sh, from the project root:
#
#   source .gpu/unpack.sh && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 && bash benchmarks/gpu_session.sh
#
# Dry run here, on the CPU provider with tiny sizes (the same steps, files and failure handling):
#
#   GPU_SESSION_DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_session.sh
#
# Budget: about 8 minutes of a 15-minute device session. Every step has a time limit and writes
# under $OUT as it goes: calibration stops measuring in time (--budget-s, and on SIGTERM) and fits
# what was measured, so a slow GPU still leaves a profile. A failed step is named on stderr and in
# $OUT/FAILED.txt, a step whose input is missing is not run on a substitute (no accuracy of the
# uncalibrated prior), and the script exits non-zero. Settings (TF32, cuDNN) are in each report.
set -uo pipefail
export PYTHONUNBUFFERED=1  # every log line reaches $OUT as it is printed, even if a step is killed
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
rm -f "$OUT/FAILED.txt"
if [ "${GPU_SESSION_DRY_RUN:-0}" = 1 ]; then
    PROVIDER=cpu
    CALIBRATE=(--tiny 40 --rounds 3 --no-wait --budget-s "${CAL_BUDGET:-25}"); CAL_LIMIT=60
    ACCURACY=(--every 40 --rounds 3 --no-wait --budget-s 20); ACC_LIMIT=40
    PARITY=(--image 32 --seeds 1); PARITY_LIMIT=120
    E2E=(--rounds 3 --skip-resnext50); E2E_LIMIT=120
else
    PROVIDER=cuda
    CALIBRATE=(--count 80 --model-like 30 --rounds 7 --budget-s "${CAL_BUDGET:-170}"); CAL_LIMIT=200
    ACCURACY=(--every 3 --rounds 7 --budget-s 100); ACC_LIMIT=120
    PARITY=(--seeds 2); PARITY_LIMIT=90
    E2E=(--rounds 10); E2E_LIMIT=90
fi
STEPS=${GPU_SESSION_STEPS:-"env calibrate accuracy parity end_to_end"}
FAILED=()

fail() {  # name, why: loud on stderr and in $OUT/FAILED.txt
    echo "STEP FAILED: $1: $2" | tee -a "$OUT/FAILED.txt" >&2
    FAILED+=("$1")
}

run_step() {  # name, time limit (s), command...: the full log in $OUT/<name>.txt, its tail here
    local name=$1 limit=$2 rc
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout -k 15 "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    tail -n 8 "$OUT/$name.txt"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        fail "$name" "ran past its ${limit}s limit (exit $rc); see $OUT/$name.txt"
    elif [ "$rc" -ne 0 ]; then
        fail "$name" "exit $rc; see $OUT/$name.txt"
    fi
    return "$rc"
}

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

PROFILE="$OUT/$PROVIDER.json"
if wanted env; then
    # The provider must really run here: a CUDA session that would fall back to CPU ends the session now.
    run_step env 120 python3 - "$PROVIDER" <<'PY'
import sys
import onnxruntime as ort
from gconv_rewrite import runtime
print("onnxruntime", ort.__version__, ort.get_available_providers())
from gconv_rewrite.errors import GconvError
try:
    choice = runtime.choose_provider(sys.argv[1])
except GconvError as exc:  # e.g. "--provider cuda: the CUDA provider does not run: ..."
    sys.exit(f"error: {exc}")
print("provider:", choice.name, "-", choice.note, "| device:", runtime.device_name(choice))
if choice.name == "cuda":
    print("timing settings:", runtime.settings_text("timing"), "| parity settings:", runtime.settings_text("parity"))
PY
    if [ "$?" -ne 0 ]; then
        echo "the $PROVIDER provider does not run: nothing else is measured" >&2
        exit 2
    fi
fi
if wanted calibrate; then
    run_step calibrate "$CAL_LIMIT" python3 benchmarks/calibrate.py --provider "$PROVIDER" "${CALIBRATE[@]}" \
        --csv "$OUT/${PROVIDER}_calibration.csv" --profile "$PROFILE"
fi
if wanted accuracy; then
    if [ -s "$PROFILE" ]; then  # judged with the profile just fitted, never the uncalibrated prior
        run_step accuracy "$ACC_LIMIT" python3 benchmarks/cost_accuracy.py --provider "$PROVIDER" "${ACCURACY[@]}" \
            --profile "$PROFILE" --out "$OUT/cost_accuracy_$PROVIDER.csv"
    else
        fail accuracy "no fitted profile at $PROFILE (calibration failed): not scored"
    fi
fi
if wanted parity; then
    run_step parity "$PARITY_LIMIT" python3 benchmarks/parity_evidence.py --provider "$PROVIDER" "${PARITY[@]}"
fi
if wanted end_to_end; then
    run_step end_to_end "$E2E_LIMIT" python3 benchmarks/end_to_end.py --provider "$PROVIDER" "${E2E[@]}"
fi
echo "== summary: $OUT"
ls -l "$OUT"
if [ "${#FAILED[@]}" -ne 0 ]; then
    echo "FAILED steps: ${FAILED[*]}" >&2
    exit 1
fi
echo "all steps passed"
