"""The batch every data source yields to the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 = not trained; labels[b, t] is the token that follows input_ids[b, t]
    doc_ids: torch.Tensor | None = None  # (B, T) packed rows: one id per document (attention kept apart)

    @property
    def n_labelled(self) -> int:
        return int((self.labels != -100).sum())
