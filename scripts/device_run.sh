#!/usr/bin/env bash
# Device driver for the SGLang backend (run from the repo root on the GPU machine). Two calls, each within
# the machine's 30 s warm window of the last (the kit and the caches together exceed one call's 64 MiB):
#     run(command="STEPS=install bash scripts/device_run.sh", carry=[".whl"])
#     run(command="STEPS='marlin engine modes bench' bash scripts/device_run.sh", carry=[".kitcache"])
# Real model (Qwen2.5-Coder-0.5B, scripts/accept_real.py stage): eight calls, one chunk each, within the warm
# window: run(command="STEPS=stage bash scripts/device_run.sh", carry=[".stage/cNN"]); then STEPS='assemble real'.
# Rollout benchmark (issue 10): after stage/assemble and pydeps, STEPS=rollout ROLLOUT_MODES=no-sd,rtn (a call
# is <= 10 min; one JSON per call), then STEPS=replay (merges the real JSONs; Qwen2.5-7B shapes).
# er-train (issue 11): bash scripts/stage_pydeps.sh here; there STEPS=pydeps twice (carry .pydeps/c0, then
# .pydeps/c1: Ray in two halves, omegaconf, prompt files), then STEPS=train TRAIN_MODES=no-sd (one mode per
# call: a call is <= 10 min) and STEPS=train_resume (SIGKILL after a checkpoint, resume=auto).
# install: the kit (.whl, built by ../shared/device-kit/build.sh with SLIM=1 FLASHINFER=1) into /tmp/site
# and an import check of the worker. Other steps restore the prebuilt JIT caches (.kitcache/*.tgz, copied
# from ../shared/device-kit/cache) on first use, run within LIMIT seconds and leave in $OUT: logs and
# res.tgz (JSON results).
set -u
export PYTHONUNBUFFERED=1 TVM_FFI_CACHE_DIR=/tmp/jitcache PATH=/opt/torch/.venv/bin:$PATH
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/res /tmp/jitcache
STEPS=${STEPS:-marlin engine modes bench}
LIMIT=${LIMIT:-570}
t0=$(date +%s)
el() { echo "[t=$(( $(date +%s) - t0 ))s] $*"; }
left() { local l=$(( LIMIT - ($(date +%s) - t0) )); [ "$l" -lt 5 ] && l=5; echo "$l"; }
lim() { local l=$(( $(left) - $1 )); [ "$l" -lt 5 ] && l=5; echo "$l"; }  # seconds left minus a margin, >= 5
export PYTHONPATH=/tmp/site:$PWD ER_GPU_RESULTS=/tmp/res

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tail -2
    el "kit installed"
fi
# torch_memory_saver 0.0.10 (cu12/cu13 hooks) for SGLang's memory-saving sleep/wake; .whl is full, so it travels
# in .kitcache (docs/reproducibility.md gives the pip download command)
ls .kitcache/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .kitcache/*.whl 2>&1 | tail -2 && el "extra wheels: $(ls .kitcache/*.whl | xargs -n1 basename)"
# torch_memory_saver's preload hook (SGLang puts it on its schedulers' LD_PRELOAD) needs libcudart.so.13 on the
# loader's path and has no RPATH: unresolved, the loader skips it (sleep frees nothing) or the scheduler fails
preload_ok() { local o; o=$(LD_PRELOAD=$1 python3 -c 0 2>&1) && ! echo "$o" | grep -q "preloaded"; }
tms=$(ls /tmp/site/torch_memory_saver_hook_mode_preload_cu13*.so 2>/dev/null | head -n 1)
if [ -n "$tms" ] && ! preload_ok "$tms"; then
    cudart=$(find /opt/torch/.venv /usr/local/cuda/ -name 'libcudart.so.13*' 2>/dev/null | head -n 1)
    [ -n "$cudart" ] && export LD_LIBRARY_PATH=$(dirname "$cudart"):${LD_LIBRARY_PATH:-}
    preload_ok "$tms" && ok=yes || ok=no
    el "torch_memory_saver hook: libcudart.so.13 from ${cudart:-nowhere}; preload now works: $ok"
fi
if [ -d .kitcache ] && [ ! -f /tmp/.caches_restored ]; then
    tar xzf .kitcache/tvmffi-*.tgz -C /tmp && mkdir -p ~/.cache && tar xzf .kitcache/flashinfer-*.tgz -C ~/.cache \
        && touch /tmp/.caches_restored && el "JIT caches restored: $(ls /tmp/jitcache | wc -l) tvm-ffi modules"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# result files are named for the GPU that produced them (a call may get an H100 or an H200)
GPU=$(python3 -c "from er_sglang.calibrate import gpu_name, gpu_slug; print(gpu_slug(gpu_name()))" 2>/dev/null)
GPU=${GPU:-gpu}

pt() {  # pt NAME FILE [CAP_S [PYTEST_ARGS...]]: one pytest process per call (an engine failure kills its process)
    local name=$1 file=$2 cap=${3:-} lim rc; lim=$(left); [ -n "$cap" ] && [ "$cap" -lt "$lim" ] && lim=$cap
    shift $(( $# < 3 ? $# : 3 ))
    timeout "$lim" python3 -m pytest -p no:cacheprovider -q -s -m gpu -rA "$file" "$@" > "$OUT/pytest_$name.log" 2>&1
    rc=$?; el "pytest $name rc=$rc"
    grep -E "PASS|FAIL|ERROR|passed|failed|error|Error" "$OUT/pytest_$name.log" | tail -n 25 | cut -c1-400
}
bench() {  # bench BACKEND: plain SGLang once, then one SD engine per variant of BENCH_VARIANTS (default marlin);
    # BENCH_TAG names a run whose BENCH_ARGS differ (e.g. --sglang enable_torch_compile=true) so it keeps its own file
    local tag=$1; [ -n "${BENCH_VARIANTS:-}" ] && tag=$1_variants; [ -n "${BENCH_TAG:-}" ] && tag=$1_$BENCH_TAG
    python3 scripts/bench_step.py make --model /tmp/q7 > "$OUT/bench_$tag.log" 2>&1
    local blim=$(( $(left) - 15 - ${BENCH_LEAVE:-0} ))
    timeout "$(( blim + 45 ))" python3 scripts/bench_step.py run --model /tmp/q7 --limit-s "$blim" --backend "$1" \
        --variants "${BENCH_VARIANTS:-marlin}" --json "/tmp/res/bench_step_${GPU}_$tag.json" ${BENCH_ARGS:-} \
        >> "$OUT/bench_$tag.log" 2>&1
    el "bench $tag rc=$?"; grep -E "^(\[[0-9]+/[0-9]+ points, [0-9]+/[0-9]+ s\] )?(SD|AR) " "$OUT/bench_$tag.log" \
        | cut -c1-280 | tail -n 70
    grep -m8 -E "Error|error|Traceback" "$OUT/bench_$tag.log" | cut -c1-300
}
profile() {  # profile BACKEND: torch-profiler traces of SD (B x gamma) and plain SGLang, summarized
    python3 scripts/bench_step.py make --model /tmp/q7 > "$OUT/profile_$1.log" 2>&1
    timeout "$(left)" python3 scripts/bench_step.py profile --model /tmp/q7 --backend "$1" --trace-dir /tmp/traces \
        --json "/tmp/res/profile_${GPU}_$1.json" ${PROFILE_ARGS:-} >> "$OUT/profile_$1.log" 2>&1
    el "profile $1 rc=$?"; grep -E "^PROFILE" "$OUT/profile_$1.log" | cut -c1-400
    grep -m8 -E "Error|error|Traceback" "$OUT/profile_$1.log" | cut -c1-300
    (cd /tmp/traces && find . -name "*_b1[-_]*trace.json.gz" -size -7M | head -4 | tar czf "$OUT/traces_$1.tgz" -T -)
}
# er-train steps: the experiment files' folder and the prompt file (TRAIN_DATA= for a config's own data)
TRAIN_CFG=${TRAIN_CFG:-configs/experiments/qwen2.5-coder-0.5b}
TRAIN_DATA=${TRAIN_DATA-data.train=/tmp/pydeps/gsm8k_train.jsonl}
roof() {  # roof NAME: spec.roofline=<this GPU's calibration of NAME>, measured on this machine or committed; a
    # "preliminary" fit (meta.status) is skipped: it predates the worker's gamma = 0 fix and would make the
    # roofline-driven modes decode plainly
    local f; for f in "/tmp/res/${GPU}_tp1_$1.json" "configs/roofline/${GPU}_tp1_$1.json"; do
        [ -f "$f" ] && ! grep -q '"status": *"preliminary' "$f" && { echo "spec.roofline=$f"; return; }; done
    el "roof $1: no final ${GPU} calibration; the experiment file's roofline decides" >&2
}
raystop() {  # a run killed by timeout/SIGKILL leaves Ray's daemons: the next run must start clean
    pkill -9 -f "ray/core/src/ray" 2>/dev/null; pkill -9 -f "ray::" 2>/dev/null; pkill -9 -f sglang 2>/dev/null; sleep 2
}
for s in $STEPS; do
    case $s in
        install) timeout 120 python3 -c "import sglang.srt.managers.scheduler; import er_sglang.sglang.worker, \
er_sglang.sglang.plugin as p; p.register('all'); print('worker imports ok')" 2>&1 | tail -n 15 ;;
        marlin) pt marlin tests/gpu/test_marlin_int4.py ;;
        int4k)  pt int4k tests/gpu/test_int4_kernels.py "${INT4K_CAP:-}" ;;  # spec.draft_kernel: marlin, tinygemm, gemlite
        dhead)  pt dhead tests/gpu/test_draft_head.py "${DHEAD_CAP:-}" ;;  # spec.draft_vocab / draft_head (4 engines)
        engine) pt engine tests/gpu/test_sglang_engine.py "${ENGINE_CAP:-}" ;;
        modes)  pt modes tests/gpu/test_sglang_modes.py "${MODES_CAP:-}" ;;
        sleep)  # memory-saving sleep/wake (torch_memory_saver from .kitcache) and per-request seeds, apart
                pt sleep tests/gpu/test_sglang_sleep_seed.py "${SLEEP_CAP:-}" -k memory_saver
                pt seeds tests/gpu/test_sglang_sleep_seed.py "${SEEDS_CAP:-}" -k seeds ;;
        bench)  # BENCH_VARIANTS='marlin,gemlite,marlin+head=int4,...': AR once, the SD time shared among variants
                bench "${BACKEND:-flashinfer}" ;;
        bench_triton) bench triton ;;
        profile) profile "${BACKEND:-flashinfer}" ;;
        gemv)   # int4/int8 weight-only GEMV kernels vs bf16 (scripts/bench_int4_gemv.py), budget <= GEMV_BUDGET s
                gb=$(( $(left) - 45 )); [ "$gb" -gt "${GEMV_BUDGET:-300}" ] && gb=${GEMV_BUDGET:-300}
                timeout "$(left)" python3 scripts/bench_int4_gemv.py --budget-s "$gb" ${GEMV_ARGS:-} \
                    --json "/tmp/res/bench_int4_gemv_$GPU.json" --png "$OUT/bench_int4_gemv_$GPU.png" > "$OUT/gemv.log" 2>&1
                el "gemv rc=$?"; grep -E "^device|^STEP M=.*(drafter_now|best_int4)|^GEMV .* skipped" "$OUT/gemv.log" | cut -c1-240
                grep -m12 -E "^GEMV .* error |Traceback" "$OUT/gemv.log" | cut -c1-240 ;;
        stage)  mkdir -p /tmp/stage && cp -r .stage/c* /tmp/stage/ && el "staged: $(ls /tmp/stage | tr '\n' ' ')" ;;
        assemble) python3 scripts/accept_real.py assemble --stage /tmp/stage --out /tmp/q05 > "$OUT/assemble.log" 2>&1
                el "assemble rc=$?"; tail -n 3 "$OUT/assemble.log" ;;
        real)   pt real tests/gpu/test_real_model.py "${REAL_CAP:-}" ;;
        pydeps) # Ray (two halves) + omegaconf + jsonschema + prompt files (scripts/stage_pydeps.sh); installs once whole
                mkdir -p /tmp/pydeps && cp -r .pydeps/c*/. /tmp/pydeps/ 2>/dev/null
                if [ -f /tmp/pydeps/ray.part0 ] && [ -f /tmp/pydeps/ray.part1 ] && [ ! -f /tmp/.pydeps_done ]; then
                    w=$(awk '{print $2}' /tmp/pydeps/ray.sha256)
                    cat /tmp/pydeps/ray.part0 /tmp/pydeps/ray.part1 > "/tmp/pydeps/$w"
                    (cd /tmp/pydeps && sha256sum -c ray.sha256) && python3 -m pip install -q --no-index --no-deps \
                        --no-compile --upgrade --target /tmp/site /tmp/pydeps/*.whl 2>&1 | tail -2 && touch /tmp/.pydeps_done
                    python3 -c "import ray, omegaconf; print('ray', ray.__version__, 'omegaconf', omegaconf.__version__)"
                fi
                el "pydeps: $(ls /tmp/pydeps | tr '\n' ' ') done=$([ -f /tmp/.pydeps_done ] && echo yes || echo no)" ;;
        train)  # issue 11: er-train on the staged 0.5B (/tmp/q05) per mode in TRAIN_MODES, GSM8K from pydeps. A call is
                # <= 10 min and 20 steps may not fit one: SIGTERM 100 s before the call's end (er-train finishes the
                # step and checkpoints within the 90 s before SIGKILL), and the next call with the same mode continues it (resume=auto) unless
                # TRAIN_FRESH=1. checkpoint.keep=1, and a finished run's checkpoints are deleted (7.6 GB each).
                for m in ${TRAIN_MODES:-no-sd}; do
                    # SIGKILL comes 90 s after SIGTERM: with < 200 s left a run could outlive the call (and its res.tgz)
                    [ "$(left)" -lt 200 ] && { el "train $m: $(left) s left, not started"; continue; }
                    d=/tmp/runs/$m; mkdir -p /tmp/res/train
                    if [ "${TRAIN_FRESH:-0}" = 1 ] || [ ! -d "$d/checkpoints" ]; then
                        rm -rf "$d"; args=("$TRAIN_CFG/$m.yaml" "run_dir=$d" logging.wandb=disabled $TRAIN_DATA)
                    else
                        args=("run_dir=$d" resume=auto)
                    fi
                    timeout -k 90 "$(lim 100)" setsid python3 -m orchestrator.cli "${args[@]}" \
                        checkpoint.keep=1 ${TRAIN_ARGS:-} >> "$OUT/train_$m.log" 2>&1
                    el "train $m rc=$?"; tail -n 28 "$OUT/train_$m.log" | cut -c1-250
                    cp "$d/metrics.jsonl" "/tmp/res/train/$m.jsonl" 2>/dev/null; raystop
                    grep -q "er-train: done" "$OUT/train_$m.log" && rm -rf "$d/checkpoints"
                done ;;
        train_resume) # SIGKILL the whole run once step RESUME_KILL_AFTER's checkpoint exists, then resume=auto.
                # RESUME_EXACT=1: deterministic inference (per-request seeds honored) and the same run uninterrupted
                # as the reference: train_report --resume-reference checks the resumed steps equal it
                # (RESUME_EXACT_ARGS replaces the deterministic-inference key, e.g. for a CPU rehearsal: seed=0)
                m=${RESUME_MODE:-argmax}; d=/tmp/runs/resume_$m; k=${RESUME_KILL_AFTER:-2}; rm -rf "$d"
                det=(); [ "${RESUME_EXACT:-0}" = 1 ] && det=(${RESUME_EXACT_ARGS:-sglang.enable_deterministic_inference=true})
                mkdir -p /tmp/res/train
                setsid python3 -m orchestrator.cli "$TRAIN_CFG/$m.yaml" "run_dir=$d" \
                    logging.wandb=disabled $TRAIN_DATA "checkpoint.every=$k" \
                    "train.num_steps=$(( k + 2 ))" "${det[@]}" ${TRAIN_ARGS:-} > "$OUT/resume_first.log" 2>&1 &
                pid=$!
                while kill -0 "$pid" 2>/dev/null && [ ! -f "$d/checkpoints/step_$(printf %06d "$k")/state.json" ] \
                    && [ "$(left)" -gt 120 ]; do sleep 2; done
                kill -9 -- "-$pid" 2>/dev/null; wait "$pid" 2>/dev/null; raystop
                el "killed after checkpoint step $k: $(ls "$d/checkpoints" 2>/dev/null | tr '\n' ' ')"
                cp "$d/metrics.jsonl" /tmp/res/train/resume_${m}_first.jsonl 2>/dev/null
                timeout "$(lim 20)" setsid python3 -m orchestrator.cli "run_dir=$d" resume=auto \
                    > "$OUT/resume_second.log" 2>&1
                el "resume rc=$?"; tail -n 12 "$OUT/resume_second.log" | cut -c1-250
                cp "$d/metrics.jsonl" /tmp/res/train/resume_${m}.jsonl 2>/dev/null; raystop; rm -rf "$d/checkpoints"
                if [ "${RESUME_EXACT:-0}" = 1 ]; then
                    r=/tmp/runs/resume_${m}_ref; rm -rf "$r"
                    timeout "$(lim 20)" setsid python3 -m orchestrator.cli "$TRAIN_CFG/$m.yaml" "run_dir=$r" \
                        logging.wandb=disabled $TRAIN_DATA "checkpoint.every=$k" "train.num_steps=$(( k + 2 ))" \
                        "${det[@]}" ${TRAIN_ARGS:-} > "$OUT/resume_reference.log" 2>&1
                    el "resume reference rc=$?"; cp "$r/metrics.jsonl" /tmp/res/train/resume_${m}_ref.jsonl 2>/dev/null
                    raystop; rm -rf "$r"
                fi ;;
        rollout) # issue 10 part real: the staged 0.5B (/tmp/q05 + its staged tokenizer), MATH levels 3-5 from
                # pydeps, 64 prompts x G 8, 4096 new tokens; ROLLOUT_MODES (comma-separated) per call, one JSON each.
                # No trainer shares the GPU here: 0.8 of it for weights + KV (512 x 4.3k tokens x 12 KiB = 26 GiB;
                # the experiment's 0.3 would retract requests on an H100), decode graphs up to B = 512
                tag=$(echo "${ROLLOUT_MODES:-no-sd}" | tr ',' '_')
                timeout "$(lim 15)" python3 scripts/bench_rollout.py real "$TRAIN_CFG/base.yaml" \
                    data.train=/tmp/pydeps/math_hard_train.jsonl data.prompts_per_step=64 sampling.max_new_tokens=4096 \
                    sglang.mem_fraction_static=0.8 sglang.cuda_graph_max_bs_decode=512 $(roof qwen2.5-coder-0.5b) \
                    ${ROLLOUT_OVERRIDES:-} --modes "${ROLLOUT_MODES:-no-sd}" --rollouts "${ROLLOUT_N:-3}" \
                    --json "/tmp/res/bench_rollout_real_$tag.json" > "$OUT/rollout_$tag.log" 2>&1
                el "rollout $tag rc=$?"; grep -E '^\{' "$OUT/rollout_$tag.log" | cut -c1-300
                grep -m8 -E "Error|error:|Traceback" "$OUT/rollout_$tag.log" | cut -c1-300 ;;
        replay) # issue 10 part replay_7b: Qwen2.5-7B shapes (random weights), part real's lengths and acceptance
                # (the real JSONs of earlier calls, merged; or REPLAY_FROM), ROLLOUT_MODES per call
                python3 scripts/bench_step.py make --model /tmp/q7 > /dev/null 2>&1
                src=${REPLAY_FROM:-/tmp/res/bench_rollout_real.json}
                if [ -z "${REPLAY_FROM:-}" ]; then  # this warm machine's real-part JSONs; a cold one needs REPLAY_FROM
                    reals=$(ls /tmp/res/bench_rollout_real_*.json 2>/dev/null)
                    [ -z "$reals" ] && { el "replay: no real-part JSON on this machine: pass REPLAY_FROM=docs/results/..."; continue; }
                    python3 scripts/bench_rollout.py merge --json "$src" $reals | tail -n 1
                fi
                tag=$(echo "${ROLLOUT_MODES:-no-sd}" | tr ',' '_')
                timeout "$(lim 15)" python3 scripts/bench_rollout.py replay "$TRAIN_CFG/base.yaml" \
                    model.path=/tmp/q7 sglang.load_format=dummy sglang.mem_fraction_static=0.8 \
                    sglang.cuda_graph_max_bs_decode=512 sglang.attention_backend="${BACKEND:-flashinfer}" \
                    $(roof qwen2.5-7b) ${ROLLOUT_OVERRIDES:-} --from "$src" \
                    --modes "${ROLLOUT_MODES:-no-sd}" --rollouts "${ROLLOUT_N:-3}" \
                    --json "/tmp/res/bench_rollout_replay_$tag.json" > "$OUT/replay_$tag.log" 2>&1
                el "replay $tag rc=$?"; grep -E '^\{' "$OUT/replay_$tag.log" | cut -c1-300
                grep -m8 -E "Error|error:|Traceback" "$OUT/replay_$tag.log" | cut -c1-300 ;;
        calibrate) # issue 12: er-calibrate per shape in CAL_SHAPES (configs/shapes/NAME, random weights), each
                # within CAL_BUDGET s of measuring -> /tmp/res/<gpu>_tp1_NAME.json (+ .png, .records.json)
                [ -n "${CAL_NAME:-}" ] && [ "$(echo ${CAL_SHAPES:-} | wc -w)" -gt 1 ] \
                    && { el "calibrate: CAL_NAME names one model dir; CAL_SHAPES has several"; continue; }
                for n in ${CAL_SHAPES:-qwen2.5-7b}; do  # a shape name, or a model dir (e.g. /tmp/q05, named CAL_NAME)
                    m="configs/shapes/$n"; [ -d "$n" ] && m=$n && n=${CAL_NAME:-$(basename "$n")}
                    cb=$(( $(left) - 90 )); [ "$cb" -gt "${CAL_BUDGET:-480}" ] && cb=${CAL_BUDGET:-480}
                    timeout "$(lim 10)" python3 -m er_sglang.calibrate --model "$m" \
                        --random-weights --name "$n" --budget-s "$cb" --backend "${BACKEND:-flashinfer}" --force \
                        --out "/tmp/res/${GPU}_tp1_$n.json" ${CAL_ARGS:-} > "$OUT/calibrate_$n.log" 2>&1
                    el "calibrate $n rc=$?"; tail -n 20 "$OUT/calibrate_$n.log" | cut -c1-250
                done ;;
    esac
done
tar czf "$OUT/res.tgz" -C /tmp res
ls -la "$OUT"; el done
