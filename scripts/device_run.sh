#!/usr/bin/env bash
# Device driver for the SGLang backend (run from the repo root on the GPU machine):
#     run(command="STEPS='marlin engine modes bench' bash scripts/device_run.sh", carry=[".whl", ".jit"])
# Installs the kit (.whl, built by ../shared/device-kit/build.sh), restores the tvm-ffi JIT cache
# from .jit/jitcache.tgz if carried, runs the selected steps within LIMIT seconds, and leaves in $OUT:
# logs, res.tgz (JSON results) and jitcache.tgz (when the cache grew).
set -u
export PYTHONUNBUFFERED=1 TVM_FFI_CACHE_DIR=/tmp/jitcache PATH=/opt/torch/.venv/bin:$PATH
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/res /tmp/jitcache
STEPS=${STEPS:-marlin engine modes bench}
LIMIT=${LIMIT:-580}
t0=$(date +%s)
el() { echo "[t=$(( $(date +%s) - t0 ))s] $*"; }
left() { local l=$(( LIMIT - ($(date +%s) - t0) )); [ "$l" -lt 5 ] && l=5; echo "$l"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD ER_GPU_RESULTS=/tmp/res
[ -f .jit/jitcache.tgz ] && tar xzf .jit/jitcache.tgz -C /tmp && el "jit cache restored: $(ls /tmp/jitcache | wc -l) modules"
jit_before=$(ls /tmp/jitcache | wc -l)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
el "kit installed"

pt() {  # pt NAME FILE [CAP_S]: one pytest process per file (an engine failure kills its process)
    local lim; lim=$(left); [ -n "${3:-}" ] && [ "$3" -lt "$lim" ] && lim=$3
    timeout "$lim" python3 -m pytest -p no:cacheprovider -q -s -m gpu -rA "$2" > "$OUT/pytest_$1.log" 2>&1
    el "pytest $1 rc=$?"; tail -n 25 "$OUT/pytest_$1.log" | grep -E "PASS|FAIL|ERROR|passed|failed|error" | cut -c1-300
}
for s in $STEPS; do
    case $s in
        marlin) pt marlin tests/gpu/test_marlin_int4.py ;;
        engine) pt engine tests/gpu/test_sglang_engine.py "${ENGINE_CAP:-}" ;;
        modes)  pt modes tests/gpu/test_sglang_modes.py ;;
        bench)
            python3 scripts/bench_step.py make --model /tmp/q7 > "$OUT/bench.log" 2>&1
            blim=$(( $(left) - 15 - ${BENCH_LEAVE:-0} ))
            timeout "$(( blim + 10 ))" python3 scripts/bench_step.py run --model /tmp/q7 --limit-s "$blim" \
                --json /tmp/res/bench_step_h100.json ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1
            el "bench rc=$?"; grep -E "^(SD|AR) " "$OUT/bench.log" | cut -c1-220 | tail -n 60
            grep -m5 -E "Error|error" "$OUT/bench.log" | cut -c1-300 ;;
    esac
done
tar czf "$OUT/res.tgz" -C /tmp res
[ "$(ls /tmp/jitcache | wc -l)" != "$jit_before" ] && tar czf "$OUT/jitcache.tgz" -C /tmp jitcache
ls -la "$OUT"; el done
