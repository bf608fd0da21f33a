"""tinyr1: video GRPO for TinyLLaVA-Video on one consumer GPU."""

__version__ = "0.1.0"
