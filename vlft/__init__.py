"""vlft: parameter-efficient fine-tuning for Qwen2.5-VL with its own exact modeling code."""

__version__ = "0.1.0"
