"""Greedy generation against llama.cpp (llama-cpp-python): the same f32 GGUF base, with no
adapter, one adapter, and two adapters at 0.4 and 0.8 (`--lora-scaled`), token for token.

Prompt ids come from llama.cpp's own tokenizer and are fed to both sides. llama.cpp runs with
an f32 KV cache so that both compute in float32; what remains is summation order, which
moves logits by ~1e-6 and cannot flip a greedy choice unless two logits tie that closely
(the first-step logit difference is checked too).

- `tiny`: a random untied GQA llama (3 layers, hidden 64) written here with gguf.GGUFWriter,
  carrying SmolLM2's tokenizer metadata so llama.cpp can tokenize.
- `smollm2` (slow): the embedded SmolLM2-135M dequantized to an f32 GGUF here, the real model.
- The shipped Q4_1 file (slow): read by us it equals llama.cpp's run of its f32 dequantization
  token for token. llama.cpp's run of the Q4_1 file itself differs from both: it rounds
  activations to Q8_1 for its Q4_1 dot products (logits move by up to ~1.5, greedy paths part
  after 1-25 tokens), so against it only the first token is required to agree.
"""

from __future__ import annotations

import copy
import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from loraforge.generate import Sampler, attach_adapters, generate_tokens  # noqa: E402
from loraforge.loader import load_model  # noqa: E402

GGML_TYPE_F32 = 0
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,",
           "def fibonacci(n):", "안녕하세요, 오늘은"]
N_PREDICT = 16
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5)
LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}


# -- writing GGUF files directly with the gguf package --------------------------------------------

def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's interleaved rope order (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def copy_fields(reader, writer, keep) -> None:
    """Copy key/values of a GGUF reader whose key passes keep(key), with their stored types."""
    from loraforge.formats.gguf_meta import field_value

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or not keep(key):
            continue
        main = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field_value(reader, field), main, sub)


def write_tiny_base(path: Path, smollm2_path: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A random f32 llama GGUF with SmolLM2's tokenizer; returns its HF-named weights."""
    c = TINY
    rng = np.random.default_rng(seed)
    h, f, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
              "mlp.down_proj": (h, f)}
    mat = lambda *s: rng.normal(0, 1 / np.sqrt(s[1]), s).astype(np.float32)  # noqa: E731
    norm = lambda: (1 + 0.1 * rng.normal(size=h)).astype(np.float32)  # noqa: E731
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(512)
    w.add_embedding_length(h)
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(f)
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_file_type(0)  # all f32
    copy_fields(gguf.GGUFReader(smollm2_path), w, lambda k: k.startswith("tokenizer."))
    weights = {"model.embed_tokens.weight": rng.normal(0, 1, (c["vocab_size"], h)).astype(np.float32),
               "lm_head.weight": mat(c["vocab_size"], h) * 4, "model.norm.weight": norm()}
    w.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    w.add_tensor("output.weight", weights["lm_head.weight"])
    for i in range(c["num_hidden_layers"]):
        for hf_norm, g_norm in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            weights[f"model.layers.{i}.{hf_norm}.weight"] = x = norm()
            w.add_tensor(f"blk.{i}.{g_norm}.weight", x)
        for module, g in LAYER_TENSORS.items():
            weights[f"model.layers.{i}.{module}.weight"] = x = mat(*shapes[module])
            if module == "self_attn.q_proj":
                x = llama_permute(x, c["num_attention_heads"])
            elif module == "self_attn.k_proj":
                x = llama_permute(x, c["num_key_value_heads"])
            w.add_tensor(f"blk.{i}.{g}.weight", x)
    _finish(w)
    return weights


def write_smollm2_f32(path: Path, smollm2_path: str) -> None:
    """The embedded SmolLM2 with every tensor dequantized to f32 by the gguf package."""
    reader = gguf.GGUFReader(smollm2_path)
    w = gguf.GGUFWriter(str(path), "llama")
    copy_fields(reader, w, lambda k: k != "general.file_type")
    w.add_file_type(0)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape.tolist())]))
    _finish(w)


def write_lora(path: Path, cfg, rank: int, alpha: float, modules: tuple[str, ...], seed: int, std: float) -> str:
    """A random nonzero GGUF LoRA for every layer of `cfg` (B rows of q/k permuted as llama.cpp wants)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    dims = {"self_attn.q_proj": (cfg.q_size, cfg.hidden_size), "self_attn.k_proj": (cfg.kv_size, cfg.hidden_size),
            "self_attn.v_proj": (cfg.kv_size, cfg.hidden_size), "self_attn.o_proj": (cfg.hidden_size, cfg.q_size),
            "mlp.gate_proj": (cfg.intermediate_size, cfg.hidden_size),
            "mlp.up_proj": (cfg.intermediate_size, cfg.hidden_size),
            "mlp.down_proj": (cfg.hidden_size, cfg.intermediate_size)}
    for i in range(cfg.num_hidden_layers):
        for module in modules:
            out_f, in_f = dims[module]
            a = rng.normal(0, std, (rank, in_f)).astype(np.float32)
            b = rng.normal(0, std, (out_f, rank)).astype(np.float32)
            if module == "self_attn.q_proj":
                b = llama_permute(b, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                b = llama_permute(b, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{LAYER_TENSORS[module]}.weight.lora_a", a)
            w.add_tensor(f"blk.{i}.{LAYER_TENSORS[module]}.weight.lora_b", b)
    _finish(w)
    return str(path)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- the two runners ------------------------------------------------------------------------------

class LlamaCpp:
    """llama.cpp on one GGUF base with an f32 KV cache; adapters set per run with their scales."""

    def __init__(self, path: str) -> None:
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                                   type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False,
                                   verbose=False)
        self._adapters: dict[str, object] = {}

    def set_adapters(self, adapters: list[tuple[str, float]]) -> None:
        ptrs = []
        for path, _ in adapters:
            if path not in self._adapters:
                ptr = llama_cpp.llama_adapter_lora_init(self.llm._model.model, path.encode())
                assert ptr, f"llama.cpp could not load {path}"
                self._adapters[path] = ptr
            ptrs.append(self._adapters[path])
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(len(ptrs), 1))(*ptrs)
        scales = (ctypes.c_float * max(len(ptrs), 1))(*[s for _, s in adapters])
        assert llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, arr if ptrs else None, len(ptrs),
                                                 scales if ptrs else None) == 0

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """n greedy ids (argmax, first on ties) and the logits after the prompt (V,)."""
        self.llm.reset()
        self.llm.eval(prompt)
        first = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
        out = []
        for _ in range(n):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out, first

    def close(self) -> None:
        self.llm.close()


def ours_greedy(loaded, adapters: list[tuple[str, float]], prompts: list[list[int]], n: int
                ) -> list[tuple[list[int], np.ndarray]]:
    """Our greedy ids and logits after each prompt, on a copy of `loaded`'s model with the adapters."""
    model = copy.deepcopy(loaded.model)
    attach_adapters(model, adapters, loaded.config)
    results = []
    for ids in prompts:
        tokens = list(generate_tokens(model, ids, n, Sampler(temp=0.0), stop_ids=()))
        with torch.no_grad():
            first = model(torch.tensor([ids]))[0, -1].numpy()
        results.append((tokens, first))
    return results


def compare(base: str, adapter_sets: dict[str, list[tuple[str, float]]], n: int, tol: float,
            min_equal: int | None = None, ours_base: str | None = None, **load) -> dict[str, list[float]]:
    """llama.cpp on `base` against us on `ours_base` (default the same file), for every adapter set
    and prompt: greedy ids equal (all n, or the first min_equal), and the max |logit difference|
    after each prompt below tol. Returns the differences."""
    cpp = LlamaCpp(base)
    loaded = load_model(ours_base or base, **load)
    diffs: dict[str, list[float]] = {}
    try:
        prompts = [cpp.tokenize(p) for p in PROMPTS]
        for label, adapters in adapter_sets.items():
            cpp.set_adapters(adapters)
            theirs = [cpp.greedy(ids, n) for ids in prompts]
            ours = ours_greedy(loaded, adapters, prompts, n)
            diffs[label] = []
            for text, (t_ids, t_first), (o_ids, o_first) in zip(PROMPTS, theirs, ours):
                diffs[label].append(float(np.abs(t_first - o_first).max()))
                want = n if min_equal is None else min_equal
                assert o_ids[:want] == t_ids[:want], f"{label} / {text!r}: ours {o_ids} llama.cpp {t_ids}"
            assert max(diffs[label]) < tol, f"{label}: logits differ by {max(diffs[label])}"
    finally:
        cpp.close()
    return diffs


# -- tests --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, smollm2_path):
    from loraforge.config import ModelConfig

    d = tmp_path_factory.mktemp("gen-llamacpp")
    base = d / "tiny-f32.gguf"
    write_tiny_base(base, smollm2_path)
    cfg = ModelConfig(**TINY, tie_word_embeddings=False)
    a = write_lora(d / "a.gguf", cfg, 4, 8.0, tuple(LAYER_TENSORS), seed=1, std=0.3)
    b = write_lora(d / "b.gguf", cfg, 2, 4.0, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "mlp.down_proj"), seed=2, std=0.4)
    return str(base), a, b


def test_greedy_equals_llamacpp_tiny_f32(tiny_files) -> None:
    base, a, b = tiny_files
    sets = {"base": [], "one adapter": [(a, 1.0)], "two adapters 0.4/0.8": [(a, 0.4), (b, 0.8)]}
    diffs = compare(base, sets, N_PREDICT, tol=1e-3, base_dtype="f32")
    print({k: max(v) for k, v in diffs.items()})


def test_adapters_change_the_tiny_output(tiny_files) -> None:
    """Guard for the test above: the adapters are strong enough to change greedy continuations."""
    base, a, b = tiny_files
    prompts = [llamacpp_tokens(base, PROMPTS[1])]
    loaded = load_model(base, base_dtype="f32")
    plain = ours_greedy(loaded, [], prompts, 8)[0][0]
    mixed = ours_greedy(loaded, [(a, 0.4), (b, 0.8)], prompts, 8)[0][0]
    assert plain != mixed


def llamacpp_tokens(path: str, text: str) -> list[int]:
    cpp = LlamaCpp(path)
    try:
        return cpp.tokenize(text)
    finally:
        cpp.close()


@pytest.fixture(scope="module")
def smollm2_f32_files(tmp_path_factory, smollm2_path):
    from loraforge.formats.gguf import read_model

    d = tmp_path_factory.mktemp("smollm2-f32")
    base = d / "smollm2-f32.gguf"
    write_smollm2_f32(base, smollm2_path)
    cfg = read_model(str(base)).config
    a = write_lora(d / "a.gguf", cfg, 4, 8.0, tuple(LAYER_TENSORS), seed=3, std=0.05)
    b = write_lora(d / "b.gguf", cfg, 2, 4.0, ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"),
                   seed=4, std=0.08)
    return str(base), a, b


@pytest.mark.slow
def test_greedy_equals_llamacpp_smollm2_f32(smollm2_f32_files) -> None:
    base, a, b = smollm2_f32_files
    sets = {"base": [], "one adapter": [(a, 1.0)], "two adapters 0.4/0.8": [(a, 0.4), (b, 0.8)]}
    diffs = compare(base, sets, N_PREDICT, tol=2e-3, base_dtype="f32")
    print({k: max(v) for k, v in diffs.items()})


@pytest.mark.slow
def test_q4_1_file_equals_llamacpp_on_its_f32_dequantization(smollm2_path, smollm2_f32_files) -> None:
    """The shipped Q4_1 file, read by us, gives llama.cpp's f32 results on the same weights exactly
    (our dequantization is exact and our matmuls run in f32)."""
    base_f32, a, b = smollm2_f32_files
    sets = {"base": [], "two adapters 0.4/0.8": [(a, 0.4), (b, 0.8)]}
    diffs = compare(base_f32, sets, N_PREDICT, tol=2e-3, ours_base=smollm2_path, base_dtype="f32")
    print({k: max(v) for k, v in diffs.items()})


@pytest.mark.slow
def test_q4_1_file_near_llamacpp_q4_1(smollm2_path, smollm2_f32_files) -> None:
    """llama.cpp on the Q4_1 file itself rounds activations to Q8_1 for its Q4_1 dot products:
    its logits move by up to ~1.5 from its own f32 run of the same weights, and greedy paths
    part after 1 to 25 tokens on these prompts. Only the first token and that scale are checked."""
    _, a, b = smollm2_f32_files
    sets = {"base": [], "two adapters 0.4/0.8": [(a, 0.4), (b, 0.8)]}
    diffs = compare(smollm2_path, sets, 4, tol=3.0, min_equal=1, base_dtype="f32")
    print({k: max(v) for k, v in diffs.items()})
