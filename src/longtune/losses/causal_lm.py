"""Chunked causal-LM loss: the LM head runs over chunks of loss tokens, so full-sequence logits (T x V, in fp32)
never exist. Returns a token-loss *sum* and a token *count*; the trainer divides by the global count of the
optimizer step, which is what makes accumulation and parallelism exact.

Two implementations of the same sum:
- fused (a plain `nn.Linear` head, gradients wanted): each chunk's logits are turned into the gradients of the
  loss sum with respect to the chunk's hidden states and the head weight right away, in the forward pass; the
  backward pass only scales them by the incoming scalar. Three head matmuls per chunk, as with full logits, and
  no recompute. Valid because the loss sum is a scalar, so its gradient is fixed up to that one factor.
- checkpointed (any other head, e.g. a LoRA-wrapped one): the chunk's head + cross-entropy run under activation
  checkpointing and are recomputed in backward (four head matmuls per chunk).

Under tensor parallelism with a vocab-parallel head (the head weight a DTensor split by vocabulary rows over the
tp group, see parallel/tensor.py) each tp rank computes the logits of its vocabulary slice only: the log-sum-exp
and the target's logit are reduced over the tp group, the hidden-state gradient is summed over it, and each rank
keeps the gradient of its own rows. No rank holds full-vocabulary logits.

Per-sequence log-probs (dpo/kto/rm) cannot take their gradient early (it depends on the preference loss), so a
plain linear head keeps each row's log-sum-exp and recomputes the chunk's logits once in backward, building their
gradient in place (four head matmuls, one fp32 chunk buffer instead of three).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longtune.constants import IGNORE_INDEX


def _chunk_loss_sum(hidden: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
    logits = head(hidden)
    # Softmax in at least fp32: bf16 log-sum-exp over a large vocabulary loses several digits.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum")


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    kind = tensor.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return tensor.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets), gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int,
                vocab: VocabSlice | None = None):
        dtype = _compute_dtype(hidden)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
            total = torch.zeros((), dtype=acc, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                y = targets[start : start + chunk_size]
                logits = F.linear(h, w, b).to(acc)  # softmax in at least fp32
                rows = torch.arange(y.shape[0], device=y.device)
                if vocab is None:
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits[rows, y]).sum()
                else:
                    lse = vocab.logsumexp(logits)
                    total += (lse - vocab.target_logit(logits, y)).sum()
                # d(sum of losses)/d(logits) = softmax - onehot, built in place of the logits.
                probs = logits.sub_(lse.unsqueeze(-1)).exp_()
                if vocab is None:
                    probs[rows, y] -= 1.0
                else:
                    vocab.onehot_sub_(probs, y, 1.0)
                g = probs.to(dtype)
                if grad_h is not None:  # written in place where the dtypes allow: no T x H or V x H temporaries
                    if grad_h.dtype == dtype:
                        torch.mm(g, w, out=grad_h[start : start + chunk_size])
                    else:
                        grad_h[start : start + chunk_size] = (g @ w).to(hidden.dtype)
                    if vocab is not None:  # each rank's vocabulary slice adds its part of d loss / d hidden
                        _tp_sum(grad_h[start : start + chunk_size], vocab.group)
                if grad_w is not None:
                    if acc == dtype:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).to(acc)
                if grad_b is not None:
                    grad_b += probs.sum(0)
                del logits, probs, g
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # The buffers are scaled in place (no second V x H copy at the start of backward), so they serve one
        # backward pass; a second one (retain_graph) would see scaled values and is refused.
        if ctx.used:
            raise RuntimeError("the fused LM-head loss supports one backward pass per forward")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        out_h = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        out_w = grad_w.mul_(grad_out.to(grad_w.dtype)).to(weight_dtype) if grad_w is not None else None
        out_b = grad_b.mul_(grad_out.to(grad_b.dtype)).to(bias_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None


class VocabSlice:
    """This tp rank's rows [start, start + size) of a vocab-parallel head and the tp group to reduce over."""

    def __init__(self, weight: Tensor):
        mesh = weight.device_mesh
        self.group = mesh.get_group()
        self.size = weight.to_local().shape[0]
        self.start = mesh.get_local_rank() * self.size

    def target_logit(self, logits: Tensor, targets: Tensor) -> Tensor:
        """logits[row, target] summed over the tp group (exactly one rank holds each target)."""
        local = targets - self.start
        mine = (local >= 0) & (local < self.size)
        picked = logits.gather(1, local.clamp(0, self.size - 1).unsqueeze(1)).squeeze(1)
        return _tp_sum(torch.where(mine, picked, torch.zeros_like(picked)), self.group)

    def logsumexp(self, logits: Tensor) -> Tensor:
        peak = logits.max(dim=-1).values
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return peak + _tp_sum((logits - peak.unsqueeze(-1)).exp().sum(-1), self.group).log()

    def onehot_sub_(self, probs: Tensor, targets: Tensor, value) -> None:
        """probs[row, target] -= value on the rank holding each target."""
        local = targets - self.start
        rows = (local >= 0) & (local < self.size)
        probs[rows.nonzero(as_tuple=True)[0], local[rows]] -= value if not torch.is_tensor(value) else value[rows]


def _tp_sum(x: Tensor, group) -> Tensor:
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM, group=group)
    return x


def _head_weight(head: nn.Module) -> tuple[Tensor, VocabSlice | None]:
    """The head weight to compute with: the local rows and their slice for a vocab-parallel head."""
    weight = head.weight
    # Only the tp split of parallel/tensor.py: FSDP's own unsharded parameters are plain tensors in forward.
    if getattr(getattr(weight, "device_mesh", None), "mesh_dim_names", None) == ("tp",):
        return weight.to_local(), VocabSlice(weight)
    return weight, None


def _vocab_parallel_loss_sum(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int,
                             vocab: VocabSlice) -> Tensor:
    """The fused loss sum without gradients (evaluation) on a vocab-parallel head."""
    dtype = _compute_dtype(hidden)
    acc = torch.promote_types(dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_size):
            logits = F.linear(hidden[start : start + chunk_size].to(dtype), weight.to(dtype)).to(acc)
            y = targets[start : start + chunk_size]
            total += (vocab.logsumexp(logits) - vocab.target_logit(logits, y)).sum()
    return total


def fused_head_supported(head: nn.Module) -> bool:
    """A plain linear head (not wrapped by an adapter): the fused path can read its weight and bias."""
    return type(head) is nn.Linear


def zero_through_head(flat_hidden: Tensor, head: nn.Module) -> Tensor:
    """An exact 0 whose graph reaches every parameter of the decoder and of the head: one position through the
    head, times 0. A rank (or lockstep blank micro-batch) with no loss token must still give every trainable
    parameter a gradient, an exactly-zero one: FSDP reduce-scatters only the parameters that got a gradient, so a
    head left out on one rank makes the ranks' collectives differ (gloo aborts on the size mismatch, NCCL hangs).
    `hidden.sum() * 0` alone would reach the decoder but not the head."""
    weight, vocab = _head_weight(head)
    logits = head(flat_hidden[:1]) if vocab is None else F.linear(flat_hidden[:1], weight)
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).sum() * 0.0


def chunked_lm_loss(
    hidden: Tensor, labels: Tensor, head: nn.Module, chunk_size: int, fused: bool = True
) -> tuple[Tensor, Tensor]:
    """Sum of token cross-entropies and the number of loss tokens.

    hidden: [..., T, H] final hidden states; labels: [..., T] already shifted (labels[t] is the target of
    position t, IGNORE_INDEX where nothing is trained). Only positions with a label reach the head, so SFT
    prompts cost no head FLOPs at all. `fused=False` forces the checkpointed path (see the module docstring).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    count = torch.tensor(keep.numel(), device=labels.device, dtype=torch.long)
    if keep.numel() == 0:
        return zero_through_head(flat_hidden, head), count
    sel_hidden = flat_hidden.index_select(0, keep)
    sel_labels = flat_labels.index_select(0, keep)
    weight, vocab = _head_weight(head)
    if vocab is not None:  # the only path of a vocab-parallel head (which has no bias)
        if not torch.is_grad_enabled():
            return _vocab_parallel_loss_sum(sel_hidden, weight, sel_labels, chunk_size, vocab), count
        return _FusedLinearCrossEntropy.apply(sel_hidden, weight, None, sel_labels, chunk_size, vocab), count
    if fused and torch.is_grad_enabled() and fused_head_supported(head):
        return _FusedLinearCrossEntropy.apply(sel_hidden, head.weight, head.bias, sel_labels, chunk_size), count
    total = None
    for start in range(0, sel_hidden.shape[0], chunk_size):
        h = sel_hidden[start : start + chunk_size]
        y = sel_labels[start : start + chunk_size]
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss_sum, h, y, head, use_reentrant=False)
        else:
            part = _chunk_loss_sum(h, y, head)
        total = part if total is None else total + part
    assert total is not None
    return total, count


class _LinearTokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per row, chunk by chunk. Forward keeps only the per-row
    log-sum-exp; backward recomputes each chunk's logits once and turns them into their gradient in place, so a
    chunk costs one fp32 chunk x vocab buffer (not the three of a checkpointed cross-entropy's backward)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int,
                vocab: VocabSlice | None = None):
        dtype = _compute_dtype(hidden)
        acc = torch.promote_types(dtype, torch.float32)
        logps = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse_all = torch.empty_like(logps)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], chunk_size):
                stop = min(start + chunk_size, hidden.shape[0])
                logits = F.linear(hidden[start:stop].to(dtype), w, b).to(acc)
                y = targets[start:stop]
                if vocab is None:
                    lse = torch.logsumexp(logits, dim=-1)
                    logps[start:stop] = logits.gather(1, y.unsqueeze(1)).squeeze(1) - lse
                else:
                    lse = vocab.logsumexp(logits)
                    logps[start:stop] = vocab.target_logit(logits, y) - lse
                lse_all[start:stop] = lse
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.chunk_size, ctx.dtype, ctx.vocab = chunk_size, dtype, vocab
        return logps

    @staticmethod
    def backward(ctx, grad_logps: Tensor):
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        dtype, chunk_size = ctx.dtype, ctx.chunk_size
        acc = lse_all.dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], chunk_size):
                stop = min(start + chunk_size, hidden.shape[0])
                h = hidden[start:stop].to(dtype)
                y = targets[start:stop]
                g = grad_logps[start:stop].to(acc).unsqueeze(1)
                # d logp[y] / d logits = onehot(y) - softmax, times the incoming gradient, built in place.
                grad_logits = F.linear(h, w, b).to(acc).sub_(lse_all[start:stop].unsqueeze(1)).exp_().mul_(-g)
                if ctx.vocab is None:
                    grad_logits.scatter_add_(1, y.unsqueeze(1), g)
                else:
                    ctx.vocab.onehot_sub_(grad_logits, y, -g.squeeze(1))
                gl = grad_logits.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = (gl @ w).to(hidden.dtype)
                    if ctx.vocab is not None:
                        _tp_sum(grad_h[start:stop], ctx.vocab.group)
                if grad_w is not None:
                    if acc == dtype:
                        grad_w.addmm_(gl.t(), h)
                    else:
                        grad_w += (gl.t() @ h).to(acc)
                if grad_b is not None:
                    grad_b += grad_logits.sum(0)
                del grad_logits, gl
        out_w = grad_w.to(weight.dtype) if grad_w is not None else None
        out_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, out_w, out_b, None, None, None


def _chunk_token_logps(hidden: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits, targets, reduction="none")


def chunked_sequence_logps(
    hidden: Tensor, labels: Tensor, sequence_ids: Tensor, num_sequences: int, head: nn.Module, chunk_size: int,
    fused: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of target log-probs over *this rank's* tokens, and their token counts.

    hidden [B, T, H]; labels [B, T] shifted; sequence_ids [B, T] (which sequence each position belongs to).
    Returns (sums [num_sequences] differentiable, counts [num_sequences]); under SP both are partial and are
    summed over the SP group by the caller. A plain linear head runs chunk by chunk through
    `_LinearTokenLogProbs` (log-sum-exp kept, logits recomputed once in backward); any other head, or
    `fused=False`, runs each chunk under checkpointing.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    flat_ids = sequence_ids.reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    sums = hidden.new_zeros(num_sequences, dtype=dtype)
    counts = torch.zeros(num_sequences, dtype=dtype, device=hidden.device)
    if keep.numel() == 0:
        return sums + zero_through_head(flat_hidden, head).to(dtype), counts
    sel_hidden = flat_hidden.index_select(0, keep)
    sel_labels = flat_labels.index_select(0, keep)
    sel_ids = flat_ids.index_select(0, keep)
    weight, vocab = _head_weight(head)
    if vocab is not None:  # the only path of a vocab-parallel head
        token_logps = _LinearTokenLogProbs.apply(sel_hidden, weight, None, sel_labels, chunk_size, vocab)
    elif fused and fused_head_supported(head):
        token_logps = _LinearTokenLogProbs.apply(sel_hidden, head.weight, head.bias, sel_labels, chunk_size)
    else:
        parts = []
        for start in range(0, sel_hidden.shape[0], chunk_size):
            h = sel_hidden[start : start + chunk_size]
            y = sel_labels[start : start + chunk_size]
            if torch.is_grad_enabled():
                parts.append(checkpoint(_chunk_token_logps, h, y, head, use_reentrant=False))
            else:
                parts.append(_chunk_token_logps(h, y, head))
        token_logps = torch.cat(parts)
    token_logps = token_logps.to(dtype)
    sums = sums.index_add(0, sel_ids, token_logps)
    counts = counts.index_add(0, sel_ids, torch.ones_like(token_logps, dtype=dtype))
    return sums, counts
