#!/usr/bin/env bash
# The offline GPU check (issue 18): install pti from the wheels in .whl/ without the network, then run
# benchmarks/gpu_check.py (kernel tests on CUDA, render and tuning rows into $OUT/gpu_check.json as they are
# measured, a time budget per stage, the whole within 9 minutes). Its docstring lists the stages.
#
#   mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/   # here, once: .whl/ is git-ignored; carry it along
#   bash benchmarks/gpu_check.sh                           # on the GPU machine (OUT=... names the results folder)
#   bash benchmarks/gpu_check.sh --cpu --no-install        # CPU mode on the tiny generator (CI: test_gpu_check.py)
#
# The GPU machine has torch, Triton, numpy, the scientific stack, onnx and onnxruntime, but not dlib,
# face-recognition-models or some of pti's CLI dependencies: pti is installed with --no-deps (nothing is
# resolved, so nothing is fetched), the carried wheels supply what it lacks (typer, safetensors, ...), and
# --no-index --no-build-isolation keep pip off the network (setuptools, the build backend, is already there).
# If the editable install fails, pti runs from the checkout (PYTHONPATH). Other options go to gpu_check.py.
set -u
START=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
install=1
args=()
for a in "$@"; do
    case $a in
        --no-install) install=0 ;;
        *) args+=("$a") ;;
    esac
done
if [ "$install" = 1 ]; then
    {
        pip="$PY -m pip install --no-index --no-deps --no-build-isolation --disable-pip-version-check"
        if ls .whl/*.whl >/dev/null 2>&1; then
            timeout 120 $pip .whl/*.whl || echo "gpu_check.sh: installing the wheels in .whl/ failed"
        else
            echo "gpu_check.sh: no wheels in .whl/ (copy ../shared/gpu-wheels/*.whl there); using what is installed"
        fi
        timeout 120 $pip -e . || echo "gpu_check.sh: pip install -e . failed; pti runs from the checkout"
    } >"$OUT/install.log" 2>&1
    tail -n 3 "$OUT/install.log"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT
exec "$PY" -m benchmarks.gpu_check --started "$START" --out "$OUT" ${args[@]+"${args[@]}"}
