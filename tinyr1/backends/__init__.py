"""Backends: how the LLM's LoRA layers compute (`model.backend`).

`peft` (the default) is PEFT LoRA over bitsandbytes, with nothing here. `unsloth`
(`tinyr1.backends.unsloth`) binds unsloth's fused LoRA kernels onto the same PEFT-wrapped Qwen2
layers. A backend changes how layers compute, never the checkpoint or adapter format. Each backend
module is imported only by the code that selects it (inside a function), because importing unsloth
patches parts of torch/transformers process-wide; this package's `__init__` imports nothing.
"""
