"""Model settings: vision tower, text decoder and the ids that tie them together.

Read from an HF `config.json` in either the flat Hub form (text fields at the root, `rope_scaling`) or the nested v5 form
(`text_config` with `rope_parameters`); written back in the flat Hub form, which every transformers release and the
serving engines read. Presets give the released sizes (docs/checkpoints.md#model-sizes) and a tiny one for tests and
demos.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: float = 2
    out_hidden_size: int = 2048
    hidden_act: str = "silu"
    rope_theta: float = 10000.0


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # Runtime choice, not part of the checkpoint: "sdpa" (default), "eager" (reference) or "flash_attention_2".
    attn_implementation: str = "sdpa"

    # ------------------------------------------------------------------ HF config.json <-> ModelConfig
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Parse a Qwen2.5-VL config.json dict, flat (Hub) or nested (transformers v5)."""
        if d.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"config.json: model_type is {d.get('model_type')!r}, expected 'qwen2_5_vl'")
        text_src = dict(d.get("text_config") or d)
        rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or d.get("rope_scaling") or {}
        text = TextConfig(
            vocab_size=text_src.get("vocab_size", TextConfig.vocab_size),
            hidden_size=text_src["hidden_size"],
            intermediate_size=text_src["intermediate_size"],
            num_hidden_layers=text_src["num_hidden_layers"],
            num_attention_heads=text_src["num_attention_heads"],
            num_key_value_heads=text_src.get("num_key_value_heads", text_src["num_attention_heads"]),
            rms_norm_eps=text_src.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text_src.get("rope_theta", d.get("rope_theta", 1000000.0))),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
            max_position_embeddings=text_src.get("max_position_embeddings", 128000),
            hidden_act=text_src.get("hidden_act", "silu"),
        )
        if text.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act {text.hidden_act!r} is not supported (Qwen2.5-VL uses 'silu')")
        v = d.get("vision_config") or {}
        vrope = v.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=v.get("depth", 32),
            hidden_size=v.get("hidden_size", 1280),
            intermediate_size=v.get("intermediate_size", 3420),
            num_heads=v.get("num_heads", 16),
            in_channels=v.get("in_channels", v.get("in_chans", 3)),
            patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            window_size=v.get("window_size", 112),
            fullatt_block_indexes=list(v.get("fullatt_block_indexes", [7, 15, 23, 31])),
            tokens_per_second=v.get("tokens_per_second", 2),
            out_hidden_size=v.get("out_hidden_size", text.hidden_size),
            hidden_act=v.get("hidden_act", "silu"),
            rope_theta=vrope.get("rope_theta", 10000.0),
        )
        tie = d.get("tie_word_embeddings", text_src.get("tie_word_embeddings", False))
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                                 "vision_token_id", "bos_token_id", "eos_token_id", "pad_token_id") if d.get(k) is not None}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k not in ids and text_src.get(k) is not None:
                ids[k] = text_src[k]
        dtype = d.get("torch_dtype") or d.get("dtype") or text_src.get("torch_dtype") or "bfloat16"
        return cls(vision=vision, text=text, tie_word_embeddings=bool(tie), torch_dtype=str(dtype), **ids)

    def to_hf_dict(self) -> dict[str, Any]:
        """The flat Hub form of config.json (what the released checkpoints ship)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            **({"pad_token_id": self.pad_token_id} if self.pad_token_id is not None else {}),
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "rope_theta": t.rope_theta,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "vocab_size": t.vocab_size,
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_act": v.hidden_act,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "spatial_patch_size": v.patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
                "temporal_patch_size": v.temporal_patch_size,
            },
        }

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from an HF folder (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no config.json at {p}")
    return ModelConfig.from_hf_dict(json.loads(p.read_text()))


def save_config(config: ModelConfig, folder: str | Path) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")


# Special-token ids of the tiny tokenizer built by vlft.data.tiny_tokenizer: 256 byte-level symbols, then Qwen's 22 added
# tokens in Qwen's order (<|endoftext|> = 256 ... <|image_pad|> = 268, <|video_pad|> = 269).
TINY_SPECIAL_BASE = 256
TINY_IDS = dict(
    bos_token_id=TINY_SPECIAL_BASE + 0,  # <|endoftext|>
    eos_token_id=TINY_SPECIAL_BASE + 2,  # <|im_end|>
    vision_start_token_id=TINY_SPECIAL_BASE + 9,
    vision_end_token_id=TINY_SPECIAL_BASE + 10,
    vision_token_id=TINY_SPECIAL_BASE + 11,
    image_token_id=TINY_SPECIAL_BASE + 12,
    video_token_id=TINY_SPECIAL_BASE + 13,
)


def preset(name: str) -> ModelConfig:
    """Released sizes ("3B", "7B", "32B", "72B", docs/checkpoints.md#model-sizes) or "tiny" (CPU tests and demos)."""
    name = name.upper() if name.lower() != "tiny" else "tiny"
    sizes = {
        # hidden, inter, layers, heads, kv, vocab, tie, vision inter
        "3B": (2048, 11008, 36, 16, 2, 151936, True, 3420),
        "7B": (3584, 18944, 28, 28, 4, 152064, False, 3420),
        "32B": (5120, 27648, 64, 40, 8, 152064, False, 3456),
        "72B": (8192, 29568, 80, 64, 8, 152064, False, 3456),
    }
    if name == "tiny":
        return ModelConfig(
            vision=VisionConfig(depth=4, hidden_size=64, intermediate_size=96, num_heads=2, fullatt_block_indexes=[1, 3],
                                out_hidden_size=128),
            text=TextConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6]),
            tie_word_embeddings=False, torch_dtype="float32", **TINY_IDS,
        )
    if name not in sizes:
        raise ValueError(f"unknown preset {name!r}; choose from 3B, 7B, 32B, 72B, tiny")
    h, i, n, heads, kv, vocab, tie, vi = sizes[name]
    return ModelConfig(
        vision=VisionConfig(intermediate_size=vi, out_hidden_size=h),
        text=TextConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                        num_attention_heads=heads, num_key_value_heads=kv),
        tie_word_embeddings=tie,
    )
