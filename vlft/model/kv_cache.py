"""A preallocated key/value cache for decoding: one [B, H_kv, capacity, D] buffer per layer and per k/v.

Each forward writes its new keys and values at [length, length + L) and attends over the first length + L slots, a
view: no `torch.cat` per token. `vlft.generate` sizes it for the prompt plus every new token up front; a cache made by
the model itself (`use_cache=True` without one) starts at the prompt length and doubles when a step would overflow it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0  # positions filled, the same in every layer once a forward has finished

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more positions (doubling, so that growth is rare and amortised)."""
        need = self.length + new_tokens
        if need <= self.capacity:
            return
        capacity = max(need, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                buffers[i] = new

    def update(self, layer: int, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values after the `length` cached ones; returns views of all of them so far."""
        end = self.length + k_BHLD.shape[2]
        self.keys[layer][:, :, self.length:end] = k_BHLD
        self.values[layer][:, :, self.length:end] = v_BHLD
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        """Called once per forward, after every layer has stored its `new_tokens` positions."""
        self.length += new_tokens
