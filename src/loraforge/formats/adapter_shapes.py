"""Shapes an adapter must have for a base model, and the one-line errors when it does not.

The readers and writers of every adapter format call these (and nothing else of the adapter
layer), so they import this module only: `formats.adapters`, which opens any format, imports
the readers, never the other way round.

Shapes are the HF ones of `lora.Adapter`: `<module>.lora_A` (r, in) and `.lora_B` (out, r); for
`model.embed_tokens` A is (r, vocab) and B (hidden, r).
"""

from __future__ import annotations

import re

from loraforge.config import ModelConfig
from loraforge.errors import file_error
from loraforge.lora import Adapter

_LAYER_MODULES = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "self_attn.qkv_proj", "self_attn.W_pack", "mlp.gate_up_proj",  # stacked (Phi-3, Baichuan)
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def is_known_module(module: str) -> bool:
    """True for HF module names an adapter may target ("model.layers.3.mlp.up_proj", "lm_head", ...)."""
    if module in ("model.embed_tokens", "lm_head"):
        return True
    m = _LAYER_RE.match(module)
    return m is not None and m.group(2) in _LAYER_MODULES


def _check_known(module: str, source: str) -> None:
    if not is_known_module(module):
        raise file_error(source, f"unknown target module {module!r} (a llama-family adapter targets "
                                 "q/k/v/o_proj, gate/up/down_proj, embed_tokens or lm_head)")


def module_weight_shape(module: str, cfg: ModelConfig) -> tuple[int, int]:
    """(out, in) of a module's weight in HF layout; embeddings give (vocab, hidden)."""
    h, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    if module in ("model.embed_tokens", "lm_head"):
        return cfg.vocab_size, h
    short = module.rsplit(".", 1)[-1]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
            "qkv_proj": (q + 2 * kv, h), "W_pack": (q + 2 * kv, h), "gate_up_proj": (2 * f, h)}[short]


def expected_ab_shapes(module: str, rank: int, cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (lora_A, lora_B) for `module` at `rank`."""
    out_f, in_f = module_weight_shape(module, cfg)
    if module == "model.embed_tokens":
        return (rank, out_f), (in_f, rank)  # A (r, vocab), B (hidden, r)
    return (rank, in_f), (out_f, rank)


def check_adapter(adapter: Adapter, cfg: ModelConfig | None, source: str) -> None:
    """Raise a one-line error naming `source` if a module is unknown, a pair is incomplete, or a
    shape does not fit the base model `cfg` (when given)."""
    names = {k.rpartition(".")[0] for k in adapter.tensors}
    for key in adapter.tensors:
        if not key.endswith((".lora_A", ".lora_B")):
            raise file_error(source, f"unexpected adapter tensor {key!r}")
    if not names:
        raise file_error(source, "holds no LoRA tensors")
    for module in sorted(names):
        _check_known(module, source)
        a = adapter.tensors.get(module + ".lora_A")
        b = adapter.tensors.get(module + ".lora_B")
        if a is None or b is None:
            raise file_error(source, f"module {module} has only one of lora_A / lora_B")
        if a.ndim != 2 or b.ndim != 2:
            raise file_error(source, f"module {module}: LoRA tensors must be 2-D")
        rank = int(a.shape[0])
        if cfg is None:
            if int(b.shape[1]) != rank:
                raise file_error(source, f"module {module}: lora_A has rank {rank}, lora_B {int(b.shape[1])}")
            continue
        check_pair_shapes(module, tuple(a.shape), tuple(b.shape), cfg, source)


def check_pair_shapes(module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], cfg: ModelConfig,
                      source: str) -> None:
    """One line naming `source` when lora_A (r, in) / lora_B (out, r) (HF layout) of a known `module`
    do not fit the base model `cfg`. Readers call it before any q/k row permutation."""
    _check_known(module, source)
    m = _LAYER_RE.match(module)
    if m is not None and int(m.group(1)) >= cfg.num_hidden_layers:
        raise file_error(source, f"module {module} is beyond the base model's {cfg.num_hidden_layers} "
                                 "layers (an adapter for another model?)")
    rank = int(a_shape[0]) if a_shape else 0
    want_a, want_b = expected_ab_shapes(module, rank, cfg)
    if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
        raise file_error(source, f"module {module}: lora_A {tuple(a_shape)} / lora_B {tuple(b_shape)} do not "
                                 f"fit the base model (expected {want_a} / {want_b}; an adapter for "
                                 "another model?)")
