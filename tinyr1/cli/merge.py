"""`tinyr1 merge`: fold a LoRA adapter (and trained connector) into the base for release."""

from __future__ import annotations

import argparse
import re

ORDER = 60

DESCRIPTION = """\
Merge a tinyr1 LoRA adapter into its base TinyLLaVA-Video checkpoint and write a release folder
in the original layout: config.json, safetensors shards + index with the original tensor names,
tokenizer files, generation_config.json and a README.md model card (base, adapter, training
config, final reward values, evaluation results when present).

The base is loaded UNQUANTIZED in --dtype: merging into 4-bit weights rounds the adapter's update
away, so a quantized base (or --dtype nf4) is refused. Merging a 3B model needs about 2 bytes per
parameter of RAM in bf16 (4 in fp32); it runs on the CPU by default.
"""

EPILOG = """\
examples:
  tinyr1 merge --base ckpt/ --adapter runs/24gb-20261125-101500/final --out release/
  tinyr1 merge --base ckpt/ --adapter runs/x/final --out release/ --dtype fp32 --force
  tinyr1 merge --base .tinyr1_cache/tiny/model --adapter runs/tiny-*/final --out tiny-merged \\
      --eval preds.summary.json                 # put `tinyr1 eval` results into the model card

Then: tinyr1 eval --model release/ --data benchmark.jsonl
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GB', '500MiB', '1000' -> bytes."""
    from tinyr1.errors import ConfigError

    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}: write a size like 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge a LoRA adapter into the base and write a release checkpoint",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, metavar="BASE_DIR", help="base checkpoint folder (original layout)")
    p.add_argument("--adapter", required=True, metavar="ADAPTER_DIR",
                   help="adapter folder: RUN/final or RUN/checkpoints/step-N/adapter")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder to create (must not exist unless --force)")
    p.add_argument("--dtype", default="auto", metavar="{bf16,fp16,fp32}",
                   help="weights dtype to load, merge and write; auto = the base's stored dtype (4-bit is refused)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--device", default="cpu", help="where to merge (cpu or cuda; default cpu)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--eval", dest="eval_files", action="append", default=[], metavar="SUMMARY_JSON",
                   help="a `tinyr1 eval` summary (PREDS.summary.json) to list in the model card (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tinyr1.merge import merge_adapter

    console = Console()
    console.print(f"merging {args.adapter} into {args.base} (unquantized, dtype {args.dtype}) ...")
    out = merge_adapter(
        args.base, args.adapter, args.out, dtype=args.dtype, force=args.force, device=args.device,
        eval_files=args.eval_files, max_shard_bytes=parse_size(args.max_shard_size),
    )
    files = sorted(p.name for p in out.iterdir())
    console.print(f"wrote {out}: {', '.join(files)}")
    console.print(f"try it: tinyr1 generate --model {out} --video CLIP.mp4 --question \"...\"")
    return 0
