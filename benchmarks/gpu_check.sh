#!/usr/bin/env bash
# One-shot accelerator check of vcp-jax: about 10 minutes on one H100/H200 from a fresh checkout.
#
#   bash benchmarks/gpu_check.sh            # on the GPU (or TPU) machine
#   bash benchmarks/gpu_check.sh --smoke    # tiny shapes on any machine (a 2-core CPU: 3-8 min)
#
# It uses the JAX already installed where it runs (any recent version: nothing here is tied to
# the 0.10.2 of requirements.txt) and installs the CUDA or TPU build only when the installed JAX
# has no accelerator backend and one is present. Python packages the machine lacks travel as
# wheels in .whl/ (or $VCP_WHEELS): they are installed with --no-index into a temporary folder on
# PYTHONPATH. Without tensorflow-datasets, grain, ... the real `pretrain.train_step` does not
# import and the check times the model step instead (same network, loss and SGD, no cloze); the
# table says which one each row is. benchmarks/gpu_wheels.sh downloads that set of wheels.
#
# Phases, each under its own time limit inside the total budget (GPU_CHECK_BUDGET_S, default
# 600 s): env (jax, jaxlib, CUDA and cuDNN versions; a warning on a cuDNN with a known problem:
# 9.10.2-9.15 3D-conv TF32, 9.11+ on pre-Ampere GPUs), precision (R3D's output on the GPU at
# default precision = TF32 and at 'highest' against the CPU's float32 output; the step time at
# float32 default / highest and bfloat16), the roofline projection (benchmarks/roofline.py),
# R3D's convolutions per conv_impl and in PyTorch (JAX issue #31662), the train step for C3D /
# R3D / R(2+1)D x float32 / bfloat16 x batch 8 / 64 with the native convolutions, the same with
# conv2d and conv2d_mm, the PyTorch reference R3D step, the training loop at the default
# data.num_threads, then one table with the projection beside the measurement. Every
# measurement is written to $GPU_CHECK_OUT/rows.jsonl as it is taken, so whatever a killed or
# crashed phase measured is still in the table. Exit status 0 unless the table cannot be made.
#
# Options: --smoke; environment GPU_CHECK_BUDGET_S, GPU_CHECK_OUT, PYTHON, VCP_WHEELS,
# GPU_CHECK_LARGE_BATCH (default 64).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=""
if [[ "${1:-}" == "--smoke" ]]; then SMOKE="--smoke"; fi
if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then sed -n '2,29p' "$0"; exit 0; fi

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-600}
DEADLINE=$((START + BUDGET))
OUT=${GPU_CHECK_OUT:-/tmp/vcp_gpu_check_$START}
mkdir -p "$OUT"
ROWS="$OUT/rows.jsonl"
: > "$ROWS"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Large batches of C3D in float32 need most of the GPU's memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
LARGE=${GPU_CHECK_LARGE_BATCH:-64}
log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# --- Python packages carried as wheels ------------------------------------------------------
WHEELS=${VCP_WHEELS:-.whl}
if [[ -z "$SMOKE" && -d "$WHEELS" ]] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  SITE="$OUT/site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$SITE"  # after the repo, after nothing the machine has
    log "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  else
    log "could not install the wheels in $WHEELS; going on without them"
  fi
fi

# --- JAX with an accelerator backend --------------------------------------------------------
backend() { timeout 120 "$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -1; }
BACKEND=$(backend)
if [[ -z "$SMOKE" && "$BACKEND" != "gpu" && "$BACKEND" != "tpu" ]]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    log "JAX backend is '${BACKEND:-none}' but a GPU is present: installing jax[cuda13]"
    timeout 240 "$PY" -m pip install -q -U "jax[cuda13]" || log "pip install failed (no network?)"
  elif [[ -e /dev/accel0 || -e /dev/vfio/0 ]]; then
    log "JAX backend is '${BACKEND:-none}' on a TPU host: installing jax[tpu]"
    timeout 240 "$PY" -m pip install -q -U "jax[tpu]" || log "pip install failed (no network?)"
  fi
  BACKEND=$(backend)
fi
log "JAX backend: ${BACKEND:-none (jax does not import)}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader 2>/dev/null

# --- phases ---------------------------------------------------------------------------------
# run_phase SECONDS_AT_MOST NAME ARGS...: the phase gets min(SECONDS, time left - 15 s for the
# report) and is told the deadline, so it stops starting work a little before it is killed.
run_phase() {
  local want=$1; shift
  local left=$((DEADLINE - $(date +%s) - 15))
  local limit=$(( want < left ? want : left ))
  if (( limit < 10 )); then log "skipping '$*': time budget spent"; return; fi
  log "phase $1 (at most ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m benchmarks.gpu_check "$@" \
    --rows "$ROWS" --deadline $(( $(date +%s) + limit - 5 )) $SMOKE
  local rc=$?
  (( rc != 0 )) && log "phase $1 ended with status $rc (its rows so far are kept)"
}

if [[ -n "$SMOKE" ]]; then
  # Code paths, not speed: XLA's backend optimisations off make the CPU compiles several times
  # faster.
  export XLA_FLAGS="--xla_backend_optimization_level=0 ${XLA_FLAGS:-}"
  run_phase 60 env
  run_phase 200 precision --archs r3d --batch_sizes 2
  run_phase 60 roofline --archs r3d --dtypes float32,bfloat16 --batch_sizes 2
  run_phase 90 convs --impls native,conv2d_mm --dtypes float32
  run_phase 120 steps --archs r3d --dtypes float32 --batch_sizes 2 --impls native,conv2d_mm
  run_phase 90 steps --archs c3d --dtypes bfloat16 --batch_sizes 4 --impls native --model_step
  run_phase 60 torch --dtypes float32 --batch_sizes 2
else
  run_phase 30 env
  # 0. The roofline projection to compare against: compiles on the host's CPU only, so it runs
  #    beside the GPU phases (its rows are in the table if it ends before the report), with JAX
  #    kept off the GPU (JAX_PLATFORMS=cpu: no second process preallocating GPU memory).
  ( JAX_PLATFORMS=cpu timeout --signal=TERM --kill-after=10 150 "$PY" -m benchmarks.gpu_check \
      roofline \
      --batch_sizes 8 --workers 4 --rows "$ROWS" --deadline $(( $(date +%s) + 140 )) \
      > "$OUT/roofline.log" 2>&1 || log "roofline phase ended with status $? ($OUT/roofline.log)" ) &
  ROOFLINE_PID=$!
  # 1. JAX issue #31662: are R3D's strided conv gradients slow on this GPU, per implementation?
  run_phase 90 convs --batch_sizes 8
  # 2. The paper's batch and a large one, the native convolutions (auto's choice on GPU/TPU).
  run_phase 170 steps --impls native --batch_sizes "8,$LARGE"
  # TF32: the GPU's output at default precision and at 'highest' against the CPU's; the step
  # time at float32 default / highest and bfloat16.
  run_phase 90 precision --archs r3d --batch_sizes 8
  # 3. The 2D-conv formulations against it: R3D first, then the others while time is left.
  run_phase 80 steps --archs r3d --impls conv2d,conv2d_mm --batch_sizes "8,$LARGE"
  run_phase 60 steps --archs c3d,r21d --impls conv2d_mm --batch_sizes 8
  # 4. The PyTorch reference R3D step on the same GPU.
  run_phase 40 torch --batch_sizes "8,$LARGE"
fi

# --- The training loop end to end ------------------------------------------------------------
# The real pretraining loop with the input pipeline at the default data.num_threads (what a user
# gets; configs/default.py), synthetic videos at the paper's 128x171 frames, generated and built
# first, against the same loop on fake data and the step alone: tuples/s, input-wait fraction,
# loop / step (benchmarks/loop.py).
CORES=$(nproc 2>/dev/null || echo 2)
THREADS=$(timeout 60 "$PY" -c 'from configs import default
print(default.get_config("r3d").data.num_threads)' 2>/dev/null | tail -1)
THREADS=${THREADS:-$CORES}
log "input threads: data.num_threads default $THREADS, host cores $CORES"
LOOP_CACHE="$OUT/loop_cache"
if [[ -n "$SMOKE" ]]; then
  loop_args=(--task pretrain --size tiny --width 4 --crop 24 --clip_len 8 --batch_size 4
             --steps 6 --threads "$THREADS" --prefetch 2)
  loop_limit=120
else
  loop_args=(--task pretrain --width 64 --crop 112 --batch_size "$LARGE" --dtype bfloat16
             --steps 30 --threads "$THREADS" --prefetch 2 --data_config split1)
  loop_limit=150
fi
left=$((DEADLINE - $(date +%s) - 15))
limit=$(( loop_limit < left ? loop_limit : left ))
if (( limit >= 30 )); then
  log "phase loop (at most ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m benchmarks.loop "${loop_args[@]}" \
    --cache "$LOOP_CACHE" --rows "$ROWS" || log "phase loop ended with status $? (skipped rows)"
else
  log "skipping the loop phase: time budget spent"
fi

if [[ -n "${ROOFLINE_PID:-}" ]]; then wait "$ROOFLINE_PID" 2>/dev/null; fi
log "report"
"$PY" -m benchmarks.gpu_check report --rows "$ROWS" | tee "$OUT/table.txt"
log "done in $(($(date +%s) - START))s; rows in $ROWS"
