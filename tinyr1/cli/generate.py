"""`tinyr1 generate`: answer one question about one video, streaming the completion."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyr1.cli._args import add_loading_args, add_model_args, add_sampling_args

ORDER = 35

DESCRIPTION = """\
Ask a checkpoint (+ adapter) one question about one video. The completion is streamed to the
terminal token by token as it is generated, then the parsed answer (the first letter inside
<answer>..</answer>) is printed. Greedy by default; --temperature > 0 samples.

Options are listed under the question as "A. ...", "B. ..." lines, then the R1 instruction
("Output the thinking process in <think> </think> and final answer (option) in <answer> </answer>
tags.") on its own line, exactly as in `tinyr1 eval`.
"""

EPILOG = """\
examples:
  tinyr1 generate --model release/ --video clip.mp4 --question "What does the man do after sitting down?" \\
      --options "reads a book" "stands up" "waves" "drinks water" "leaves"
  tinyr1 generate --model ckpt/ --adapter runs/x/final --video clip.mp4 --question "Describe the video."
  tinyr1 generate --model .tinyr1_cache/tiny/model --adapter runs/tiny-*/final \\
      --video .tinyr1_cache/tiny/data/videos/eval_00000.mp4 \\
      --question "What colour is the square?" --options red green blue yellow --max-new-tokens 48
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a question about a video, streaming the reply",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--video", required=True, metavar="FILE", help="video file")
    p.add_argument("--question", required=True, metavar="TEXT", help="the question")
    p.add_argument("--options", nargs="+", metavar="OPTION", help="answer options, in order (A, B, C, ...)")
    p.add_argument("--frames", type=int, metavar="T", help="frames sampled uniformly (default: the model's group, 16)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply (default 512)")
    add_sampling_args(p)
    add_loading_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tinyr1.errors import ConfigError, VideoError
    from tinyr1.evaluate import TokenStreamer, answer_question, load_for_inference
    from tinyr1.video import load_frames

    if args.max_new_tokens < 1 or (args.frames is not None and args.frames < 1):
        raise ConfigError("--max-new-tokens and --frames must be at least 1")
    if args.options is not None and len(args.options) > 26:
        raise ConfigError(f"--options: at most 26 options (A-Z), got {len(args.options)}")
    if not Path(args.video).is_file():
        raise VideoError(f"--video {args.video}: no such file; pass the path of a video (mp4, mkv, webm, ...)")
    console = Console(stderr=True)
    loaded = load_for_inference(args.model, args.adapter, quant=args.quant, dtype=args.dtype, device=args.device)
    pixels = load_frames(args.video, args.frames or loaded.cfg.group, loaded.cfg.image_size)  # [T, 3, S, S]

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    streamer = TokenStreamer(loaded.tokenizer, emit)
    _, letter = answer_question(
        loaded.model, loaded.tokenizer, pixels, args.question, options=args.options, prompt_mode=args.prompt,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, streamer=streamer,
    )
    sys.stdout.write("\n")
    if letter is None:
        print("answer: none (no valid <answer>X</answer> in the reply)")
    elif args.options:
        print(f"answer: {letter}. {args.options[ord(letter) - ord('A')]}")
    else:
        print(f"answer: {letter}")
    if streamer.puts >= args.max_new_tokens:
        console.print(f"[yellow]the reply hit --max-new-tokens {args.max_new_tokens}; raise it for longer answers[/]")
    return 0
