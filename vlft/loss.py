"""Cross-entropy over a large vocabulary without materialising [tokens, vocab] logits at once.

`chunked_cross_entropy` walks the tokens in chunks. For each chunk it forms the logits, adds
logsumexp(logits) - logits[target] to the loss and, when gradients are wanted, turns the same logits into their
gradient (softmax - one-hot) and immediately into the gradients of the hidden states (and of the head's weight if it
trains). Only those gradients are kept for the backward pass, which just scales them. Memory stays at one chunk of
logits however long the sequence (Qwen's vocabulary has 151,936 rows: 4k tokens of float32 logits are 2.5 GB, plus as
much again for their gradient), and the head costs the same two matmuls as an unfused forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# elements of one chunk's float32 logits: 2^26 = 256 MiB (about 440 tokens at Qwen's vocabulary); larger chunks keep
# the matmuls efficient, and the memory stays flat in the sequence length
CHUNK_ELEMENTS = 1 << 26


class _FusedChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TD, weight_VD, targets_T, chunk: int, need_h: bool, need_w: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden_TD.device)
        grad_h = torch.empty_like(hidden_TD) if need_h else None
        grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_w else None
        for s in range(0, hidden_TD.shape[0], chunk):
            h = hidden_TD[s:s + chunk]
            tgt = targets_T[s:s + chunk]
            logits = (h @ weight_VD.T).float()  # [c, V]
            target_logit = logits.gather(1, tgt[:, None]).squeeze(1)
            # one exp pass serves both the loss (logsumexp) and the gradient (softmax), in place of the logits
            row_max = logits.amax(-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()
            sums = exps.sum(-1, keepdim=True)
            total += (row_max.squeeze(1) + sums.squeeze(1).log() - target_logit).sum()
            if need_h or need_w:
                probs = exps.div_(sums)
                probs[torch.arange(h.shape[0], device=h.device), tgt] -= 1.0
                g = probs.to(h.dtype)
                if need_h:
                    grad_h[s:s + chunk] = g @ weight_VD
                if need_w:
                    grad_w += (g.T @ h).float()
        ctx.grads = (grad_h, grad_w.to(weight_VD.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        scale = grad_out.to(torch.float32)
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else grad_w * scale.to(grad_w.dtype), None, None, None, None)


def chunked_cross_entropy(hidden_TD: torch.Tensor, weight_VD: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
    """Sum over T of the cross-entropy of softmax(hidden @ weight^T) against targets (no -100 entries)."""
    if hidden_TD.shape[0] == 0:
        return hidden_TD.sum() * 0.0 + weight_VD.sum() * 0.0
    chunk = max(1, CHUNK_ELEMENTS // weight_VD.shape[0])
    hidden_TD = hidden_TD.to(weight_VD.dtype)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden_TD.requires_grad
    need_w = grad_on and weight_VD.requires_grad
    return _FusedChunkedCE.apply(hidden_TD, weight_VD, targets_T, chunk, need_h, need_w)


def shifted_targets(labels_BL: torch.Tensor, cu_seqlens: list[int] | torch.Tensor | None = None) -> torch.Tensor:
    """[B*L] targets of a causal LM: position p predicts the label of p + 1 in the same row and, in packed rows,
    the same segment (the last token of a segment predicts nothing). IGNORE_INDEX where nothing is predicted.

    The one definition of which tokens are supervised: the model's loss and the collator's count (by which the
    recipe normalises the loss over a whole step) both use it."""
    shifted = F.pad(labels_BL[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    if cu_seqlens is not None:
        ends = torch.as_tensor(cu_seqlens, device=shifted.device)[1:].long() - 1
        shifted = shifted.index_fill(0, ends, IGNORE_INDEX)
    return shifted
