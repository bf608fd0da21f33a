#!/usr/bin/env bash
# nextqa_24gb.sh - the TinyLLaVA-Video-R1 pipeline (arXiv 2504.09641) on ONE 24 GB GPU:
#   download base + NextQA -> data check -> cold start -> GRPO -> eval on a benchmark -> merge
#
# Needs:  one NVIDIA GPU with 24 GB (RTX 3090/4090, A10, L4), CUDA torch, tinyr1 installed,
#         `huggingface-cli` (pip install huggingface_hub), internet for the downloads,
#         ~80 GB of disk (base checkpoint ~8 GB, NextQA 0-30 s clips, checkpoints, the release),
#         ~32 GB of CPU RAM for the merge (bf16; it runs on the CPU).
# Takes:  downloads: depends on your link (tens of GB). data check: ~10-20 min (it decodes every
#         clip). Cold start: minutes. GRPO: the 24gb preset runs 8 prompts x 8 completions of up to
#         512 tokens per step, one epoch = 687 steps; its step time is not measured yet (the paper:
#         ~157 s/step on 8xA100 with full fine-tuning); plan on days, and use GRPO_STEPS to cut
#         the run short. Eval: ~1-2 s per question. Merge: ~5 min.
# Usage:  bash examples/nextqa_24gb.sh            (edit the paths below, or set them in the environment)
#         EVAL_FILE=mvbench.jsonl EVAL_VIDEO_ROOT=mvbench/ bash examples/nextqa_24gb.sh
# A stopped run continues with:  tinyr1 train --resume "$RUN"
set -euo pipefail

CKPT="${CKPT:-ckpt}"                       # where checkpoints are downloaded
DATA="${DATA:-datasets/r1}"                # NextQA training data (videos + JSONL)
RUN="${RUN:-runs/nextqa-24gb}"             # the training run folder
RELEASE="${RELEASE:-release/tinyllava-video-r1-lora}"
GRPO_STEPS="${GRPO_STEPS:-}"               # empty = one epoch over the 5,496 questions
EVAL_FILE="${EVAL_FILE:-}"                 # a benchmark in any tinyr1 format (see below)
EVAL_VIDEO_ROOT="${EVAL_VIDEO_ROOT:-}"
BASE="$CKPT/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512"

echo "== 1. the base checkpoint (TinyLLaVA-Video, Qwen2.5-3B + SigLIP + group resampler, bf16)"
if [ ! -f "$BASE/config.json" ]; then
  huggingface-cli download Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512 --local-dir "$BASE"
fi
# Alternative: start GRPO from the authors' cold-start model instead of running step 4 yourself:
#   huggingface-cli download Zhang199/TinyLLaVA-Video-Coldstart_NextQA_16 --local-dir "$CKPT/coldstart"
#   and use --set model.path="$CKPT/coldstart" (no cold start) in step 4 and --base "$CKPT/coldstart" in step 6.

echo "== 2. the training data: NextQA multiple choice, 0-30 s clips (5,496 questions)"
# From the dataset Zhang199/TinyLLaVA-Video-R1-training-data (the R1 authors' release; the clips
# are the NextQA subset of lmms-lab/LLaVA-Video-178K). After download (and unpacking any video
# archives) the folder must look like:
#   $DATA/nextqa_0-30s.jsonl          rows {"problem", "solution": "<answer>X</answer>", "video_filename": "./NextQA/NExTVideo/..."}
#   $DATA/nextqa-coldstart-16.json    16 hand-annotated <think>/<answer> examples (LLaVA style)
#   $DATA/NextQA/NExTVideo/...        the clips
if [ ! -f "$DATA/nextqa_0-30s.jsonl" ]; then
  huggingface-cli download --repo-type dataset Zhang199/TinyLLaVA-Video-R1-training-data --local-dir "$DATA"
fi
for f in "$DATA/nextqa_0-30s.jsonl" "$DATA/nextqa-coldstart-16.json"; do
  [ -f "$f" ] || { echo "missing $f: arrange $DATA as described above" >&2; exit 1; }
done

echo "== 3. check every row and decode every clip before a long run (exit code 1 lists bad rows)"
tinyr1 data check "$DATA/nextqa_0-30s.jsonl" --video-root "$DATA" --frames 16
tinyr1 data check "$DATA/nextqa-coldstart-16.json" --video-root "$DATA" --frames 16

echo "== 4. cold start (16 examples) + GRPO, LoRA r64 on the bf16 LLM (the 24gb preset has the room), connector trained"
# The cold start's lr is raised from the paper's 1e-5 (full fine-tuning) because only LoRA
# adapters train here; 16 examples at batch 4 = 4 steps, as in the paper.
STEPS_ARGS=()
[ -n "$GRPO_STEPS" ] && STEPS_ARGS=(--set train.steps="$GRPO_STEPS")
if [ -f "$RUN/config.toml" ]; then
  tinyr1 train --resume "$RUN"
else
  tinyr1 train --preset 24gb \
    --set model.path="$BASE" \
    --set data.train="$DATA/nextqa_0-30s.jsonl" \
    --set data.video_root="$DATA" \
    --set data.coldstart="$DATA/nextqa-coldstart-16.json" \
    --set coldstart.enabled=true --set coldstart.lr=2e-4 --set coldstart.batch_size=4 \
    --set train.output_dir="$RUN" \
    "${STEPS_ARGS[@]}"
fi
tinyr1 report "$RUN"

echo "== 5. evaluate on a benchmark (greedy, 16 frames, R1 evaluation prompt)"
# Any tinyr1 format works; the simplest is one JSON object per line:
#   {"id": "...", "video": "relative/or/absolute.mp4", "question": "...", "options": ["...", "..."],
#    "answer": "B", "category": "action_sequence"}
# (MVBench, Video-MME, MLVU and MMVU multiple-choice questions convert to this in a few lines.)
EVAL_ARGS=()
if [ -n "$EVAL_FILE" ]; then
  [ -n "$EVAL_VIDEO_ROOT" ] && EVAL_ARGS=(--video-root "$EVAL_VIDEO_ROOT")
  mkdir -p "$RUN/bench"
  tinyr1 eval --model "$BASE" --adapter "$RUN/final" --data "$EVAL_FILE" "${EVAL_ARGS[@]}" \
    --quant nf4 --batch-size 8 --max-new-tokens 1024 --out "$RUN/bench/preds.jsonl"
  EVAL_ARGS=(--eval "$RUN/bench/preds.summary.json")
else
  echo "(skipped: set EVAL_FILE=benchmark.jsonl to evaluate)"
fi

echo "== 6. merge LoRA + connector into the bf16 base (never into 4-bit weights) for release"
tinyr1 merge --base "$BASE" --adapter "$RUN/final" --out "$RELEASE" --dtype bf16 "${EVAL_ARGS[@]}"
echo "release: $RELEASE (original TinyLLaVA-Video layout + README.md model card)"
