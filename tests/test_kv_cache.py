"""Decoding with the KV cache equals recomputing the whole sequence (3D positions continue at max + 1)."""

import torch

from model_fixtures import make_pair, media_inputs
from vlft.model import get_rope_index


def test_cached_decode_equals_full_recompute():
    model, _ = make_pair()
    cfg = model.config
    inp = media_inputs(cfg, [[3, ("image", (1, 8, 12)), 4], [2, ("image", (1, 4, 4)), 8]], pad_side="left")
    ids, mask = inp["input_ids"], inp["attention_mask"]
    vis = dict(pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"])
    pos, delta = get_rope_index(cfg, ids, inp["image_grid_thw"], attention_mask=mask)
    new = torch.randint(0, 250, (2, 3))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True, **vis)
        cache, steps = out.past_key_values, []
        for s in range(3):
            L = ids.shape[1] + s
            step_pos = (torch.full((2, 1), L) + delta).view(1, 2, 1).expand(3, -1, -1)
            full_mask = torch.cat([mask, torch.ones(2, s + 1, dtype=mask.dtype)], 1)
            o = model(new[:, s:s + 1], attention_mask=full_mask, position_ids=step_pos, past_key_values=cache,
                      use_cache=True)
            cache = o.past_key_values
            steps.append(o.logits[:, -1])
        all_ids = torch.cat([ids, new], 1)
        all_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
        full = model(all_ids, attention_mask=all_mask, **vis).logits
    for s in range(3):
        assert (steps[s] - full[:, ids.shape[1] + s]).abs().max() < 1e-5


def test_generate_allocates_the_cache_once(monkeypatch):
    """The cache is sized for prompt + new tokens up front: no step grows it (no copy, no torch.cat per token)."""
    from vlft.generate import generate
    from vlft.model.kv_cache import KVCache

    model, _ = make_pair()
    inp = media_inputs(model.config, [[3, ("image", (1, 8, 12)), 4], [6]], pad_side="left")
    inp.pop("mm_token_type_ids")
    grown = []
    reserve = KVCache.reserve

    def watch(self, n):
        before = self.keys[0].data_ptr()
        reserve(self, n)
        grown.append(self.keys[0].data_ptr() != before)

    monkeypatch.setattr(KVCache, "reserve", watch)
    new = generate(model, **inp, max_new_tokens=5)
    assert new.shape == (2, 5) and len(grown) == 5 and not any(grown)  # prefill + 4 decoding steps
