"""Helpers for the adapter parity tests: a tiny random llama built by transformers, written as an
f32 GGUF (with gguf.GGUFWriter and SmolLM2's tokenizer, so llama.cpp can load it), random LoRA
adapters, and llama-cpp-python runs with several adapters at chosen scales."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from loraforge.lora import Adapter

# SmolLM2's vocabulary (its tokenizer goes into the GGUF), a tiny GQA body.
TINY_LLAMA: dict[str, Any] = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
LAYER_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template")
GGML_TYPE_F32 = 0


def make_tiny_llama(seed: int = 0, tie: bool = False):
    """A random transformers LlamaForCausalLM (float32, eval) with visible norm weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp order (convert_hf_to_gguf.py's permute)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tokenizer_gguf: str) -> str:
    """The transformers model as an all-f32 llama GGUF, SmolLM2's tokenizer metadata copied in."""
    import gguf

    from loraforge.formats.gguf_file import read_gguf

    cfg = model.config
    meta = read_gguf(tokenizer_gguf).metadata
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(TINY_LLAMA["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unknown_token_id", w.add_unk_token_id), ("padding_token_id", w.add_pad_token_id)):
        if f"tokenizer.ggml.{key}" in meta:
            add(int(meta[f"tokenizer.ggml.{key}"]))
    w.add_add_bos_token(False)
    w.add_chat_template(meta["tokenizer.chat_template"])
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in LAYER_GGUF.items():
            x = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                x = llama_permute(x, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                x = llama_permute(x, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def random_adapter(cfg, modules: Sequence[str], rank: int = 4, seed: int = 0, std: float = 0.05,
                   alpha: float = 8.0, ranks: dict[str, int] | None = None, use_rslora: bool = False,
                   alpha_pattern: dict[str, float] | None = None) -> Adapter:
    """Nonzero random LoRA for every layer's `modules` (short HF names like "self_attn.q_proj"), plus
    "model.embed_tokens" / "lm_head" when listed, for a loraforge ModelConfig `cfg`."""
    from loraforge.formats.adapter_shapes import expected_ab_shapes

    g = torch.Generator().manual_seed(seed)
    names = [m for m in modules if m in ("model.embed_tokens", "lm_head")]
    names += [f"model.layers.{i}.{m}" for i in range(cfg.num_hidden_layers) for m in modules
              if m not in ("model.embed_tokens", "lm_head")]
    tensors = {}
    for name in names:
        r = (ranks or {}).get(name, rank)
        a_shape, b_shape = expected_ab_shapes(name, r, cfg)
        tensors[name + ".lora_A"] = torch.randn(a_shape, generator=g) * std
        tensors[name + ".lora_B"] = torch.randn(b_shape, generator=g) * std
    return Adapter(tensors=tensors, alpha=alpha, use_rslora=use_rslora, alpha_pattern=dict(alpha_pattern or {}))


class LlamaCpp:
    """A llama.cpp model (f32 KV cache, all logits) that can run with several LoRA adapters at scales."""

    def __init__(self, model_path: str, n_ctx: int = 64) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_threads=2,
                                   flash_attn=False, verbose=False)
        self._adapters: dict[str, Any] = {}

    def adapter(self, path: str):
        if path not in self._adapters:
            handle = self.lib.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
            if not handle:
                raise RuntimeError(f"llama.cpp refused the adapter {path}")
            self._adapters[path] = handle
        return self._adapters[path]

    def logits(self, tokens: Sequence[int], adapters: Sequence[tuple[str, float]] = ()) -> np.ndarray:
        """(len(tokens), vocab) float32 logits with `adapters` [(path, scale)] set on the context."""
        handles = [self.adapter(p) for p, _ in adapters]
        n = len(handles)
        arr = (self.lib.llama_adapter_lora_p_ctypes * max(n, 1))(*handles)
        scales = (ctypes.c_float * max(n, 1))(*[float(s) for _, s in adapters])
        rc = self.lib.llama_set_adapters_lora(self.llm._ctx.ctx, arr if n else None, n, scales if n else None)
        assert rc == 0, rc
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)
