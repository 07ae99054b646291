"""Qwen2.5-VL in plain PyTorch, module names equal to the Hub checkpoint keys."""

from vlft.model.config import ModelConfig, TextConfig, VisionConfig, load_config, preset, save_config
from vlft.model.qwen2_5_vl import ModelOutput, Qwen2_5_VLForConditionalGeneration, build_model
from vlft.model.rope_index import get_rope_index
from vlft.model.weights import load_pretrained, save_pretrained

__all__ = [
    "ModelConfig", "TextConfig", "VisionConfig", "load_config", "save_config", "preset",
    "Qwen2_5_VLForConditionalGeneration", "ModelOutput", "build_model",
    "get_rope_index", "load_pretrained", "save_pretrained",
]
