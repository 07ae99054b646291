"""Qwen2.5-VL for conditional generation: vision tower + Qwen2 decoder + head (docs/overview.md#the-model).

Module tree = checkpoint keys: `visual.*`, `model.*` (embed_tokens, layers, norm), `lm_head`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlft.loss import IGNORE_INDEX, chunked_cross_entropy, shifted_targets
from vlft.model.attention import check_implementation
from vlft.model.config import ModelConfig
from vlft.model.kv_cache import KVCache
from vlft.model.rope_index import get_rope_index
from vlft.model.text import TextModel
from vlft.model.vision import VisionTransformer


class LMHead(nn.Linear):
    """`lm_head`: a bias-free Linear whose forward can also return the summed cross-entropy against targets.

    The chunked loss runs inside the head's own forward so that sharding wrappers (ZeRO-3 gathers a module's
    weights around its forward and backward) see the weight used where it belongs, and every rank calls the head
    exactly once per step whatever its token count.
    """

    def __init__(self, hidden: int, vocab: int):
        super().__init__(hidden, vocab, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return chunked_cross_entropy(x, self.weight, targets)


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    position_ids: torch.Tensor | None = None

    def __getitem__(self, key: str):  # dict-style access, as transformers' outputs allow
        return getattr(self, key)


class Qwen2_5_VLForConditionalGeneration(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        v, t = config.vision, config.text
        check_implementation(config.attn_implementation)
        self.visual = VisionTransformer(
            depth=v.depth, dim=v.hidden_size, heads=v.num_heads, inter=v.intermediate_size, out_dim=v.out_hidden_size,
            patch=v.patch_size, temporal=v.temporal_patch_size, merge=v.spatial_merge_size, window_size=v.window_size,
            fullatt_block_indexes=v.fullatt_block_indexes, in_channels=v.in_channels, rope_theta=v.rope_theta,
        )
        self.model = TextModel(
            vocab=t.vocab_size, hidden=t.hidden_size, inter=t.intermediate_size, layers=t.num_hidden_layers,
            heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, eps=t.rms_norm_eps,
            rope_theta=t.rope_theta, mrope_section=t.mrope_section,
        )
        self.lm_head = LMHead(t.hidden_size, t.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ switches
    def set_attn_implementation(self, impl: str) -> None:
        self.config.attn_implementation = check_implementation(impl)

    def set_gradient_checkpointing(self, text: bool = True, vision: bool = False) -> None:
        self.model.gradient_checkpointing = text
        self.visual.gradient_checkpointing = vision

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    # ------------------------------------------------------------------ pieces
    def _vision_features(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, run_vision_always,
                         device):
        """Images and videos through ONE tower call (so every rank makes the same collective calls under ZeRO-3).

        Returns (image features or None, video features or None, dummy term or None).
        """
        pix, grids, n_img = [], [], 0
        if pixel_values is not None:
            pix.append(pixel_values)
            grids += image_grid_thw.tolist() if torch.is_tensor(image_grid_thw) else list(image_grid_thw)
            n_img = pixel_values.shape[0] // self.config.vision.spatial_merge_size ** 2
        if pixel_values_videos is not None:
            pix.append(pixel_values_videos)
            grids += video_grid_thw.tolist() if torch.is_tensor(video_grid_thw) else list(video_grid_thw)
        impl = self.config.attn_implementation
        if not pix:
            if not run_vision_always:
                return None, None, None
            # a batch without media still runs the tower on a 2x2-patch dummy whose result is multiplied by zero.
            # No parameter is touched outside its own module here: ZeRO-3 would register it as an "external"
            # parameter of this module on this rank only, and ranks would then disagree on the parameter trace.
            v = self.config.vision
            width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
            dummy = torch.zeros(4, width, device=device)
            return None, None, self.visual(dummy, [[1, 2, 2]], impl).sum() * 0.0
        feats = self.visual(torch.cat(pix) if len(pix) > 1 else pix[0], grids, impl)
        image_feats = feats[:n_img] if pixel_values is not None else None
        video_feats = feats[n_img:] if pixel_values_videos is not None else None
        return image_feats, video_feats, None

    @staticmethod
    def _scatter(embeds_BLD, input_ids, token_id, feats, kind):
        mask = input_ids == token_id
        if input_ids.device.type == "cpu":
            n_tokens = int(mask.sum())
            if n_tokens != feats.shape[0]:
                raise ValueError(f"{kind} features and {kind} tokens do not match: tokens {n_tokens}, features "
                                 f"{feats.shape[0]} (a truncation that cut a vision block, or grids out of order?)")
        else:  # checked on the device: reading the count back would stall the host once per forward
            torch._assert_async(mask.sum() == feats.shape[0], f"{kind} features ({feats.shape[0]}) and {kind} "
                                "tokens do not match (a truncation that cut a vision block, or grids out of order?)")
        return embeds_BLD.masked_scatter(mask[..., None], feats.to(embeds_BLD.dtype))

    def _positions(self, input_ids, position_ids, attention_mask, image_grid_thw, video_grid_thw,
                   second_per_grid_ts, past_len):
        if position_ids is None:
            if past_len:
                raise ValueError("with a KV cache, pass position_ids (3 rows): vlft.generate computes them")
            mask = None if attention_mask is None else attention_mask.to(input_ids.device)
            position_ids, _ = get_rope_index(self.config, input_ids, image_grid_thw, video_grid_thw,
                                             second_per_grid_ts, mask)
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        elif position_ids.shape[0] == 4:  # transformers' 4-row form: [text row; t; h; w]
            position_ids = position_ids[1:]
        return position_ids.to(input_ids.device, non_blocking=True)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | list[int] | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_logits: bool = True,
        logits_to_keep: int = 0,
        run_vision_always: bool = False,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        # accepted for transformers-style callers (peft's causal-LM wrapper passes the first four; transformers'
        # processors return mm_token_type_ids, which vlft does not need: vision tokens are found by their ids)
        inputs_embeds: None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits [B, L, V] (the last `logits_to_keep` positions only, when it is > 0) and, with labels [B, L], the
        causal LM loss (mean over labels != -100, or their sum divided by `num_items_in_batch`).

        Packed rows: `cu_seqlens` (0, ..., B*L) are segment boundaries over the flattened B*L tokens; each segment
        attends only to itself and predictions never cross a boundary. `attention_mask` is then ignored.
        Host tensors for `cu_seqlens`, `attention_mask` and `labels` keep the forward free of device reads (the
        model moves what it needs); the grids are read on the host in any case.
        """
        if inputs_embeds is not None or output_attentions or output_hidden_states:
            raise ValueError("vlft's model takes input_ids (no inputs_embeds) and returns no attentions or hidden "
                             "states (output_attentions / output_hidden_states must be unset)")
        B, L = input_ids.shape
        device = input_ids.device
        impl = self.config.attn_implementation
        embeds = self.model.embed_tokens(input_ids)
        img, vid, dummy = self._vision_features(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                                run_vision_always, device)
        if img is not None:
            embeds = self._scatter(embeds, input_ids, self.config.image_token_id, img, "Image")
        if vid is not None:
            embeds = self._scatter(embeds, input_ids, self.config.video_token_id, vid, "Video")
        if dummy is not None:
            embeds = embeds + dummy.to(embeds.dtype)

        cache = past_key_values
        if cache is None and use_cache:
            t = self.config.text
            cache = KVCache(t.num_hidden_layers, B, t.num_key_value_heads, t.head_dim, L, embeds.dtype, device)
        past_len = cache.length if cache is not None else 0
        position_ids = self._positions(input_ids, position_ids, None if cu_seqlens is not None else attention_mask,
                                       image_grid_thw, video_grid_thw, second_per_grid_ts, past_len)
        cu = None
        if cu_seqlens is not None:
            cu = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
            if cu[0] != 0 or cu[-1] != B * L:
                raise ValueError(f"cu_seqlens must run from 0 to B*L = {B * L}, got {cu[0]}..{cu[-1]}")
        key_mask = None
        if cu is None and attention_mask is not None:
            m = attention_mask.bool()
            # right padding alone needs no key mask (causality already hides the padded keys from real queries)
            right_padded_only = past_len == 0 and bool((m[:, 1:] <= m[:, :-1]).all())
            if not right_padded_only:
                key_mask = m.to(device, non_blocking=True)  # left padding or a cache: hide padded keys explicitly
        hidden = self.model(embeds, position_ids, impl, key_mask, cu, cache)

        out = ModelOutput(past_key_values=cache if use_cache else None, position_ids=position_ids)
        if return_logits or labels is None:
            out.logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)
        if labels is not None:
            self._loss(out, hidden, labels, cu, num_items_in_batch)
        return out

    def _loss(self, out: ModelOutput, hidden_BLD, labels_BL, cu, num_items_in_batch) -> None:
        B, L = labels_BL.shape
        shifted = shifted_targets(labels_BL, cu)
        keep = shifted != IGNORE_INDEX
        n = keep.sum()  # where the labels are: on the host, reading it never waits for the device
        device = hidden_BLD.device
        if out.logits is not None and out.logits.shape[1] == L:
            loss_sum = F.cross_entropy(out.logits.reshape(B * L, -1).float(), shifted.to(device, non_blocking=True),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            # only the supervised positions go through the head; their indices are found on the host when the
            # labels are there (a boolean mask on the device would read its count back)
            index = keep.nonzero().squeeze(1).to(device, non_blocking=True)
            h = hidden_BLD.reshape(B * L, -1).index_select(0, index)
            targets = shifted[keep].to(device, non_blocking=True)
            if type(self.lm_head) is LMHead:
                loss_sum = self.lm_head(h, targets=targets)
            else:  # the head was wrapped (e.g. trained as a peft module): go through the module
                loss_sum = F.cross_entropy(self.lm_head(h).float(), targets, reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else n.clamp(min=1)
        out.loss_sum, out.num_label_tokens = loss_sum, n
        out.loss = loss_sum / denom


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Random initialisation for models built from a config (tests, demos): normal(0, std) weights, zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
    # RMSNorm weights keep their ones


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                ) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised model (seed with torch.manual_seed first). On device "meta" nothing is allocated."""
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config)
    if str(device) != "meta":
        init_weights(model)
    return model.to(dtype)
