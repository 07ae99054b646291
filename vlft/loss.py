"""Cross-entropy over a large vocabulary without materialising [tokens, vocab] logits at once.

`chunked_cross_entropy` computes sum_t (logsumexp(h_t W^T) - h_t . W[y_t]) chunk by chunk and recomputes each chunk's
logits in the backward pass, so memory stays at one chunk of logits however long the sequence (Qwen's vocabulary has
151,936 rows: 4k tokens of float32 logits would be 2.5 GB, plus the same again for their gradient).
"""

from __future__ import annotations

import torch

# elements of one chunk's float32 logits: 2^25 = 128 MiB (about 220 tokens at Qwen's vocabulary)
CHUNK_ELEMENTS = 1 << 25


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TD: torch.Tensor, weight_VD: torch.Tensor, targets_T: torch.Tensor, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden_TD.device)
        for s in range(0, hidden_TD.shape[0], chunk):
            logits = (hidden_TD[s:s + chunk] @ weight_VD.T).float()
            tgt = targets_T[s:s + chunk]
            total += (torch.logsumexp(logits, -1) - logits.gather(1, tgt[:, None]).squeeze(1)).sum()
        ctx.save_for_backward(hidden_TD, weight_VD, targets_T)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden_TD, weight_VD, targets_T = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden_TD) if need_h else None
        grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_w else None
        for s in range(0, hidden_TD.shape[0], ctx.chunk):
            h = hidden_TD[s:s + ctx.chunk]
            probs = torch.softmax((h @ weight_VD.T).float(), dim=-1)
            probs[torch.arange(h.shape[0], device=h.device), targets_T[s:s + ctx.chunk]] -= 1.0
            g = (probs * grad_out).to(h.dtype)
            if need_h:
                grad_h[s:s + ctx.chunk] = g @ weight_VD
            if need_w:
                grad_w += (g.T @ h).float()
        return grad_h, (grad_w.to(weight_VD.dtype) if need_w else None), None, None


def chunked_cross_entropy(hidden_TD: torch.Tensor, weight_VD: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
    """Sum over T of the cross-entropy of softmax(hidden @ weight^T) against targets (no -100 entries)."""
    if hidden_TD.shape[0] == 0:
        return hidden_TD.sum() * 0.0 + weight_VD.sum() * 0.0
    chunk = max(1, CHUNK_ELEMENTS // weight_VD.shape[0])
    return _ChunkedCE.apply(hidden_TD.to(weight_VD.dtype), weight_VD, targets_T, chunk)
