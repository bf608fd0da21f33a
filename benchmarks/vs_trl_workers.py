"""Worker processes of benchmarks/vs_trl.py: one GRPO framework each, driven step by step.

The parent writes a `Spec` (JSON) and starts `python vs_trl_workers.py tinyr1|trl SPEC`; each worker
builds its trainer, prints a ready line, then runs one optimizer step per "warmup" / "memory" / "timed"
line on stdin and answers with one JSON line (prefixed by MARK) on stdout; "quit" ends it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARK = "@@vs_trl@@ "
QUESTION = ("What does the person do after picking up the cup?\nA. drinks\nB. puts it down\nC. throws it\n"
            "D. washes it\nE. gives it away")
FRAMEWORKS = ("tinyr1", "trl")


@dataclass(frozen=True)
class Spec:
    """Everything both workers need; written as JSON into the work folder."""

    device: str
    dtype: str  # fp32 | bf16
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    frames: int
    video_tokens: int
    image_size: int
    group_size: int
    max_new_tokens: int
    micro_batch: int
    lora_r: int
    lora_alpha: float
    quant: str
    beta: float
    gradient_checkpointing: bool
    lr: float
    seed: int
    steps: int  # warm-up + memory + timed
    threads: int = 1  # torch CPU threads per worker (0 = torch's default)
    tinyr1_dir: str = ""
    trl_dir: str = ""
    prompt_tokens: int = 0  # total prompt positions, both frameworks
    trl_prompt: str = ""


# ---- shared pieces ----------------------------------------------------------------------------
def bench_reward(completions: list[Any], **_: Any) -> list[float]:
    """Cheap, deterministic, non-constant (so advantages are not all zero in either framework)."""
    return [float(len(str(c)) % 7) / 6.0 for c in completions]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_command() -> str:
    line = sys.stdin.readline()
    return line.strip() or "quit"


class StepMeter:
    """Memory tracking around one step: CPU live-tensor peak, CUDA max_memory_allocated."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.live: Any = None

    def begin(self, tracked: bool) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        elif tracked:
            from tinyr1.memory_measure import LiveTensorBytes

            self.live = LiveTensorBytes(record=bool(os.environ.get("VS_TRL_RECORD")))
            self.live.__enter__()

    def end(self) -> int | None:
        import torch

        if self.device.startswith("cuda"):
            return int(torch.cuda.max_memory_allocated())
        if self.live is None:
            return None
        self.live.__exit__(None, None, None)
        if self.live.record:  # what the peak is made of, into the worker's log
            print(self.live.summary(12), file=sys.stderr, flush=True)
        peak, self.live = self.live.peak, None
        return int(peak)


# ---- tinyr1 worker ---------------------------------------------------------------------------
def tinyr1_config(spec: Spec) -> Any:
    from dataclasses import replace

    from tinyr1.config import Config

    c = Config()
    return replace(
        c,
        model=replace(c.model, path=spec.tinyr1_dir, quant=spec.quant, dtype=spec.dtype, device=spec.device,
                      gradient_checkpointing=spec.gradient_checkpointing, train_connector=False),
        lora=replace(c.lora, r=spec.lora_r, alpha=spec.lora_alpha, dropout=0.0),
        rollout=replace(c.rollout, num_generations=spec.group_size, max_new_tokens=spec.max_new_tokens,
                        temperature=1.0, top_k=0, top_p=1.0, prompts_per_step=1),
        grpo=replace(c.grpo, loss_type="grpo", beta=spec.beta, num_iterations=1, scale_rewards="group"),
        train=replace(c.train, lr=spec.lr, lr_scheduler="constant", warmup_ratio=0.0,
                      micro_batch_size=spec.micro_batch, optimizer="adamw", seed=spec.seed),
    )


def run_tinyr1(spec: Spec) -> None:
    import dataclasses

    import torch

    from tinyr1.context import build_context
    from tinyr1.data import Sample
    from tinyr1.log import peak_memory_bytes
    from tinyr1.memory_measure import resident_bytes
    from tinyr1.preset_bench import NeverEosTokenizer
    from tinyr1.trainer import rollout_step, update_step

    cfg = tinyr1_config(spec)  # train.seed = spec.seed
    ctx = build_context(cfg, total_steps=spec.steps)
    ctx = dataclasses.replace(ctx, tokenizer=NeverEosTokenizer(ctx.tokenizer), reward_funcs=[("bench", 1.0, bench_reward)])
    model, opt = ctx.model, ctx.optimizer
    pixels = torch.rand(spec.frames, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))  # [T, 3, S, S]
    batch = [(Sample(id="q0", video=Path("random.mp4"), question=QUESTION, answer="A"), pixels)]
    meter = StepMeter(spec.device)
    emit({"ready": True, "rss_setup": rss_now()})
    while (cmd := wait_command()) != "quit":
        resident = resident_bytes(model, opt)
        meter.begin(cmd == "memory")
        sync(spec.device)
        t0 = time.perf_counter()
        ro = rollout_step(ctx, batch)
        sync(spec.device)
        t1 = time.perf_counter()
        upd = update_step(ctx, ro)
        sync(spec.device)
        t2 = time.perf_counter()
        peak = meter.end()
        emit({"rollout": t1 - t0, "update": t2 - t1, "total": t2 - t0, "step_peak": peak, "resident": resident,
              "completion_tokens": float(ro.completion_mask.sum(1).float().mean()),
              "prompt_tokens": ro.prompt_ids[0].numel() - 1 + ro.video_tokens[0].shape[0],
              "loss": upd.get("loss", float("nan"))})
    emit({"done": True, "peak_rss": peak_memory_bytes("cpu")})


# ---- TRL worker ------------------------------------------------------------------------------
def timed_trainer_class(device: str) -> type:
    """GRPOTrainer timing its rollout; the no-grad log-prob passes inside it are moved to the update."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):  # type: ignore[misc]
        bench_rollout = 0.0
        bench_scoring = 0.0
        bench_in_rollout = False
        bench_tokens = 0.0
        bench_prompt = 0

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            sync(device)
            t0 = time.perf_counter()
            self.bench_in_rollout = True
            try:
                out = super()._generate_and_score_completions(inputs)
            finally:
                self.bench_in_rollout = False
            sync(device)
            self.bench_rollout += time.perf_counter() - t0
            self.bench_tokens = float(out["completion_mask"].sum(1).float().mean())
            self.bench_prompt = int(out["prompt_ids"].shape[1])
            return out

        def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
            if not self.bench_in_rollout:
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            sync(device)
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            sync(device)
            self.bench_scoring += time.perf_counter() - t0
            return out

    return TimedGRPOTrainer


def step_callback(spec: Spec) -> Any:
    """Waits for the parent's command before each optimizer step and reports after it."""
    from transformers import TrainerCallback

    from tinyr1.memory_measure import resident_bytes

    class StepReport(TrainerCallback):  # type: ignore[misc]
        trainer: Any = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            cmd = wait_command()
            self.resident = resident_bytes(kw["model"], kw["optimizer"])
            self.trainer.bench_rollout = self.trainer.bench_scoring = 0.0
            self.meter = StepMeter(spec.device)
            self.meter.begin(cmd == "memory")
            sync(spec.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync(spec.device)
            total = time.perf_counter() - self.t0
            peak = self.meter.end()
            tr = self.trainer
            rollout = tr.bench_rollout - tr.bench_scoring
            emit({"rollout": rollout, "update": total - rollout, "total": total, "step_peak": peak,
                  "resident": self.resident, "completion_tokens": tr.bench_tokens, "prompt_tokens": tr.bench_prompt})

    return StepReport()


def trl_args(spec: Spec, out_dir: str) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=spec.micro_batch,
        gradient_accumulation_steps=spec.group_size // spec.micro_batch, num_generations=spec.group_size,
        max_completion_length=spec.max_new_tokens, generation_kwargs={"min_new_tokens": spec.max_new_tokens},
        temperature=1.0, top_k=0, top_p=1.0, beta=spec.beta, loss_type="grpo", scale_rewards="group",
        num_iterations=1, learning_rate=spec.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_steps=spec.steps, logging_steps=10**6,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=spec.device == "cpu",
        bf16=spec.dtype == "bf16", seed=spec.seed, shuffle_dataset=False, dataloader_num_workers=0,
        log_completions=False,
    )


def run_trl(spec: Spec) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, Qwen2ForCausalLM

    from tinyr1.log import peak_memory_bytes
    from tinyr1.model.loading import LORA_DEFAULT_TARGETS
    from tinyr1.tokenizer import load_tokenizer

    dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
    extra: dict[str, Any] = {}
    if spec.quant == "nf4":
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = Qwen2ForCausalLM.from_pretrained(spec.trl_dir, dtype=dtype, device_map={"": spec.device}, **extra)
    tok = load_tokenizer(spec.trl_dir)
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(LORA_DEFAULT_TARGETS), task_type="CAUSAL_LM")
    data = Dataset.from_dict({"prompt": [spec.trl_prompt] * (spec.steps + 1)})
    callback = step_callback(spec)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = timed_trainer_class(spec.device)(
            model=model, reward_funcs=[bench_reward], args=trl_args(spec, out_dir), train_dataset=data,
            processing_class=tok, peft_config=lora, callbacks=[callback])
        callback.trainer = trainer
        emit({"ready": True, "rss_setup": rss_now()})
        trainer.train()
    wait_command()  # "quit"
    emit({"done": True, "peak_rss": peak_memory_bytes("cpu")})


def worker_main(argv: list[str]) -> int:
    name, spec_path = argv
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    if spec.threads > 0:
        import torch

        torch.set_num_threads(spec.threads)
    (run_tinyr1 if name == "tinyr1" else run_trl)(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
