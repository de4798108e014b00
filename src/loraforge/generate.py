"""Text generation with a KV cache: llama.cpp's sampler chain, several LoRA adapters mixed by
scale (unmerged), UTF-8-safe streaming and tokens/s figures.

Shapes: V vocabulary, T tokens.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from loraforge import lora
from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.model import CausalLM, KVCache

DEFAULT_CTX_SIZE = 4096  # llama.cpp's default context when the model's own is larger


@dataclass
class Sampler:
    """Sampling settings with llama.cpp's defaults and meaning.

    temp <= 0 is greedy. top_k <= 0, top_p >= 1, min_p <= 0 and repeat_penalty == 1 switch
    their stage off. repeat_last_n: how many past tokens the penalty looks at (0 = none,
    -1 = the whole context). seed None or negative: a random seed.
    """

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.temp):
            raise LoraforgeError("--temp must be a number")
        if not 0.0 <= self.top_p <= 1.0 or math.isnan(self.top_p):
            raise LoraforgeError(f"--top-p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0 or math.isnan(self.min_p):
            raise LoraforgeError(f"--min-p must be in [0, 1], got {self.min_p}")
        if not self.repeat_penalty > 0.0:
            raise LoraforgeError(f"--repeat-penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise LoraforgeError(f"--repeat-last-n must be >= -1, got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temp <= 0.0

    def make_generator(self) -> torch.Generator:
        """A CPU random generator seeded with `seed` (a fresh random seed when unset)."""
        seed = self.seed if self.seed is not None and self.seed >= 0 else random.SystemRandom().randrange(2**63)
        return torch.Generator(device="cpu").manual_seed(int(seed))


def apply_repeat_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float, last_n: int
                         ) -> torch.Tensor:
    """llama.cpp's repetition penalty on logits (V,), in place: each distinct token among the last
    `last_n` of history has its logit divided by penalty when positive, multiplied when not."""
    if penalty == 1.0 or last_n == 0 or not history:
        return logits
    window = history if last_n < 0 else history[-last_n:]
    ids = torch.tensor(sorted(set(window)), dtype=torch.long, device=logits.device)
    ids = ids[ids < logits.shape[-1]]
    values = logits[ids]
    logits[ids] = torch.where(values <= 0, values * penalty, values / penalty)
    return logits


def sample_next(logits: torch.Tensor, history: Sequence[int], settings: Sampler,
                generator: torch.Generator | None = None) -> int:
    """The next token id from logits (V,), in llama.cpp's default order: repetition penalty,
    top-k, top-p, min-p, temperature, then a draw from the remaining distribution.

    Greedy (temp <= 0) takes the first maximal logit after the penalty, as llama.cpp does.
    history: prompt and generated ids so far (for the penalty).
    """
    logits = logits.detach().reshape(-1).float().cpu().clone()
    apply_repeat_penalty(logits, history, settings.repeat_penalty, settings.repeat_last_n)
    if settings.greedy:
        return int(torch.argmax(logits))
    n_vocab = logits.shape[0]
    k = settings.top_k if 0 < settings.top_k < n_vocab else n_vocab
    values, ids = torch.topk(logits, k, sorted=True)  # (k,) descending
    if settings.top_p < 1.0:
        cumulative = torch.softmax(values, dim=0).cumsum(0)
        # keep up to and including the first token whose cumulative probability reaches top_p
        n_keep = int((cumulative < settings.top_p).sum()) + 1
        values, ids = values[:n_keep], ids[:n_keep]
    if settings.min_p > 0.0:
        keep = values >= values[0] + math.log(settings.min_p)  # p >= min_p * p_max
        values, ids = values[keep], ids[keep]
    probs = torch.softmax(values / settings.temp, dim=0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(ids[choice])


# -- model state -------------------------------------------------------------------------------

def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the decoder's activations: that of its dense matrices (float32 if quantized)."""
    for name, p in model.named_parameters():
        if p.ndim == 2 and p.is_floating_point() and ".lora_" not in name:
            return p.dtype
    return torch.float32


def default_ctx_size(cfg: ModelConfig) -> int:
    return min(cfg.max_position_embeddings or DEFAULT_CTX_SIZE, DEFAULT_CTX_SIZE)


class KVSession:
    """A model with its KV cache and the token ids held in it.

    `feed(ids)` takes the whole sequence so far and runs only the part not already cached
    (the common prefix is reused), so chat turns cost only their new tokens.
    """

    def __init__(self, model: CausalLM, ctx_size: int) -> None:
        if ctx_size <= 0:
            raise LoraforgeError(f"--ctx-size must be positive, got {ctx_size}")
        self.model = model
        self.ctx_size = ctx_size
        self.dtype = activation_dtype(model)
        self.cache = KVCache(model.config, 1, ctx_size, model_device(model), self.dtype)
        self.tokens: list[int] = []
        self.last_run_tokens = 0  # tokens the last feed actually ran through the model

    @torch.no_grad()
    def feed(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits (V,) after the last of ids; ids must fit the context."""
        ids = [int(t) for t in ids]
        if not ids:
            raise LoraforgeError("nothing to evaluate: the prompt is empty")
        if len(ids) > self.ctx_size:
            raise LoraforgeError(f"the prompt is {len(ids)} tokens, longer than the context "
                                 f"({self.ctx_size} tokens; raise --ctx-size)")
        n_vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= n_vocab:
            bad = next(t for t in ids if not 0 <= t < n_vocab)
            raise LoraforgeError(f"token id {bad} is outside the model's vocabulary of {n_vocab}")
        reuse = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(ids) - 1)  # at least one token runs, for its logits
        self.tokens = self.tokens[:reuse]
        return self._run(ids[reuse:])

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Append one token to what is cached; logits (V,) after it."""
        if len(self.tokens) >= self.ctx_size:
            raise LoraforgeError(f"the context is full ({self.ctx_size} tokens; raise --ctx-size)")
        return self._run([int(token)])

    def _run(self, new: list[int]) -> torch.Tensor:
        start = len(self.tokens)
        device = self.cache.k.device
        x = torch.tensor(new, dtype=torch.long, device=device)[None]
        # half-precision weights next to float32 norms: autocast keeps every matmul in one dtype
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            hidden = self.model.hidden_states(x, cache=self.cache, start_pos=start)  # (1, T, C)
            logits = self.model.logits(hidden[:, -1])[0]
        self.tokens.extend(new)
        self.last_run_tokens = len(new)
        return logits


# -- generation ---------------------------------------------------------------------------------

@dataclass
class GenerationStats:
    """Counts and wall times of one generation (llama.cpp's `prompt eval` and `eval` lines)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    stop_reason: str = ""  # "eos" | "length" | "context"

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def add(self, other: "GenerationStats") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.prompt_seconds += other.prompt_seconds
        self.generated_tokens += other.generated_tokens
        self.generation_seconds += other.generation_seconds
        self.stop_reason = other.stop_reason

    def report(self) -> str:
        """Two lines for stderr, like llama.cpp's timings."""
        def line(label: str, n: int, seconds: float, rate: float) -> str:
            ms = seconds * 1000.0
            per = ms / n if n else 0.0
            return (f"{label}: {ms:10.2f} ms / {n:5d} tokens ({per:8.2f} ms per token, "
                    f"{rate:8.2f} tokens per second)")
        return "\n".join([
            line("prompt eval time", self.prompt_tokens, self.prompt_seconds, self.prompt_tokens_per_second),
            line("       eval time", self.generated_tokens, self.generation_seconds,
                 self.generation_tokens_per_second)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_tokens(model: CausalLM, prompt_ids: Sequence[int], n_predict: int, settings: Sampler,
                    stop_ids: Iterable[int] = (), ctx_size: int | None = None, *,
                    generator: torch.Generator | None = None, stats: GenerationStats | None = None,
                    session: KVSession | None = None) -> Iterator[int]:
    """Yield up to n_predict sampled token ids (-1: until a stop id or a full context).

    The prompt runs in one forward through the KV cache, then one token per step. A stop id
    ends generation and is not yielded. `session` keeps the cache across calls (chat turns);
    without one, a cache of ctx_size (default: the model's context, at most 4096) positions
    is made, trimmed to what prompt + n_predict can use. `stats` is filled as tokens come.
    """
    if n_predict < -1:
        raise LoraforgeError(f"-n/--n-predict must be >= 0 (or -1 for no limit), got {n_predict}")
    prompt_ids = list(prompt_ids)
    stop = set(int(t) for t in stop_ids)
    stats = stats if stats is not None else GenerationStats()
    generator = generator if generator is not None else settings.make_generator()
    if session is None:
        ctx = ctx_size if ctx_size else default_ctx_size(model.config)
        if ctx <= 0:
            raise LoraforgeError(f"--ctx-size must be positive, got {ctx}")
        if len(prompt_ids) > ctx:
            raise LoraforgeError(f"the prompt is {len(prompt_ids)} tokens, longer than the context "
                                 f"({ctx} tokens; raise --ctx-size)")
        if n_predict >= 0:
            ctx = min(ctx, len(prompt_ids) + n_predict)
        session = KVSession(model, max(ctx, 1))
    device = session.cache.k.device

    t0 = time.perf_counter()
    logits = session.feed(prompt_ids)
    _sync(device)
    stats.prompt_seconds = time.perf_counter() - t0
    stats.prompt_tokens = session.last_run_tokens
    stats.stop_reason = "length"
    history = list(prompt_ids)
    produced = 0
    while n_predict < 0 or produced < n_predict:
        t0 = time.perf_counter()
        token = sample_next(logits, history, settings, generator)
        if token in stop:
            stats.generation_seconds += time.perf_counter() - t0
            stats.stop_reason = "eos"
            break
        history.append(token)
        produced += 1
        done = n_predict >= 0 and produced >= n_predict
        if not done and len(session.tokens) >= session.ctx_size:
            stats.stop_reason, done = "context", True
        if not done:
            logits = session.step(token)
            _sync(device)
        stats.generation_seconds += time.perf_counter() - t0  # the consumer's time is not counted
        stats.generated_tokens = produced
        yield token
        if done:
            break


# -- text streaming -----------------------------------------------------------------------------

# a UTF-8 character is at most 4 bytes, so at most 3 more byte tokens complete one
MAX_TOKENS_TO_FINISH_CHARACTER = 3


def stream_text(tokenizer: Any, token_ids: Iterable[int], skip_special: bool = True,
                limit: int | None = None) -> Iterator[str]:
    """Text chunks of token_ids as they arrive; a multi-byte UTF-8 character split across tokens
    is held back until complete, so no chunk ever ends inside a character. The chunks joined
    equal `tokenizer.decode(ids, skip_special)`. Control tokens are not shown (llama.cpp's default).

    limit: stop after this many tokens, unless the last one left a character unfinished; then
    take up to MAX_TOKENS_TO_FINISH_CHARACTER more (token_ids should offer them) to finish it.
    """
    from loraforge.tokenizer import StreamDecoder

    decoder = StreamDecoder(tokenizer, skip_special=skip_special)
    for n, token in enumerate(token_ids, 1):
        text = decoder.push(token)
        if text:
            yield text
        if limit is not None and n >= limit and (not decoder.pending
                                                 or n >= limit + MAX_TOKENS_TO_FINISH_CHARACTER):
            break
    tail = decoder.flush()
    if tail:
        yield tail


def write_utf8(stream: Any, text: str) -> None:
    """Write text as UTF-8 bytes whatever the stream's own encoding (a Windows console's code
    page included), and flush so the chunk shows at once."""
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()  # keep the order of anything written through the text layer
        buffer.write(text.encode("utf-8"))
        buffer.flush()
    else:
        stream.write(text)
        stream.flush()


# -- adapters -----------------------------------------------------------------------------------

def attach_adapters(model: CausalLM, adapters: Sequence[tuple[str, float]], cfg: ModelConfig
                    ) -> list[lora.Adapter]:
    """Load each (path, scale) in any adapter format and attach it unmerged as "lora0", "lora1", ...

    Their deltas add up, each at user scale * alpha / r (llama.cpp's `--lora-scaled`). An
    adapter made for another model fails with the file's name and the mismatch.
    """
    from loraforge.formats.adapters import load_adapter

    loaded = []
    for i, (path, scale) in enumerate(adapters):
        if not math.isfinite(scale):
            raise file_error(path, f"adapter scale must be a finite number, got {scale}")
        if not os.path.exists(path):
            raise file_error(path, "no such file or folder")
        adapter = load_adapter(path, cfg)
        try:
            lora.attach(model, adapter, f"lora{i}", scale)
        except LoraforgeError as e:
            raise file_error(path, f"does not fit this model: {e}") from None
        loaded.append(adapter)
    return loaded
