#!/usr/bin/env bash
# One prepared device session for the CUDA provider (issue #7), to run as the LAST call of
# ../shared/gpu/README.md's sequence, after unpack.sh, from the project root:
#
#   source .gpu/unpack.sh && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 && bash benchmarks/gpu_session.sh
#
# Budget: about 8 minutes of a 15-minute device session. Every step has its own timeout and
# writes under $OUT, so a slow step costs its share only. Not yet run on a GPU.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import onnxruntime as ort
from gconv_rewrite import runtime
print("onnxruntime", ort.__version__, ort.get_available_providers())
choice = runtime.choose_provider("auto")
print("provider:", choice.name, "-", choice.note, "| device:", runtime.device_name(choice))
PY
# 1. CUDA calibration: a small grid (cuDNN's EXHAUSTIVE search makes each first run slow)
timeout 200 python3 benchmarks/calibrate.py --provider cuda --count 80 --model-like 30 --rounds 7 \
    --csv "$OUT/cuda_calibration.csv" --profile "$OUT/cuda.json" 2>&1 | tail -5 | tee "$OUT/calibrate.txt"
# 2. held-out accuracy on every 3rd geometry, judged with the profile just fitted
cp "$OUT/cuda.json" gconv_rewrite/profiles/cuda.json 2>/dev/null
timeout 120 python3 benchmarks/cost_accuracy.py --provider cuda --every 3 --rounds 7 \
    --out "$OUT/cost_accuracy_cuda.csv" 2>&1 | tail -6 | tee "$OUT/accuracy.txt"
# 3. the float32 parity limit on CUDA (TF32 off)
timeout 90 python3 benchmarks/parity_evidence.py --provider cuda --seeds 2 2>&1 | tee "$OUT/parity.txt"
# 4. end to end: samples and ResNeXt-50 layouts on CUDA
timeout 90 python3 benchmarks/end_to_end.py --provider cuda --rounds 10 2>&1 | tee "$OUT/end_to_end.txt"
