"""One decoder for the llama family (Llama 1/2/3.x, SmolLM, TinyLlama, OpenLLaMA, Mistral, Qwen2/3,
Gemma 2/3, Phi-3, Baichuan 2), driven by `ModelConfig`, with Hugging Face parameter names and RoPE
layout inside. The forward pass branches on the config's switches (q/k norms, norm offset,
sandwich norms, soft-capping, ALiBi, fused projections), never on a family's name.

Shapes: B batch, T new tokens, S keys (cache + new), H heads, G key/value heads, D head_dim,
R rotary dims (<= D), C hidden size, F intermediate size, V vocabulary.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from loraforge.config import ModelConfig, longrope_threshold, rope_attention_factor, rope_inv_freq
from loraforge.kernels.cpu_linear import frozen_linear
from loraforge.stacked import StackedBase, refresh, stacked_forward

IGNORE_INDEX = -100
ACT_FNS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Linear(nn.Linear):
    """nn.Linear whose frozen float32 weight multiplies through `kernels.cpu_linear` on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), in float32; offset 1 for Gemma's zero-centred weights."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.offset == 0.0 else self.weight.float() + self.offset
        return (weight * xf).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, 1, T, R) in HF's half-split layout, turning the first R dims."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    turned, kept = x[..., :rotary], x[..., rotary:]
    return torch.cat((turned * cos + rotate_half(turned) * sin, kept), dim=-1)


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


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         scale: float, cap: float) -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap) masked) v, as Gemma 2 computes it (SDPA cannot cap).

    q (B, H, T, D); k, v (B, G, S, D); mask (B|1, 1, T, S) bool, True = attend. -> (B, H, T, D).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(weights, v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c, bias = cfg.hidden_size, cfg.attention_bias
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_sizes = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        self.fused_qkv = cfg.fused_qkv  # name of the module holding q, k, v rows stacked, or None
        if self.fused_qkv:
            setattr(self, self.fused_qkv, Linear(c, sum(self.qkv_sizes), bias=bias))
        else:
            self.q_proj = Linear(c, cfg.q_size, bias=bias)
            self.k_proj = Linear(c, cfg.kv_size, bias=bias)
            self.v_proj = Linear(c, cfg.kv_size, bias=bias)
        self.stacked_qkv: StackedBase | None = None  # q/k/v bases as one matrix (CausalLM.stack_projections)
        self.o_proj = Linear(cfg.q_size, c, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
        self.qk_norm = cfg.qk_norm
        self.window = cfg.layer_window(layer_idx)  # sliding attention window, or None
        self.rope = None if cfg.alibi else cfg.layer_rope(layer_idx)  # which RoPE table, None: no RoPE
        self.scale = cfg.attention_scale() if cfg.query_pre_attn_scalar else None  # None: SDPA's 1/sqrt(D)
        self.softcap = cfg.attn_logit_softcap

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, T, H*D), k and v (B, T, G*D)."""
        if self.fused_qkv:
            return getattr(self, self.fused_qkv)(x).split(self.qkv_sizes, dim=-1)
        stacked = stacked_forward(x, self.stacked_qkv, (self.q_proj, self.k_proj, self.v_proj))
        if stacked is not None:
            return tuple(stacked)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None, start_pos: int) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). rope: cos, sin (B, 1, T, R) or None; mask (B|1, 1|H, T, S): bool
        (True = attend), float biases (ALiBi), a flex-attention BlockMask, or None = plain causal."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start_pos)
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, self.scale or self.head_dim ** -0.5, self.softcap)
        elif isinstance(mask, BlockMask):  # packed rows: per-document causal blocks, no dense mask
            # contiguous copies: torch 2.13's compiled CPU flex kernel misreads a v whose strides differ from k's
            y = flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=mask, scale=self.scale,
                               enable_gqa=self.n_kv_head != self.n_head)
        else:
            causal = mask is None and t > 1 and start_pos == 0
            # grouped-query attention without copying k/v per query head
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up as one stacked gate_up_proj when the config fuses them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, f = cfg.hidden_size, cfg.intermediate_size
        self.fused_gate_up = cfg.fused_gate_up
        if self.fused_gate_up:
            self.gate_up_proj = Linear(c, 2 * f, bias=False)
        else:
            self.gate_proj = Linear(c, f, bias=False)
            self.up_proj = Linear(c, f, bias=False)
        self.stacked_gate_up: StackedBase | None = None  # gate/up bases as one matrix
        self.down_proj = Linear(f, c, bias=False)
        self.act = ACT_FNS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            stacked = stacked_forward(x, self.stacked_gate_up, (self.gate_proj, self.up_proj))
            gate, up = stacked if stacked is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; with `post_norms` (Gemma 2/3) their outputs are normed too.

    HF names: input_layernorm before attention; without post_norms post_attention_layernorm is the
    norm before the MLP, with them it follows attention and pre_/post_feedforward_layernorm wrap the MLP.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        eps, offset = cfg.rms_norm_eps, cfg.norm_offset
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.post_norms = cfg.post_norms
        if self.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ropes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                masks: dict[int | None, torch.Tensor | None], cache: KVCache | None, start_pos: int
                ) -> torch.Tensor:
        """x (B, T, C); ropes: cos/sin by table name; masks: attention mask by sliding window (None = full)."""
        attn = self.self_attn
        rope = ropes[attn.rope] if attn.rope is not None else None
        h = attn(self.input_layernorm(x), rope, masks[attn.window], cache, start_pos)
        if self.post_norms:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF `model.*`: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class CausalLM(nn.Module):
    """The whole model: `model.*` decoder and `lm_head` (tied to the embeddings when configured)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for name, table in rope_tables(cfg).items():
            self.register_buffer(name, table, persistent=False)
        if cfg.alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.num_attention_heads), persistent=False)
        self.gradient_checkpointing = False
        # q/k/v and gate/up as one matmul each (loraforge.stacked); LORAFORGE_STACK_PROJECTIONS=0 turns it off
        self.stack_projections = os.environ.get("LORAFORGE_STACK_PROJECTIONS", "1") != "0"
        self.compiled_layer = None  # loraforge.compiled.CompiledLayer: layers run through torch.compile

    # -- building blocks -------------------------------------------------------------------------
    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin (B, 1, T, R) for position_ids (B, T), per RoPE table ("global", "local")."""
        cfg = self.config
        threshold = longrope_threshold(cfg)
        use_long = threshold is not None and int(position_ids.max()) + 1 > threshold  # as transformers decides
        factor = rope_attention_factor(cfg)
        ropes = {}
        for kind, inv_freq in (("global", self.inv_freq_long if use_long else self.inv_freq),
                               ("local", getattr(self, "inv_freq_local", None))):
            if inv_freq is None:
                continue
            freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, R/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            if factor != 1.0:
                cos, sin = cos * factor, sin * factor
            ropes[kind] = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
        return ropes

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C), times sqrt(C) in their own dtype when the config scales them."""
        x = self.model.embed_tokens(input_ids)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      start_pos: int = 0) -> torch.Tensor:
        """Final-norm hidden states (B, T, C).

        doc_ids (B, T): packed rows; attention stays inside each document and positions restart
        at each document's first token (unless position_ids are given).
        """
        b, t = input_ids.shape
        device = input_ids.device
        x = self.embed(input_ids)
        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_doc_ids(doc_ids)
            else:
                position_ids = torch.arange(start_pos, start_pos + t, device=device).expand(b, t)
        if doc_ids is not None and start_pos > 0:
            raise ValueError("doc_ids (packed rows) cannot continue a KV cache (start_pos > 0)")
        cfg = self.config
        explicit = cfg.attn_logit_softcap is not None or cfg.alibi  # paths that need the mask spelled out
        windows = {layer.self_attn.window for layer in self.model.layers}
        compiled = self.compiled_layer
        if compiled is not None and (cache is not None or not compiled.active):
            compiled = None
        if doc_ids is not None and not explicit and compiled is not None and compiled.flex_attention and (
                device.type == "cuda" or not torch.is_grad_enabled()):
            # fused kernels, no T x T mask (torch 2.13's CPU flex attention has no backward: CPU training keeps
            # the dense mask, B x T x T booleans, a few MB at CPU context lengths)
            masks = {w: compiled.block_mask(doc_ids, w) for w in windows}
        else:
            masks = {w: attention_mask(t, start_pos, doc_ids, w, device, explicit) for w in windows}
        if cfg.alibi:
            masks = {w: alibi_bias(m, self.alibi_slopes, start_pos, x.dtype) for w, m in masks.items()}
        ropes = self.rope(position_ids, x.dtype)
        self.refresh_stacks()
        for layer in self.model.layers:
            run = layer if compiled is None else compiled.bind(layer)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(run, x, ropes, masks, cache, start_pos, use_reentrant=False)
            else:
                x = run(x, ropes, masks, cache, start_pos)
        return self.model.norm(x)

    def refresh_stacks(self) -> None:
        """Stack each layer's q/k/v and gate/up bases (`stack_projections`), or keep the valid stacks."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not attn.fused_qkv:
                attn.stacked_qkv = (refresh(attn.stacked_qkv, (attn.q_proj, attn.k_proj, attn.v_proj))
                                    if self.stack_projections else None)
            if not mlp.fused_gate_up:
                mlp.stacked_gate_up = (refresh(mlp.stacked_gate_up, (mlp.gate_proj, mlp.up_proj))
                                       if self.stack_projections else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of hidden states (..., C) -> (..., V) float32, soft-capped when configured."""
        out = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcap
        return out if cap is None else torch.tanh(out / cap) * cap

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        """Logits (B, T, V) in float32."""
        return self.logits(self.hidden_states(input_ids, position_ids, doc_ids, cache, start_pos))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over labels != -100, and the count of those tokens.

        labels (B, T) are already aligned: labels[b, t] is the token that should follow input_ids[b, t].
        """
        h = self.hidden_states(input_ids, position_ids, doc_ids)
        head = self.logits if self.config.final_logit_softcap is not None else self.lm_head
        trainable = tuple(p for p in self.lm_head.parameters() if p.requires_grad)
        return chunked_cross_entropy(h.flatten(0, 1), labels.flatten(), head, chunk_tokens, trainable,
                                     self.config.vocab_size)


def rope_tables(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's inverse-frequency buffers: inv_freq, plus inv_freq_local (Gemma 3's sliding layers)
    and inv_freq_long (LongRoPE) when the config has them."""
    tables = {"inv_freq": rope_inv_freq(cfg)}
    if cfg.rope_local_theta is not None:
        tables["inv_freq_local"] = rope_inv_freq(cfg, "local")
    if longrope_threshold(cfg) is not None:
        tables["inv_freq_long"] = rope_inv_freq(cfg, "long")
    return tables


def alibi_slopes(n_head: int, max_bias: float = 8.0) -> torch.Tensor:
    """ALiBi slopes (H,): 2^(-8/n) powers for the largest power of two n <= H, the odd powers of the
    next one's for the rest (Baichuan 13B's _get_interleave, llama.cpp's max_bias 8)."""
    n = 2 ** math.floor(math.log2(n_head))
    m0, m1 = 2.0 ** (-max_bias / n), 2.0 ** (-max_bias / 2 / n)
    return torch.tensor([m0 ** (h + 1) if h < n else m1 ** (2 * (h - n) + 1) for h in range(n_head)],
                        dtype=torch.float32)


def alibi_bias(visible: torch.Tensor, slopes: torch.Tensor, start_pos: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention biases (B|1, H, T, S): slope_h * (key - query) where visible, -inf elsewhere."""
    t, s = visible.shape[-2:]
    q_pos = torch.arange(start_pos, start_pos + t, device=visible.device)[:, None]
    k_pos = torch.arange(s, device=visible.device)[None, :]
    bias = slopes.to(visible.device)[:, None, None] * (k_pos - q_pos).float()  # (H, T, S)
    return torch.where(visible, bias[None], float("-inf")).to(dtype)


def attention_mask(t: int, start_pos: int, doc_ids: torch.Tensor | None, window: int | None,
                   device: torch.device, explicit: bool = False) -> torch.Tensor | None:
    """Which keys each query sees: (B|1, 1, T, start_pos+T) bool, True = attend.

    None when plain causal attention over the T new tokens is exact (SDPA's is_causal fast path,
    or a single query that sees every cached key), unless `explicit`. Queries sit at positions
    start_pos..start_pos+T-1 of the row; a key is seen if it is not in the future, lies in the same
    document (doc_ids, B x T), and, with a sliding window, is one of the last `window` positions
    (the query's own included).
    """
    s = start_pos + t
    windowed = window is not None and s > window
    if doc_ids is None and not windowed and (start_pos == 0 or t == 1) and not explicit:
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


def document_block_mask(doc_ids: torch.Tensor, window: int | None) -> BlockMask:
    """Flex-attention block mask of packed rows doc_ids (B, T): causal within each document (and the
    last `window` positions). Blocks that no query of a document reaches are skipped by the kernels,
    and the per-element rule is evaluated on the fly from doc_ids, never stored as a T x T mask."""
    def same_document(b, h, q_idx, kv_idx):
        visible = (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return visible if window is None else visible & (kv_idx > q_idx - window)

    b, t = doc_ids.shape
    return create_block_mask(same_document, b, None, t, t, device=doc_ids.device)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) restarting at 0 wherever doc_ids changes along T."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


# Logits held at once by the LM-head loss when chunk_tokens is not given: 64 MiB of float32 (341 tokens
# of a 49152 vocabulary, 130 of a 128256 one).
LOGITS_CHUNK_BYTES = 64 << 20


class _HeadCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of head(hidden) against labels, chunk by chunk of tokens, with the
    gradients made in the forward: per chunk the logits, their softmax turned in place into the
    logits' gradient (softmax - one-hot), and the vector-Jacobian product through the head into the
    hidden states (and the head's trainable parameters, e.g. an lm_head LoRA). The logits are freed
    before the next chunk and never recomputed; backward only scales the stored gradients.

    hidden (N, C); labels (N,) all valid; head: hidden -> logits (any module or function); params:
    the head's trainable tensors, passed so that autograd routes their gradients.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, labels: torch.Tensor, head, chunk_tokens: int, *params: torch.Tensor):
        wants_grad = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[4:])
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_params = [torch.zeros_like(p) if p.requires_grad else None for p in params]
        for i in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[i:i + chunk_tokens].detach(), labels[i:i + chunk_tokens]
            with torch.enable_grad():
                h.requires_grad_(ctx.needs_input_grad[0])
                out = head(h)
                logits = out.detach().float()
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                total += (lse - logits.gather(1, y[:, None])[:, 0]).sum()
                if not wants_grad:
                    continue
                grad_logits = torch.softmax(logits, dim=-1)  # a new tensor: the head's backward may need `out`
                grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
                inputs = ([h] if ctx.needs_input_grad[0] else []) + [p for p in params if p.requires_grad]
                grads = torch.autograd.grad(out, inputs, grad_logits.to(out.dtype))
            grads = list(grads)
            if grad_hidden is not None:
                grad_hidden[i:i + chunk_tokens] = grads.pop(0)
            for j, p in enumerate(params):
                if p.requires_grad:
                    grad_params[j] += grads.pop(0)
        ctx.save_for_backward(*([] if grad_hidden is None else [grad_hidden]))
        ctx.grad_params = grad_params
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden = ctx.saved_tensors[0] * grad_total.to(ctx.saved_tensors[0].dtype) if ctx.saved_tensors else None
        grad_params = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.grad_params]
        return (grad_hidden, None, None, None, *grad_params)


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, lm_head, chunk_tokens: int | None = None,
                          head_params: tuple[torch.Tensor, ...] = (), vocab_size: int | None = None
                          ) -> tuple[torch.Tensor, int]:
    """Cross-entropy of lm_head(hidden) (N, C) against labels (N,), never holding all N x V logits:
    the LM head and the cross-entropy fused (`_HeadCrossEntropy`), chunk_tokens tokens at a time (None:
    as many as LOGITS_CHUNK_BYTES of float32 logits of vocab_size hold, else 1024).

    `lm_head` is any callable from hidden states to logits (a module, or `CausalLM.logits`);
    head_params: its trainable tensors (an lm_head adapter), which get their gradients too.
    Returns (mean loss over valid tokens, number of valid tokens).
    """
    keep = labels != IGNORE_INDEX
    n_valid = int(keep.sum())
    if n_valid == 0:
        return hidden.sum() * 0.0, 0
    hidden, labels = hidden[keep], labels[keep]
    if chunk_tokens is None:
        chunk_tokens = max(32, LOGITS_CHUNK_BYTES // (4 * vocab_size)) if vocab_size else 1024
    total = _HeadCrossEntropy.apply(hidden, labels, lm_head, chunk_tokens, *head_params)
    return total / n_valid, n_valid


def build_on_meta(cfg: ModelConfig) -> CausalLM:
    """The model with parameters on the meta device (no memory), to be filled by the loaders."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    for name, table in rope_tables(cfg).items():
        setattr(model, name, table)
    if cfg.alibi:
        model.alibi_slopes = alibi_slopes(cfg.num_attention_heads)
    return model
