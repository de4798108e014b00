"""HF <-> GGUF tensor names, the q/k row permutation of llama-arch GGUF files, and the table of
how each supported architecture is stored (`ARCHES`), for readers, writers and converters.

Names are templated with `{}` for the layer index. Converters are pure functions; an
unknown name raises instead of being dropped.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from loraforge.errors import LoraforgeError

# GGUF name template -> HF name template, shared by every architecture (see ArchFacts.names for
# the per-architecture differences).
GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_qkv.weight": "model.layers.{}.self_attn.qkv_proj.weight",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
HF_TO_GGUF: dict[str, str] = {v: k for k, v in GGUF_TO_HF.items()}

# GGUF tensors that carry no weights of the HF model (read into the config, or unused).
GGUF_AUX_TENSORS = ("rope_freqs.weight", "blk.{}.attn_rot_embd", "rope_factors_long.weight",
                    "rope_factors_short.weight")

# HF module short names as used by PEFT's target_modules, and the llama.cpp finetune rank flags.
MODULE_SHORT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_GEMMA_NORMS = {
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}


@dataclass(frozen=True)
class ArchFacts:
    """How one architecture is stored in HF folders and in llama.cpp's GGUF files (as llama.cpp's
    convert_hf_to_gguf.py writes them and src/llama-model.cpp reads them)."""

    hf_model_types: tuple[str, ...]  # config.json model_type values
    hf_class: str  # transformers class (config.json "architectures")
    permuted_qk: bool = False  # GGUF q/k rows in interleaved-rope order (llama.cpp LLAMA_ROPE_TYPE_NORM)
    norm_plus_one: bool = False  # GGUF *norm.weight hold HF weight + 1 (Gemma's x * (1 + w) norms)
    hf_fused_qkv: str | None = None  # HF module with q, k, v rows stacked ("qkv_proj", "W_pack")
    gguf_splits_qkv: bool = False  # the converter splits hf_fused_qkv into attn_q/attn_k/attn_v
    fused_gate_up: bool = False  # HF mlp.gate_up_proj (gate rows, then up rows) == GGUF ffn_up
    output_tied: bool = False  # GGUF files never carry output.weight (the token embeddings are used)
    names: dict[str, str] = field(default_factory=dict)  # GGUF -> HF templates that differ from GGUF_TO_HF
    # GGUF metadata keys (after "{arch}.") of the family's own numbers, by HF config.json field
    gguf_keys: dict[str, str] = field(default_factory=dict)


ARCHES: dict[str, ArchFacts] = {
    "llama": ArchFacts(("llama",), "LlamaForCausalLM", permuted_qk=True),
    "mistral": ArchFacts(("mistral",), "MistralForCausalLM", permuted_qk=True,
                         gguf_keys={"sliding_window": "attention.sliding_window"}),
    "qwen2": ArchFacts(("qwen2",), "Qwen2ForCausalLM"),
    "qwen3": ArchFacts(("qwen3",), "Qwen3ForCausalLM"),
    "gemma2": ArchFacts(("gemma2",), "Gemma2ForCausalLM", norm_plus_one=True, output_tied=True, names=_GEMMA_NORMS,
                        gguf_keys={"attn_logit_softcapping": "attn_logit_softcapping",
                                   "final_logit_softcapping": "final_logit_softcapping",
                                   "sliding_window": "attention.sliding_window"}),
    "gemma3": ArchFacts(("gemma3_text", "gemma3"), "Gemma3ForCausalLM", norm_plus_one=True, names=_GEMMA_NORMS,
                        gguf_keys={"final_logit_softcapping": "final_logit_softcapping",
                                   "sliding_window": "attention.sliding_window",
                                   "rope_local_base_freq": "rope.freq_base_swa"}),
    "phi3": ArchFacts(("phi3",), "Phi3ForCausalLM", hf_fused_qkv="qkv_proj", fused_gate_up=True,
                      names={"blk.{}.ffn_up.weight": "model.layers.{}.mlp.gate_up_proj.weight"},
                      gguf_keys={"original_max_position_embeddings": "rope.scaling.original_context_length",
                                 "attention_factor": "rope.scaling.attn_factor",
                                 "sliding_window": "attention.sliding_window"}),
    # Baichuan 2: llama.cpp's converter splits W_pack into attn_q/k/v and permutes q/k; the 40-layer
    # (13B) model uses ALiBi instead of RoPE.
    "baichuan": ArchFacts(("baichuan",), "BaichuanForCausalLM", permuted_qk=True, hf_fused_qkv="W_pack",
                          gguf_splits_qkv=True),
}
GGUF_ARCHES = tuple(ARCHES)


def arch_facts(arch: str) -> ArchFacts:
    """The facts of a GGUF architecture; unknown ones read as plain llama-family without permutation."""
    return ARCHES.get(arch, ArchFacts((arch,), ""))


_LAYER_RE = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, int | None]:
    m = _LAYER_RE.search(name)
    if m is None:
        return name, None
    return name[:m.start()] + ".{}." + name[m.end():], int(m.group(1))


@functools.lru_cache(maxsize=None)
def _name_tables(arch: str) -> tuple[dict[str, str], dict[str, str]]:
    """(GGUF -> HF, HF -> GGUF) templates of one architecture."""
    gguf_to_hf = {**GGUF_TO_HF, **arch_facts(arch).names}
    return gguf_to_hf, {v: k for k, v in gguf_to_hf.items()}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (GGUF architecture `arch`);
    unknown names raise."""
    tpl, layer = _template(name)
    hf = _name_tables(arch)[0].get(tpl)
    if hf is None:
        raise LoraforgeError(f"unknown GGUF tensor {name!r}")
    return hf.format(layer) if layer is not None else hf


def hf_to_gguf_name(name: str, arch: str = "llama") -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (GGUF architecture `arch`);
    unknown names raise."""
    tpl, layer = _template(name)
    gguf_name = _name_tables(arch)[1].get(tpl)
    if gguf_name is None:
        raise LoraforgeError(f"unknown model tensor {name!r}")
    return gguf_name.format(layer) if layer is not None else gguf_name


def is_aux_gguf_tensor(name: str) -> bool:
    return _template(name)[0] in GGUF_AUX_TENSORS


def is_norm_plus_one(hf_name: str, arch: str) -> bool:
    """True for an HF norm weight that the GGUF file of `arch` stores with 1 added (Gemma)."""
    return arch_facts(arch).norm_plus_one and hf_name.endswith("norm.weight")


ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _swap_pairs(w: ArrayT, n_head: int, split: tuple[int, int]) -> ArrayT:
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    w = w.reshape((n_head, *split, *rest))
    w = w.swapaxes(1, 2) if isinstance(w, np.ndarray) else w.transpose(1, 2)
    return w.reshape((rows, *rest))


def permute_qk_hf_to_gguf(w: ArrayT, n_head: int) -> ArrayT:
    """Rows of an HF q/k weight (out, ...) into llama.cpp's interleaved-rope order.

    Works on any trailing shape: a weight (out, in), a bias (out,), a LoRA B (out, r), or the
    (out, bytes_per_row) blocks of a quantized weight (quant blocks run along rows).
    """
    head_dim = w.shape[0] // n_head
    return _swap_pairs(w, n_head, (2, head_dim // 2))


def permute_qk_gguf_to_hf(w: ArrayT, n_head: int) -> ArrayT:
    """Inverse of `permute_qk_hf_to_gguf`."""
    head_dim = w.shape[0] // n_head
    return _swap_pairs(w, n_head, (head_dim // 2, 2))


def needs_qk_permutation(gguf_arch: str) -> bool:
    """llama-arch GGUF files (Llama, Mistral, SmolLM, Baichuan ...) store q/k permuted; NEOX-rope
    architectures (qwen2/3, gemma2/3, phi3) do not."""
    return arch_facts(gguf_arch).permuted_qk


def qk_heads(hf_name: str, n_head: int, n_kv_head: int) -> int | None:
    """Heads to permute by for an HF tensor name, or None if it is not a q/k projection."""
    if ".self_attn.q_proj." in hf_name:
        return n_head
    if ".self_attn.k_proj." in hf_name:
        return n_kv_head
    return None
