#!/usr/bin/env bash
# The GPU checks of fcos-offline on a bare NVIDIA machine that has PyTorch (with CUDA) but no network.
#
#   bench/gpu-check.sh OUT_DIR
#
# 1. Makes the project importable without installing it (PYTHONPATH=src) and installs what else
#    it needs from wheels placed in bench/wheels/ (no index is contacted). Fetch them on a machine
#    with a network, for the GPU machine's Python (e.g. 3.12), with:
#      pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#        -d bench/wheels faster-coco-eval rich matplotlib pytest pluggy iniconfig onnxscript ...
#    (the script names whatever is still missing and stops before running anything).
# 2. Runs the GPU-marked tests (tests/test_gpu.py: device NMS and input conversion bit-identical to the
#    CPU's; online and compiled fp32 mAP equal to the CPU's on the demo, fp16/bf16 within 0.1 point;
#    the compiled artifact reopening warm): OUT_DIR/gpu-tests.xml and .log.
# 3. Runs bench/gpu.py (FCOS-R50, 800x1333) with what time is left: OUT_DIR/gpu.json and .log.
# Everything stays within GPU_CHECK_SECONDS (default 360). Exit status: 0 when both steps passed.
set -u
OUT=${1:?usage: bench/gpu-check.sh OUT_DIR}
BUDGET=${GPU_CHECK_SECONDS:-360}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G "$HERE/wheels/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fcos-site "$HERE"/wheels/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/fcos-site"
fi
missing=$($PY - <<'EOF'
import importlib.util
need = ["torch", "numpy", "cv2", "onnx", "onnxruntime", "onnxscript", "faster_coco_eval", "rich", "matplotlib", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "missing Python modules: $missing (put their wheels in $HERE/wheels, see the top of this script)" | tee "$OUT/gpu-check.log"
    exit 1
fi
if ! $PY -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0)) if torch.cuda.is_available() else sys.exit('torch sees no CUDA device')" >"$OUT/gpu-check.log" 2>&1; then
    cat "$OUT/gpu-check.log"
    exit 1
fi
cat "$OUT/gpu-check.log"

left() { echo $((BUDGET - ($(date +%s) - START))); }
cd "$REPO" || exit 1
timeout "$(($(left) * 3 / 5))" $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
tests=${PIPESTATUS[0]}
budget=$(($(left) - 10))
if [ "$budget" -lt 60 ]; then
    echo "no time left for bench/gpu.py (${budget}s)" | tee -a "$OUT/gpu-check.log"
    exit 1
fi
timeout "$budget" $PY bench/gpu.py --output "$OUT/gpu.json" --images 256 --repeats 10 \
    --plan eager-fp32:1,8 compiled-fp16:1,8,32 compiled-fp32:8 compiled-bf16:8 2>&1 | tee "$OUT/gpu.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench, $(($(date +%s) - START)) s" | tee -a "$OUT/gpu-check.log"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
