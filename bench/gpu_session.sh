#!/usr/bin/env bash
# The whole GPU check in one command: at most 8 minutes on one H100/H200, nothing needed outside the repository.
#
#   bash bench/gpu_session.sh             # OUT=./bench_out, BUDGET_S=480 (seconds for all lines together)
#   bash bench/gpu_session.sh --dry-run   # every line on the CPU at tiny shapes (tests/test_gpu_session.py)
#
# In order: (1) CUDA correctness: the GPU-marked tests, then train.py stage 1 -> stage 2 on the demo's tiny assets
# in bf16, padded and packed; (2) stage 1 at Vicuna-7B + CLIP-L/336 shapes, batch 16, 617 tokens, with and without
# activation checkpointing (batch 32 without it needs ~90 GB: more than an H100 has); (3) stage 2 at 7B layer shapes
# (8 layers), batch 16, 877 tokens; (4) stage 2 on the LLaVA-like length mix, padded vs packed (allocator segments
# that grow: lengths change every step); then stage 2 with all 32 layers where the card has >= 130 GiB.
# Lines (2) and (3) run the plain-transformers baseline (bench/hf_baseline.py) on the same micro-batches first.
# Every line runs under `timeout`, capped by what is left of the budget; once it is spent the rest are skipped.
#
# Writes: $OUT/results.jsonl  every JSON record the lines print, each tagged with its line's name
#         $OUT/steps.jsonl    one status record per line (ok / failed / timeout / skipped, exit code, seconds)
#         $OUT/session.log    everything the lines printed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
BUDGET_S=${BUDGET_S:-480}
PYTHON=${PYTHON:-python3}
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
mkdir -p "$OUT"
: >"$OUT/results.jsonl"
: >"$OUT/steps.jsonl"
: >"$OUT/session.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The length mix changes every tensor's size from step to step: growable segments keep the allocator from fragmenting
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

line() { # line NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 15)); then
        echo "{\"line\": \"$name\", \"status\": \"skipped\", \"reason\": \"budget spent\"}" >>"$OUT/steps.jsonl"
        return
    fi
    ((cap > left)) && cap=$left
    echo "=== $name (cap ${cap} s): $*" >>"$OUT/session.log"
    local t0=$SECONDS
    timeout -k 10 "$cap" "$@" >"$WORK/$name.out" 2>&1
    local rc=$?
    cat "$WORK/$name.out" >>"$OUT/session.log"
    grep '^{' "$WORK/$name.out" | sed "s/^{/{\"line\": \"$name\", /" >>"$OUT/results.jsonl"
    local status=ok
    if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
    echo "{\"line\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"cmd\": \"$*\"}" \
        >>"$OUT/steps.jsonl"
}

BENCH=("$PYTHON" bench/bench.py)
RUN=(--warmup 2 --steps 6)     # measured steps after warmup, fixed shapes
MIX=(--warmup 2 --steps 10)    # lengths vary per step: more steps
if ((DRY)); then
    RUN=(--tiny --warmup 1 --steps 1 --sim_world 2 --batch 4)
    MIX=("${RUN[@]}")
fi

# (1) CUDA correctness
line gpu_tests 150 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider -rs
# four train.py runs (imports, CUDA start-up, 4 steps, 2 background checkpoints and the final save each): ~240 s
line cuda_train 270 "$PYTHON" bench/cuda_check.py --work "$WORK/cuda_check"
# (2) stage 1, 7B + CLIP-L/336, batch 16, 1 + 576 + 40 = 617 tokens, with and without activation checkpointing
line stage1_ac 150 "${BENCH[@]}" --stage 1 --batch 16 --text 40 --gradient_checkpointing --baseline "${RUN[@]}"
line stage1_no_ac 150 "${BENCH[@]}" --stage 1 --batch 16 --text 40 --baseline "${RUN[@]}"
# (3) stage 2, 8 of Vicuna-7B's 32 layers, batch 16, 1 + 576 + 300 = 877 tokens
line stage2_8_layers 120 "${BENCH[@]}" --stage 2 --layers 8 --batch 16 --text 300 --gradient_checkpointing \
    --baseline "${RUN[@]}"
# (4) stage 2 on the LLaVA-665K-like mix, padded vs packed (the same micro-batches: the losses must match)
line stage2_mix_padded 90 "${BENCH[@]}" --stage 2 --layers 8 --batch 16 "${MIX[@]}"
line stage2_mix_packed 90 "${BENCH[@]}" --stage 2 --layers 8 --batch 16 --packing "${MIX[@]}"
# stage 2 with all 32 layers (about 108 GB of fp32 weights, gradients and Adam state) on a 141 GB card
MEM_GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
MEM_GIB=$(((${MEM_GIB:-0} + 0) / 1024))
if ((DRY || MEM_GIB >= 130)); then
    line stage2_32_layers 180 "${BENCH[@]}" --stage 2 --layers 32 --batch 16 --text 300 --gradient_checkpointing \
        --baseline "${RUN[@]}"
else
    echo "{\"line\": \"stage2_32_layers\", \"status\": \"skipped\", \"reason\": \"${MEM_GIB} GiB card\"}" \
        >>"$OUT/steps.jsonl"
fi

echo "gpu_session: $((SECONDS - START)) s; statuses in $OUT/steps.jsonl, records in $OUT/results.jsonl"
cat "$OUT/steps.jsonl"
