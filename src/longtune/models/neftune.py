"""NEFTune (Jain et al., 2023): during training, add Uniform(-1, 1) noise scaled by alpha / sqrt(L * d) to the
input embeddings, where L is the real length of the token's own document (not the padded or packed row) and d
the hidden size. Implemented as a forward hook on the input embedding module; evaluation sees no noise."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longtune.data.collate import PAD_DOCUMENT, Batch


def neftune_scales(batch: Batch, alpha: float, hidden_size: int) -> Tensor:
    """[B, T] per-token scale alpha / sqrt(L_doc * d); 0 on padding."""
    docs = batch.doc_ids
    scale = torch.zeros(docs.shape, dtype=torch.float64)
    for row in range(docs.shape[0]):
        ids, counts = torch.unique(docs[row], return_counts=True)
        for doc, count in zip(ids.tolist(), counts.tolist()):
            if doc != PAD_DOCUMENT:
                scale[row][docs[row] == doc] = alpha / math.sqrt(count * hidden_size)
    return scale


class NEFTune:
    """Holds the per-token scale of the micro-batch about to run; the trainer sets it before each forward."""

    def __init__(self, embeddings: nn.Module):
        self.scale: Tensor | None = None
        self.handle = embeddings.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output: Tensor) -> Tensor | None:
        if not module.training or self.scale is None:
            return None
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * self.scale.to(device=output.device, dtype=output.dtype).unsqueeze(-1)

    def remove(self) -> None:
        self.handle.remove()
