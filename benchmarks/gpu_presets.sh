#!/usr/bin/env bash
# Measure the GPU presets on a CUDA machine: K real GRPO steps of each preset on a random
# checkpoint of the 3B architecture (nothing is downloaded), peak memory and time per phase beside
# the planner's estimate, then the log-prob kernels. Results: $OUT/<preset>.json and .txt,
# $OUT/kernels.txt, $OUT/machine.txt; paste them into docs/BENCHMARKS.md with the machine and date.
#
#   OUT=results benchmarks/gpu_presets.sh                 # all four presets, 3 steps each
#   PRESETS="12gb 8gb" STEPS=2 OUT=results benchmarks/gpu_presets.sh
#
# The random 3B checkpoint (~7 GB, bf16) is written once and reused by every preset; set CKPT=DIR to
# keep it between invocations (otherwise it lives in a temp dir removed at the end).
set -uo pipefail

OUT=${OUT:-bench-results}
STEPS=${STEPS:-3}
PRESETS=${PRESETS:-"24gb 16gb 12gb 8gb"}
export COLUMNS=${COLUMNS:-200}  # rich wraps tables at 80 columns when not on a terminal

if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_presets.sh: no CUDA GPU visible (torch.cuda.is_available() is False)" >&2
    exit 1
fi
mkdir -p "$OUT"
if [ -n "${CKPT:-}" ]; then
    ckpt=$CKPT
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    ckpt=$tmp/random-3b
fi

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    git rev-parse --short HEAD 2>/dev/null || true
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

failed=()
for preset in $PRESETS; do
    echo "== tinyr1 bench --preset $preset --steps $STEPS"
    if ! tinyr1 bench --preset "$preset" --steps "$STEPS" --checkpoint-dir "$ckpt" \
            --json "$OUT/$preset.json" 2>&1 | tee "$OUT/$preset.txt"; then
        failed+=("$preset")
    fi
done

echo "== tinyr1 bench kernels"
if ! tinyr1 bench kernels 2>&1 | tee "$OUT/kernels.txt"; then
    failed+=("kernels")
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (see $OUT/*.txt)" >&2
    exit 1
fi
echo "results in $OUT/"
