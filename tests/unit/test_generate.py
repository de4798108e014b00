"""Generation: sampler semantics, KV-cache generation against transformers, UTF-8-safe streaming
through the real SmolLM2 tokenizer, linear adapter scales, chat templates against transformers'
`apply_chat_template`, and one-line errors for bad input."""

from __future__ import annotations

import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from loraforge import cli
from loraforge.errors import LoraforgeError
from loraforge.generate import (GenerationStats, KVSession, Sampler, attach_adapters, generate_tokens,
                                sample_next, stream_text, write_utf8)

# -- helpers ------------------------------------------------------------------------------------

GGUF_MODULES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's interleaved order (convert_hf_to_gguf's permute)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_lora(cfg: dict, rank: int, modules: tuple[str, ...], seed: int, std: float = 0.2
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{HF module name: (A (r, in), B (out, r))} with nonzero random values for every layer."""
    rng = np.random.default_rng(seed)
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    dims = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in modules:
            o, i = dims[m]
            out[f"model.layers.{layer}.{m}"] = (rng.normal(0, std, (rank, i)).astype(np.float32),
                                                rng.normal(0, std, (o, rank)).astype(np.float32))
    return out


def write_gguf_lora(path: Path, lora: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float, cfg: dict) -> str:
    """A llama.cpp GGUF LoRA written directly with gguf.GGUFWriter (B rows of q/k permuted)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    for module, (a, b) in lora.items():
        layer, short = module.split(".", 3)[2], module.split(".", 3)[3]
        base = f"blk.{layer}.{GGUF_MODULES[short]}.weight"
        if short == "self_attn.q_proj":
            b = llama_permute(b, cfg["num_attention_heads"])
        elif short == "self_attn.k_proj":
            b = llama_permute(b, cfg["num_key_value_heads"])
        w.add_tensor(base + ".lora_a", np.ascontiguousarray(a))
        w.add_tensor(base + ".lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path: str):
    from loraforge.formats.gguf import open_reader
    from loraforge.formats.gguf_meta import metadata_dict
    from loraforge.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(metadata_dict(open_reader(smollm2_path)), source=smollm2_path)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# -- sampler ------------------------------------------------------------------------------------

def test_greedy_is_argmax_after_repeat_penalty() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50)
    assert sample_next(logits, [], Sampler(temp=0.0)) == int(logits.argmax())
    # the top token, already seen, falls below the runner-up once penalised
    top2 = torch.topk(logits, 2)
    best, second = int(top2.indices[0]), int(top2.indices[1])
    penalty = float(top2.values[0] / top2.values[1]) * 1.01 if top2.values[1] > 0 else 100.0
    got = sample_next(logits, [best, 3, 3], Sampler(temp=0.0, repeat_penalty=penalty))
    manual = logits.clone()
    for t in {best, 3}:
        manual[t] = manual[t] * penalty if manual[t] <= 0 else manual[t] / penalty
    assert got == int(manual.argmax()) == second
    # outside the look-back window the penalty does not apply
    assert sample_next(logits, [best] + [7] * 10, Sampler(temp=0.0, repeat_penalty=penalty,
                                                          repeat_last_n=5)) == best


def test_top_k_one_equals_greedy_and_seed_reproduces() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(100, generator=gen) * 3
        settings = Sampler(temp=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=5)
        assert sample_next(logits, [], settings, settings.make_generator()) == int(logits.argmax())
    logits = torch.zeros(1000)  # uniform: different seeds must give different draws
    settings = Sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    draws = lambda s: [sample_next(logits, [], s, g) for g in [s.make_generator()] for _ in range(30)]  # noqa: E731
    assert draws(settings) == draws(Sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42))
    assert draws(settings) != draws(Sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43))


def test_top_p_min_p_and_temperature_shape_the_distribution() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    n = 3000
    # top-p 0.7: keeps 0.4 and 0.3 (the token that reaches 0.7 is kept), renormalised to 4/7 and 3/7
    s = Sampler(temp=1.0, top_k=0, top_p=0.7, min_p=0.0)
    counts = Counter(sample_next(logits, [], s, gen) for _ in range(n))
    assert set(counts) == {0, 1}
    assert abs(counts[0] / n - 4 / 7) < 0.035
    # min-p 0.3: keeps p >= 0.12 -> tokens 0, 1, 2
    s = Sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.3)
    counts = Counter(sample_next(logits, [], s, gen) for _ in range(n))
    assert set(counts) == {0, 1, 2}
    assert abs(counts[2] / n - 0.15 / 0.85) < 0.035
    # temperature 0.5 squares the kept probabilities (top-k 2)
    s = Sampler(temp=0.5, top_k=2, top_p=1.0, min_p=0.0)
    counts = Counter(sample_next(logits, [], s, gen) for _ in range(n))
    assert set(counts) == {0, 1}
    assert abs(counts[0] / n - 0.16 / 0.25) < 0.035


@pytest.mark.parametrize("kwargs", [dict(top_p=1.5), dict(min_p=-0.1), dict(repeat_penalty=0.0),
                                    dict(repeat_last_n=-2), dict(temp=math.nan)])
def test_sampler_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(LoraforgeError):
        Sampler(**kwargs)


# -- generation with the KV cache ----------------------------------------------------------------

def test_greedy_generation_equals_transformers(tiny_hf_factory) -> None:
    from loraforge.loader import load_model

    hf_model, folder = tiny_hf_factory("llama", seed=3)
    loaded = load_model(folder, base_dtype="f32")
    prompt = [256, 72, 101, 108, 108, 111, 44, 32, 119]
    stats = GenerationStats()
    ours = list(generate_tokens(loaded.model, prompt, 24, Sampler(temp=0.0), stop_ids=(), stats=stats))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                min_new_tokens=24, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref
    assert stats.prompt_tokens == len(prompt) and stats.generated_tokens == 24
    assert stats.stop_reason == "length" and stats.generation_tokens_per_second > 0
    assert "tokens per second" in stats.report()
    # a stop id ends generation and is not yielded
    stopped = list(generate_tokens(loaded.model, prompt, 24, Sampler(temp=0.0), stop_ids=[ref[5]]))
    assert stopped == ref[:ref.index(ref[5])]


def test_session_reuses_cached_prefix(tiny_llama_folder: str) -> None:
    from loraforge.loader import load_model

    model = load_model(tiny_llama_folder, base_dtype="f32").model
    a = [256, 10, 20, 30, 40, 50]
    b = a[:4] + [60, 70, 80, 90]  # shares 4 tokens, then diverges (a chat re-render)
    session = KVSession(model, 32)
    session.feed(a)
    got = session.feed(b)
    assert session.last_run_tokens == 4
    with torch.no_grad():
        want = model(torch.tensor([b]))[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(LoraforgeError, match="longer than the context"):
        session.feed(list(range(40)))


# -- streaming ----------------------------------------------------------------------------------

STREAM_TEXTS = ["안녕하세요, 세계! 오늘 날씨가 정말 좋네요. 뷁 똠방각하",
                "中文：你好，世界！我们今天测试流式输出。龘䶮",
                "Emoji: 😀🎉👍🏽 👨‍👩‍👧 🇰🇷 ❤️‍🔥 done"]


@pytest.mark.parametrize("text", STREAM_TEXTS, ids=["korean", "chinese", "emoji"])
def test_streaming_is_byte_identical_to_full_decode(smollm2_tokenizer, text: str) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode(text)
    partial = [i for i in ids if not _is_utf8(tok.token_bytes(i))]
    assert partial, "the text should contain tokens that carry part of a character"
    chunks = list(stream_text(tok, ids))
    assert all("\ufffd" not in c for c in chunks)
    assert b"".join(c.encode("utf-8") for c in chunks) == tok.decode(ids).encode("utf-8") == text.encode("utf-8")
    # written chunk by chunk to a console whose own encoding cannot hold the text
    raw = io.BytesIO()
    console = io.TextIOWrapper(raw, encoding="cp1252", errors="strict")
    for c in chunks:
        write_utf8(console, c)
    assert raw.getvalue() == text.encode("utf-8")


def test_streaming_random_ids_match_decode(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, tok.vocab_size, 30).tolist()
        assert "".join(stream_text(tok, ids)) == tok.decode(ids, skip_special=True)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -- adapter scales -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory, tiny_hf_factory):
    from conftest import TINY_CONFIG

    hf_model, folder = tiny_hf_factory("llama", seed=7)
    d = tmp_path_factory.mktemp("adapters")
    a = random_lora(TINY_CONFIG, 4, tuple(GGUF_MODULES), seed=1)
    b = random_lora(TINY_CONFIG, 2, ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"), seed=2)
    return dict(hf_model=hf_model, folder=folder, a=a, b=b, alpha_a=8.0, alpha_b=2.0,
                path_a=write_gguf_lora(d / "a.gguf", a, 8.0, TINY_CONFIG),
                path_b=write_gguf_lora(d / "b.gguf", b, 2.0, TINY_CONFIG))


def _logits_with(folder: str, adapters: list[tuple[str, float]], ids: list[int]) -> torch.Tensor:
    from loraforge.loader import load_model

    loaded = load_model(folder, base_dtype="f32")
    attach_adapters(loaded.model, adapters, loaded.config)
    with torch.no_grad():
        return loaded.model(torch.tensor([ids]))[0]


def test_adapter_scales_are_linear(tiny_adapters) -> None:
    ids = [256, 5, 77, 130, 200, 31, 9]
    folder, pa = tiny_adapters["folder"], tiny_adapters["path_a"]
    base = _logits_with(folder, [], ids)
    assert torch.equal(_logits_with(folder, [(pa, 0.0)], ids), base)
    once = _logits_with(folder, [(pa, 1.0)], ids)
    twice_half = _logits_with(folder, [(pa, 0.5), (pa, 0.5)], ids)
    assert (once - base).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(twice_half, once, rtol=1e-5, atol=1e-5)


def test_two_adapters_equal_transformers_with_merged_weights(tiny_adapters) -> None:
    """A at 0.4 and B at 0.8, unmerged, against transformers running W + sum scale * alpha/r * B@A."""
    import copy

    t = tiny_adapters
    ids = [256, 5, 77, 130, 200, 31, 9]
    ours = _logits_with(t["folder"], [(t["path_a"], 0.4), (t["path_b"], 0.8)], ids)
    ref = copy.deepcopy(t["hf_model"])
    with torch.no_grad():
        for lora, alpha, user in ((t["a"], t["alpha_a"], 0.4), (t["b"], t["alpha_b"], 0.8)):
            for module, (a, b) in lora.items():
                w = ref.get_submodule(module).weight
                w += user * alpha / a.shape[0] * torch.from_numpy(b @ a)
        want = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


# -- chat templates -----------------------------------------------------------------------------

LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'tool' %}"
    "{{ raise_exception('no tools') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHATS = [
    [{"role": "user", "content": "안녕하세요! What is 2+2?"}],
    [{"role": "system", "content": "You answer in Chinese."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "Tell me a joke 😀"}],
]


@pytest.mark.parametrize("which", ["smollm2", "llama3-style"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(smollm2_tokenizer, which: str, add_generation_prompt: bool) -> None:
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    tok = smollm2_tokenizer
    template = tok.chat_template if which == "smollm2" else LLAMA3_STYLE
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token=tok.decode([tok.bos_id]),
                                 eos_token=tok.decode([tok.eos_id]))
    for messages in CHATS:
        ours = tok.render_chat(messages, add_generation_prompt=add_generation_prompt, template=template)
        want = hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
        assert ours == want


@pytest.fixture
def tiny_chat_folder(tiny_llama_folder: str, tmp_path: Path) -> str:
    folder = tmp_path / "tiny-chat"
    shutil.copytree(tiny_llama_folder, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = ("{% for m in messages %}{{ '<extra_0>' + m['role'] + '\n' + m['content'] + '</s>\n' }}"
                            "{% endfor %}{% if add_generation_prompt %}{{ '<extra_0>assistant\n' }}{% endif %}")
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    return str(folder)


def test_chat_second_turn_from_cache_equals_fresh(tiny_chat_folder: str) -> None:
    from loraforge.commands.chat import ChatSession
    from loraforge.loader import load_model

    loaded = load_model(tiny_chat_folder, base_dtype="f32")
    settings = Sampler(temp=0.0)
    out: list[str] = []
    chat = ChatSession(loaded, settings, 12, 256, out.append)
    chat.messages.append({"role": "user", "content": "hello there"})
    chat.reply()
    first_prompt = chat.last_turn.prompt_tokens
    chat.messages.append({"role": "user", "content": "and again"})
    second_prompt = len(chat.prompt_ids())
    second = chat.reply()
    assert chat.last_turn.prompt_tokens <= second_prompt - first_prompt  # turn 1's prompt came from the cache
    fresh = ChatSession(loaded, settings, 12, 256, lambda s: None)
    fresh.messages = [m for m in chat.messages[:-1]]
    assert fresh.reply() == second
    assert "".join(out).endswith(second + "\n")


# -- bad input ----------------------------------------------------------------------------------

def test_missing_prompt_file(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    err = _one_line_error(capsys, ["generate", "-f", str(missing), "-n", "4"])
    assert str(missing) in err and "no such prompt file" in err


def test_negative_n_predict(capsys) -> None:
    err = _one_line_error(capsys, ["generate", "-p", "hi", "-n", "-5"])
    assert "-n/--n-predict" in err and "-5" in err


def test_adapter_for_another_model(capsys, tmp_path: Path, tiny_llama_folder: str) -> None:
    from conftest import TINY_CONFIG

    other = dict(TINY_CONFIG, hidden_size=96, intermediate_size=128)
    path = write_gguf_lora(tmp_path / "other.gguf", random_lora(other, 2, ("self_attn.v_proj",), 0), 2.0, other)
    err = _one_line_error(capsys, ["generate", "-m", tiny_llama_folder, "--lora", path, "-p", "hi", "-n", "2"])
    assert path in err and "another model" in err


def test_bad_scale_and_messages(capsys, tmp_path: Path, tiny_llama_folder: str) -> None:
    adapter = write_gguf_lora(tmp_path / "a.gguf", random_lora(
        {"hidden_size": 64, "intermediate_size": 112, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 1}, 2, ("self_attn.v_proj",), 0), 2.0, {})
    err = _one_line_error(capsys, ["generate", "--lora-scaled", adapter, "lots", "-p", "hi"])
    assert "lots" in err
    bad = tmp_path / "msgs.jsonl"
    bad.write_text('{"role": "user", "content": "hi"}\n{"role": "robot", "content": "x"}\n', encoding="utf-8")
    err = _one_line_error(capsys, ["chat", "--messages", str(bad)])
    assert str(bad) in err and "line 2" in err and "robot" in err
    good = tmp_path / "ok.json"
    good.write_text(json.dumps([{"role": "user", "content": "hi"}]), encoding="utf-8")
    err = _one_line_error(capsys, ["chat", "-m", tiny_llama_folder, "--messages", str(good), "-n", "2"])
    assert "no chat template" in err
