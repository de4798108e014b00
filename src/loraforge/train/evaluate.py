"""Loss and perplexity of a model on a data source (every item once, in order)."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def evaluate_source(model: nn.Module, source, device: torch.device | str, ranks=None) -> tuple[float, float]:
    """Token-weighted mean cross-entropy over all items of `source`, and its perplexity.

    ranks: train.distributed.Ranks under torchrun: each process scores its share of every batch's
    rows and the sums are added up, so every process gets the single-process figure."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ids = list(range(source.n_items))
    for i in range(0, len(ids), source.items_per_batch):
        b = source.make_batch(ids[i:i + source.items_per_batch])
        if ranks is not None:
            b = ranks.rows(b)
        loss, n = model.loss(b.input_ids.to(device), b.labels.to(device),
                             None if b.doc_ids is None else b.doc_ids.to(device))
        total += float(loss) * n
        count += n
    if ranks is not None:
        total, count = ranks.sum([total, float(count)])
    model.train(was_training)
    mean = total / max(count, 1)
    return mean, math.exp(min(mean, 50.0))
