"""Batches for the model, from processed samples (mixed images, videos, both or neither).

Position ids [3, L] are computed per sample with get_rope_index here, in the DataLoader workers, so they are right
for both padded and packed rows (packing after computing ids is what keeps positions restarting per sample).
Media tensors are concatenated in the order their tokens appear in the (flattened) batch; grids and
second_per_grid_ts follow the same order.

Output keys: input_ids [B, L], labels [B, L] (-100 ignored), position_ids [3, B, L] int64, attention_mask [B, L]
(padded batches only), cu_seqlens [S+1] int32 (packed batches only), pixel_values [N, 1176] and image_grid_thw
[n_img, 3] (if any image), pixel_values_videos [M, 1176], video_grid_thw [n_vid, 3], second_per_grid_ts [n_vid]
float32 (if any video); plus the host-side bookkeeping the training loop pops: "num_label_tokens" (tokens the loss
is taken over, by the model's own rule `vlft.loss.shifted_targets`), "num_tokens" (real tokens, no padding),
"skipped" (list of Skipped) and "num_samples".
"""

from __future__ import annotations

import torch

from vlft.data.sample import Skipped
from vlft.data.packing import cu_seqlens_for_rows, pack_first_fit
from vlft.data.template import IGNORE_INDEX
from vlft.loss import shifted_targets

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
# Batch keys that stay on the host: the model reads them there (grids, packing boundaries, the padding side, the
# supervised positions) and copies to the device what it needs without waiting; on the device each would cost a sync.
HOST_KEYS = ("image_grid_thw", "video_grid_thw", "cu_seqlens", "attention_mask", "labels")


# What the collator adds for the training loop's bookkeeping, beside the model's inputs.
BOOKKEEPING_KEYS = ("skipped", "num_samples", "num_label_tokens", "num_tokens")


def model_inputs(batch: dict) -> dict:
    """A collated batch without its bookkeeping keys: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}


def concat_media(samples: list[dict]) -> dict:
    """The media tensors of several samples concatenated in sample order, the order their tokens take in a batch."""
    out = {}
    for key in MEDIA_KEYS:
        parts = [s[key] for s in samples if s.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    return out


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move a collated batch to `device`, keeping the HOST_KEYS on the host."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_KEYS else v)
            for k, v in batch.items()}


def sample_position_ids(model_config, sample: dict) -> torch.Tensor:
    """[3, L] position ids of one unpadded sample."""
    from vlft.model.rope_index import get_rope_index

    pos, _ = get_rope_index(model_config, sample["input_ids"][None], sample.get("image_grid_thw"),
                            sample.get("video_grid_thw"), sample.get("second_per_grid_ts"))
    return pos[:, 0]


class Collator:
    def __init__(self, model_config, pad_token_id: int, packing: bool = False, max_length: int | None = None,
                 pad_to_multiple_of: int = 1):
        if packing and not max_length:
            raise ValueError("packing needs max_length")
        self.config, self.pad_token_id = model_config, pad_token_id
        self.packing, self.max_length, self.multiple = packing, max_length, pad_to_multiple_of

    def __call__(self, items: list) -> dict:
        """The batch of `items`; with no usable sample among them (all skipped, or the empty micro-batches that give
        every rank the same count) a placeholder of one pad token with nothing supervised, so that every rank still
        runs the same forward/backward calls (DDP and ZeRO-3 need that). `num_samples` says which it is."""
        samples = [x for x in items if not isinstance(x, Skipped)]
        real = samples or [{"input_ids": torch.tensor([self.pad_token_id]), "labels": torch.tensor([IGNORE_INDEX])}]
        batch = self._packed(real) if self.packing else self._padded(real)
        # host-side counts: the training loop reads them without a device sync
        batch["num_label_tokens"] = int((shifted_targets(batch["labels"], batch.get("cu_seqlens")) != IGNORE_INDEX)
                                        .sum())
        batch["num_tokens"] = sum(len(s["input_ids"]) for s in samples)
        batch["skipped"] = [x for x in items if isinstance(x, Skipped)]
        batch["num_samples"] = len(samples)
        return batch

    def _round(self, n: int) -> int:
        return -(-n // self.multiple) * self.multiple

    _media = staticmethod(concat_media)

    def _padded(self, samples: list[dict]) -> dict:
        B, L = len(samples), self._round(max(len(s["input_ids"]) for s in samples))
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        position_ids = torch.ones(3, B, L, dtype=torch.long)  # padding gets 1, as get_rope_index does under a mask
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], 1
            position_ids[:, b, :n] = sample_position_ids(self.config, s)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "position_ids": position_ids, **self._media(samples)}

    def _packed(self, samples: list[dict]) -> dict:
        lengths = [len(s["input_ids"]) for s in samples]
        rows = pack_first_fit(lengths, self.max_length)
        B, L = len(rows), self._round(max(sum(lengths[i] for i in r) for r in rows))
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.ones(3, B, L, dtype=torch.long)
        for b, row in enumerate(rows):
            at = 0
            for i in row:  # positions restart at every sample
                s, n = samples[i], lengths[i]
                input_ids[b, at:at + n], labels[b, at:at + n] = s["input_ids"], s["labels"]
                position_ids[:, b, at:at + n] = sample_position_ids(self.config, s)
                at += n
        ordered = [samples[i] for r in rows for i in r]
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "cu_seqlens": cu_seqlens_for_rows([[lengths[i] for i in r] for r in rows], L),
                **self._media(ordered)}
