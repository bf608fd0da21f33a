#!/usr/bin/env bash
# gpu_check.sh - the first minutes on a CUDA machine: is tinyr1 GPU-correct, how fast, how much memory?
#
#   1. tinyr1 doctor            environment + self-tests (compiled Triton kernels, NF4, liger,
#                               paged 8-bit AdamW, two GRPO steps on the GPU, measured vs planned memory)
#   2. tinyr1 bench kernels     per-token log-prob implementations at Qwen2.5-3B shapes
#   3. the tiny preset on the GPU: cold start + 20 GRPO steps + evaluation, through `tinyr1 train`
#      (bf16, Triton log-probs and liger where installed; the tiny model is written first, so the
#      memory planner sees the tiny model and not the 3B default)
#   4. the GPU-marked tests (CUDA-graph decode == eager decode, ...) and benchmarks/rollout.py at the
#      3B shapes in bf16: HF generate vs the sampler before issue #12 vs now (+ CUDA graphs)
#   5. tinyr1 bench --preset P --steps 2 for each GPU preset, at full size on a random checkpoint of
#      the 3B architecture (nothing is downloaded): seconds per phase and peak memory beside the plan
#
# Needs:  one NVIDIA GPU, CUDA torch, tinyr1 installed with bitsandbytes, decord and av (triton and
#         liger-kernel optional); ~10 GB of free disk for the random 3B checkpoint; no network.
#         Offline installs: benchmarks/README.md, "Installing on a GPU machine without a network".
# Takes:  at most BUDGET_S seconds (default 460, under 8 minutes): each step runs with what is left
#         of that budget and the summary says which were cut short; not yet timed on a GPU.
#
# Usage:  benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: gpu_check-DATE)
#         PRESETS="8gb 24gb" STEPS=2 BUDGET_S=900 CKPT=/data/random-3b benchmarks/gpu_check.sh out/
# Results in OUT_DIR: machine.txt, doctor.txt + doctor.json, kernels.txt, tiny.txt + tiny-run/
# (metrics.jsonl, eval.jsonl), gpu-tests.txt, rollout.txt, bench-<preset>.txt + .json, summary.txt. Paste the numbers into
# docs/BENCHMARKS.md with the machine and date. Exit status 1 when a step failed.
set -uo pipefail

OUT=${1:-gpu_check-$(date +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-460}
STEPS=${STEPS:-2}
TINY_STEPS=${TINY_STEPS:-20}
# tightest first: in order of the planner's share of the card (8gb 75%, 12gb 71%, 24gb 67%, 16gb 60%)
PRESETS=${PRESETS:-"8gb 12gb 24gb 16gb"}
export COLUMNS=${COLUMNS:-200} PYTHONUNBUFFERED=1  # rich wraps at 80 columns when not on a terminal
unset TRITON_INTERPRET  # the tests' Triton interpreter must not run here

if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA GPU visible (torch.cuda.is_available() is False); on a CPU run \`tinyr1 doctor\`" >&2
    exit 1
fi
TINYR1=(tinyr1)
command -v tinyr1 >/dev/null || TINYR1=(python3 -m tinyr1)  # a checkout on PYTHONPATH, not installed
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ckpt=${CKPT:-$work/random-3b}
deadline=$((SECONDS + BUDGET_S))
failed=0
: > "$OUT/summary.txt"

run_step() {  # run_step NAME LIMIT_S COMMAND...: output to $OUT/NAME.txt, one line to summary.txt
    local name=$1 limit=$2 left=$((deadline - SECONDS)) capped=0 t0=$SECONDS rc status note=""
    shift 2
    if ((left < 20)); then
        printf '%-14s %-8s %5ss  %s\n' "$name" skipped 0 "time budget spent" | tee -a "$OUT/summary.txt"
        return 0
    fi
    if ((limit > left)); then limit=$left capped=1; fi
    [ "$1" = tinyr1 ] && set -- "${TINYR1[@]}" "${@:2}"
    echo "== $name: $*  [limit ${limit}s]"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    if ((rc == 0)); then status=ok
    elif (((rc == 124 || rc == 137) && capped)); then status=stopped note="the time budget ran out after ${limit}s"
    elif ((rc == 124 || rc == 137)); then status=timeout note="over its ${limit}s limit" failed=1
    else status=failed note="exit $rc, see $name.txt" failed=1
    fi
    printf '%-14s %-8s %5ss  %s\n' "$name" "$status" "$((SECONDS - t0))" "$note" | tee -a "$OUT/summary.txt"
}

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    git rev-parse --short HEAD 2>/dev/null || true
    echo "budget ${BUDGET_S}s, presets: $PRESETS, steps $STEPS, tiny steps $TINY_STEPS"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

run_step doctor 150 tinyr1 doctor --json "$OUT/doctor.json"
run_step kernels 120 tinyr1 bench kernels --repeats 3
run_step tiny-init 60 tinyr1 init-tiny "$work/tiny/model"
# The tiny preset moved to the GPU: device cuda, and the GPU paths it turns off for the CPU demo
# (fp32 -> bf16, torch -> Triton log-probs, liger off -> auto); smaller data so the clips are quick.
run_step tiny 150 tinyr1 train --preset tiny --set model.device=cuda --set model.dtype=auto \
    --set model.kernels=auto --set model.liger=auto --set model.path="$work/tiny/model" \
    --set data.train="$work/tiny/data/train.jsonl" --set data.eval="$work/tiny/data/eval.jsonl" \
    --set data.coldstart="$work/tiny/data/coldstart.json" --set data.video_root="$work/tiny/data" \
    --set data.synth_n=400 --set data.synth_eval_n=100 --set train.eval_limit=100 \
    --set train.steps="$TINY_STEPS" --set train.output_dir="$OUT/tiny-run" --set log.progress=false
run_step gpu-tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/
run_step rollout 150 python3 benchmarks/rollout.py --device cuda --dtype bf16 --hidden 2048 --layers 36 \
    --heads 16 --kv-heads 2 --new-tokens 128 --reps 2 --cuda-graphs
for preset in $PRESETS; do
    # one random 3B checkpoint (bf16, ~7 GB) is written by the first bench and reused by the others
    run_step "bench-$preset" 240 tinyr1 bench --preset "$preset" --steps "$STEPS" --checkpoint-dir "$ckpt" \
        --json "$OUT/bench-$preset.json"
done
# the two LoRA backends side by side (docs/BENCHMARKS.md, "LoRA backends"), where unsloth is installed
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('unsloth') is None)"; then
    run_step "bench-24gb-backends" 480 tinyr1 bench --preset 24gb --backends peft,unsloth --steps "$STEPS" \
        --checkpoint-dir "$ckpt" --json "$OUT/bench-24gb-backends.json"
fi

echo "== summary ($((SECONDS))s; results in $OUT/)"
cat "$OUT/summary.txt"
exit "$failed"
