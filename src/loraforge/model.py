"""One decoder for the llama family (Llama 1/2/3.x, SmolLM, TinyLlama, OpenLLaMA, Mistral, Qwen2),
driven by `ModelConfig`, with Hugging Face parameter names and RoPE layout inside.

Shapes: B batch, T new tokens, S keys (cache + new), H heads, G key/value heads, D head_dim,
C hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraforge.config import ModelConfig, rope_inv_freq

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, 1, T, D) in HF's half-split layout."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of past positions for every layer: (L, B, G, max_len, D)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, G, T, D) at [start, start+T); return all keys/values up to start+T."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c, bias = cfg.hidden_size, cfg.attention_bias
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(c, cfg.q_size, bias=bias)
        self.k_proj = nn.Linear(c, cfg.kv_size, bias=bias)
        self.v_proj = nn.Linear(c, cfg.kv_size, bias=bias)
        self.o_proj = nn.Linear(cfg.q_size, c, bias=cfg.o_proj_bias)
        self.window = cfg.layer_window(layer_idx)  # sliding attention window, or None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, start_pos: int) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). mask (B|1, 1, T, S) bool (True = attend) or None = plain causal."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start_pos)
        causal = mask is None and t > 1 and start_pos == 0
        # grouped-query attention without copying k/v per query head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                masks: dict[int | None, torch.Tensor | None], cache: KVCache | None, start_pos: int
                ) -> torch.Tensor:
        """x (B, T, C); masks: attention mask by sliding window (None = full attention)."""
        mask = masks[self.self_attn.window]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF `model.*`: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole model: `model.*` decoder and `lm_head` (tied to the embeddings when configured)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False

    # -- building blocks -------------------------------------------------------------------------
    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, D) for position_ids (B, T)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      start_pos: int = 0) -> torch.Tensor:
        """Final-norm hidden states (B, T, C).

        doc_ids (B, T): packed rows; attention stays inside each document and positions restart
        at each document's first token (unless position_ids are given).
        """
        b, t = input_ids.shape
        device = input_ids.device
        x = self.model.embed_tokens(input_ids)
        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_doc_ids(doc_ids)
            else:
                position_ids = torch.arange(start_pos, start_pos + t, device=device).expand(b, t)
        if doc_ids is not None and start_pos > 0:
            raise ValueError("doc_ids (packed rows) cannot continue a KV cache (start_pos > 0)")
        windows = {layer.self_attn.window for layer in self.model.layers}
        masks = {w: attention_mask(t, start_pos, doc_ids, w, device) for w in windows}
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, masks, cache, start_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks, cache, start_pos)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        """Logits (B, T, V) in float32."""
        h = self.hidden_states(input_ids, position_ids, doc_ids, cache, start_pos)
        return self.lm_head(h).float()

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over labels != -100, and the count of those tokens.

        labels (B, T) are already aligned: labels[b, t] is the token that should follow input_ids[b, t].
        """
        h = self.hidden_states(input_ids, position_ids, doc_ids)
        return chunked_cross_entropy(h.flatten(0, 1), labels.flatten(), self.lm_head, chunk_tokens)


def attention_mask(t: int, start_pos: int, doc_ids: torch.Tensor | None, window: int | None,
                   device: torch.device) -> torch.Tensor | None:
    """Which keys each query sees: (B|1, 1, T, start_pos+T) bool, True = attend.

    None when plain causal attention over the T new tokens is exact (SDPA's is_causal fast path,
    or a single query that sees every cached key). Queries sit at positions start_pos..start_pos+T-1
    of the row; a key is seen if it is not in the future, lies in the same document (doc_ids, B x T),
    and, with a sliding window, is one of the last `window` positions (the query's own included).
    """
    s = start_pos + t
    windowed = window is not None and s > window
    if doc_ids is None and not windowed and (start_pos == 0 or t == 1):
        return None
    q_pos = torch.arange(start_pos, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = k_pos <= q_pos  # (T, S)
    if windowed:
        mask = mask & (k_pos > q_pos - window)
    mask = mask[None, None]
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T), start_pos == 0 so S == T
        mask = mask & same_doc[:, None]
    return mask


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) restarting at 0 wherever doc_ids changes along T."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def _chunk_loss_sum(h: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    logits = lm_head(h).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                          chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """Cross-entropy of lm_head(hidden) (N, C) against labels (N,), never holding all N x V logits.

    Each chunk's logits are recomputed in backward (checkpointed), so peak memory is one chunk's.
    Returns (mean loss over valid tokens, number of valid tokens).
    """
    keep = labels != IGNORE_INDEX
    n_valid = int(keep.sum())
    if n_valid == 0:
        return hidden.sum() * 0.0, 0
    hidden, labels = hidden[keep], labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    for i in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[i:i + chunk_tokens], labels[i:i + chunk_tokens]
        if needs_grad and hidden.shape[0] > chunk_tokens:
            total = total + checkpoint(_chunk_loss_sum, h, y, lm_head, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, y, lm_head)
    return total / n_valid, n_valid


def build_on_meta(cfg: ModelConfig) -> CausalLM:
    """The model with parameters on the meta device (no memory), to be filled by the loaders."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.inv_freq = rope_inv_freq(cfg)
    return model
