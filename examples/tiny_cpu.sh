#!/usr/bin/env bash
# tiny_cpu.sh - the whole tinyr1 pipeline on any CPU:
#   synthetic videos -> data check -> cold start -> GRPO -> eval -> merge -> eval merged -> generate
#
# Needs:  tinyr1 installed (`pip install -e .` in the repository), any CPU, ~2 GB RAM,
#         ~100 MB of disk; no GPU, no network (the tiny model and the videos are generated here).
# Takes:  QUICK=1 (a smoke test with 2 cold-start + 2 GRPO steps; its numbers mean nothing):
#         6.5 minutes measured on a busy 2-core machine (less on an idle one). Default (40
#         cold-start + 60 GRPO steps of 8 prompts x 8 completions on 500 clips, evaluation on 200
#         held-out clips): an estimate of 30-60 minutes on 2 cores from the per-step times of the
#         quick run, about half of it GRPO; lower GRPO_STEPS / EVAL_N to go faster.
# Usage:  bash examples/tiny_cpu.sh [WORK_DIR]       (default: tiny_demo; it must not exist yet)
# Knobs (environment variables):
#   QUICK=1             smoke-test sizes
#   COLDSTART_STEPS=N   cold-start SFT steps (default 40; the tiny model learns the format fast)
#   GRPO_STEPS=N        GRPO steps (default 60)
#   TRAIN_N=N EVAL_N=N  synthetic training / held-out clips (default 500 / 200)
#   CUSTOM_REWARD=1     also train with examples/custom_reward.py:concise_think (weight 0.5)
set -euo pipefail

WORK="${1:-tiny_demo}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -e "$WORK" ]; then
  echo "$WORK already exists: remove it or pass another folder (bash examples/tiny_cpu.sh OTHER_DIR)" >&2
  exit 1
fi

if [ "${QUICK:-0}" = "1" ]; then
  COLDSTART_STEPS="${COLDSTART_STEPS:-2}"; GRPO_STEPS="${GRPO_STEPS:-2}"
  TRAIN_N="${TRAIN_N:-32}"; EVAL_N="${EVAL_N:-16}"
  EXTRA=(--set rollout.prompts_per_step=2 --set rollout.num_generations=4 --set train.micro_batch_size=8
         --set log.progress=false)
else
  COLDSTART_STEPS="${COLDSTART_STEPS:-40}"; GRPO_STEPS="${GRPO_STEPS:-60}"
  TRAIN_N="${TRAIN_N:-500}"; EVAL_N="${EVAL_N:-200}"
  EXTRA=()
fi
if [ "${CUSTOM_REWARD:-0}" = "1" ]; then
  # custom reward modules are imported only from the --config file's folder or --rewards-path
  EXTRA+=(--rewards-path "$HERE" --set "rewards.custom_reward:concise_think=0.5")
fi

echo "== 1. synthetic data: $TRAIN_N training clips, $EVAL_N held out, 64 cold-start clips"
tinyr1 data synth "$WORK/data" --n "$TRAIN_N" --eval-n "$EVAL_N" --seed 0
tinyr1 data check "$WORK/data/train.jsonl"

echo "== 2. cold start ($COLDSTART_STEPS steps) + GRPO ($GRPO_STEPS steps) on a tiny random checkpoint"
# The tiny preset creates the random checkpoint at model.path on first use.
tinyr1 train --preset tiny \
  --set model.path="$WORK/model" \
  --set data.train="$WORK/data/train.jsonl" \
  --set data.eval="$WORK/data/eval.jsonl" \
  --set data.coldstart="$WORK/data/coldstart.json" \
  --set data.video_root="$WORK/data" \
  --set coldstart.steps="$COLDSTART_STEPS" \
  --set train.steps="$GRPO_STEPS" \
  --set train.output_dir="$WORK/run" \
  "${EXTRA[@]}"

echo "== 3. evaluate the adapter on the held-out clips (greedy)"
# --prompt train: the tiny model only ever saw the training prompt (suffix on the question line);
# real checkpoints are evaluated with the default R1 evaluation prompt.
tinyr1 eval --model "$WORK/model" --adapter "$WORK/run/final" --data "$WORK/data/eval.jsonl" \
  --prompt train --max-new-tokens 48 --batch-size 16 --out "$WORK/eval/adapter.jsonl"

echo "== 4. merge the adapter (+ trained connector) into the base, original layout"
tinyr1 merge --base "$WORK/model" --adapter "$WORK/run/final" --out "$WORK/merged" --dtype fp32 \
  --eval "$WORK/eval/adapter.summary.json"

echo "== 5. evaluate the merged checkpoint: same accuracy as base + adapter"
tinyr1 eval --model "$WORK/merged" --data "$WORK/data/eval.jsonl" \
  --prompt train --max-new-tokens 48 --batch-size 16 --out "$WORK/eval/merged.jsonl"
python - "$WORK/eval" <<'PY'
import json, sys
a, m = (json.load(open(f"{sys.argv[1]}/{n}.summary.json")) for n in ("adapter", "merged"))
print(f"accuracy: base + adapter {a['accuracy']:.4f}, merged {m['accuracy']:.4f} (n = {a['n']})")
PY

echo "== 6. ask the merged model about one held-out clip (streamed)"
tinyr1 generate --model "$WORK/merged" --video "$WORK/data/videos/eval_00000.mp4" \
  --question "What colour is the square?" --options red green blue yellow \
  --prompt train --max-new-tokens 48

echo "done: run folder $WORK/run (metrics.jsonl, completions.jsonl, eval.jsonl), release $WORK/merged"
echo "curves: tinyr1 report $WORK/run"
