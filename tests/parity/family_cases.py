"""The tiny models of every family the parity tests share: transformers configs (`make_tiny_hf_model`
arguments) and Baichuan 2 layouts (`baichuan_reference.make_tiny_baichuan` arguments)."""

from __future__ import annotations

import torch
from baichuan_reference import ALIBI_LAYERS, ROPE_LAYERS

LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 16}
FAMILY_CASES = {
    "qwen3": dict(arch="qwen3", head_dim=32),  # head_dim != hidden / heads, q/k norms, GQA
    "qwen3-tied": dict(arch="qwen3", tie_word_embeddings=True),
    "gemma2": dict(arch="gemma2", sliding_window=7, query_pre_attn_scalar=24),
    # larger weights (initializer_range) so that scores and logits reach the caps' curved part
    "gemma2-caps": dict(arch="gemma2", sliding_window=7, attn_logit_softcapping=0.5, final_logit_softcapping=1.0,
                        initializer_range=0.04),
    "gemma3": dict(arch="gemma3", sliding_window=7, num_hidden_layers=7),  # layer 5 global, the others local
    "gemma3-scaled": dict(arch="gemma3", sliding_window=7, num_hidden_layers=7,
                          rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "gemma3-capped": dict(arch="gemma3", sliding_window=7, num_hidden_layers=7, final_logit_softcapping=0.2),
    "phi3": dict(arch="phi3"),
    "phi3-window": dict(arch="phi3", sliding_window=7),
    # transformers' Phi3Config takes original_max_position_embeddings at the top level
    "phi3-longrope": dict(arch="phi3", max_position_embeddings=128, original_max_position_embeddings=16,
                          rope_scaling=LONGROPE),  # 40 tokens > 16: long factors
    "phi3-longrope-short": dict(arch="phi3", max_position_embeddings=512, original_max_position_embeddings=64,
                                rope_scaling={**LONGROPE, "original_max_position_embeddings": 64}),
    "phi3-partial": dict(arch="phi3", partial_rotary_factor=0.5),
    "mistral-headdim": dict(arch="mistral", head_dim=32),  # Mistral-Nemo style
}
BAICHUAN_CASES = {"baichuan-7b": dict(n_layers=ROPE_LAYERS), "baichuan-13b": dict(n_layers=ALIBI_LAYERS),
                  "baichuan-13b-6heads": dict(n_layers=ALIBI_LAYERS, n_heads=6, hidden=48)}




def packed_documents(vocab: int) -> tuple[list[list[torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Two packed rows of 24 tokens (documents of 9, 5, 10 and 17, 7 random ids below vocab): the
    documents per row, ids (2, 24) and doc_ids (2, 24), the document's index within its row."""
    gen = torch.Generator().manual_seed(6)
    docs = [[torch.randint(0, vocab, (n,), generator=gen) for n in row] for row in [[9, 5, 10], [17, 7]]]
    ids = torch.stack([torch.cat(row) for row in docs])
    doc_ids = torch.stack([torch.cat([torch.full((len(d),), j) for j, d in enumerate(row)]) for row in docs])
    return docs, ids, doc_ids
