"""GPU benchmark: a Llama-3.1-8B-shaped model with random bf16 weights built on the GPU (no file),
LoRA r16 (alpha 16) on all seven linear projections, AdamW lr 1e-4 (fused), bf16 autocast,
activation checkpointing, gradient clip 1.0.

Contenders, each in its own subprocess (so the CUDA allocator's peak is its own):
  peer-2048x2      transformers + peft at seq 2048 batch 2, gradient checkpointing (the issue's peer:
                   ~5,750 tokens/s and 22.4 GiB on an H100)
  lf-2048x2        loraforge `CausalLM.loss` (chunked LM head + cross-entropy) at seq 2048 batch 2
  lf-4096-packed   seq 4096, one row packing several documents (doc_ids: attention kept per document)
  lf-4096          seq 4096, one causal document (for comparison with the packed row)
  qlora-2048x2, qlora-4096-packed   the same with the decoder linears in NF4 (`quant.nf4.quantize_model`,
                   backend "bnb": bitsandbytes' quantize_4bit and matmul_4bit kernels)
  qlora-torch-2048x2   NF4 through loraforge's torch path (backend "torch") instead of bitsandbytes
  lf-2048x2-adamw8bit  LoRA with bitsandbytes' 8-bit AdamW (`make_optimizer(name="adamw_8bit")`)
  qlora-2048x2-paged8bit  QLoRA (bitsandbytes) + paged 8-bit AdamW, as the seeds' HF QLoRA recipe
  peer-qlora-2048x2    transformers + peft over bitsandbytes Linear4bit layers (nf4, double quant, bf16
                   compute, what BitsAndBytesConfig(load_in_4bit=True) builds) + paged_adamw_8bit

Targets (issue): lf-2048x2 >= 2.2x the peer with no more memory; >= 13,000 tokens/s at seq 4096;
QLoRA >= 0.85x LoRA speed at <= 10 GiB.

  python bench/gpu_llama8b.py                     # all contenders, 3 warm-up + 10 timed steps
  python bench/gpu_llama8b.py --quick             # 1 + 2 steps
  python bench/gpu_llama8b.py --only lf-2048x2,peer-2048x2 --chunk-tokens 1024
  python bench/gpu_llama8b.py --smoke-cpu         # tiny shape on the CPU: checks the code paths only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Result, StepTimer, cuda_peak_gib, emit_result, ensure_loraforge_importable,  # noqa: E402
                    gpu_bf16_peak_flops, header, hf_dtype_kwarg, lora_flops_per_token, markdown_table,
                    mean_causal_keys, mfu, peak_rss_mib, run_contender, step_stats, write_json)

RANK, ALPHA, LR, SEED = 16, 16.0, 1e-4, 0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LLAMA31_8B = dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                  max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
                  eos_token_id=128001)
TINY = dict(LLAMA31_8B, vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)

# name -> (framework, NF4 backend of the base or None for bf16, seq, batch, packed, optimizer)
CONTENDERS = {
    "peer-2048x2": ("peer", None, 2048, 2, False, "adamw_torch"),
    "lf-2048x2": ("loraforge", None, 2048, 2, False, "adamw_torch"),
    "lf-4096-packed": ("loraforge", None, 4096, 1, True, "adamw_torch"),
    "lf-4096": ("loraforge", None, 4096, 1, False, "adamw_torch"),
    "qlora-2048x2": ("loraforge", "bnb", 2048, 2, False, "adamw_torch"),
    "qlora-4096-packed": ("loraforge", "bnb", 4096, 1, True, "adamw_torch"),
    "qlora-torch-2048x2": ("loraforge", "torch", 2048, 2, False, "adamw_torch"),
    "lf-2048x2-adamw8bit": ("loraforge", None, 2048, 2, False, "adamw_8bit"),
    "qlora-2048x2-paged8bit": ("loraforge", "bnb", 2048, 2, False, "paged_adamw_8bit"),
    "peer-qlora-2048x2": ("peer", "bnb", 2048, 2, False, "paged_adamw_8bit"),
}
PEERS = ("peer-2048x2",)
ISSUE_PEER = "issue's peer figure (H100): HF + peft ~5,750 tokens/s, 22.4 GiB at seq 2048 batch 2 with checkpointing"


def model_config(smoke: bool):
    from loraforge.config import ModelConfig

    return ModelConfig(**(TINY if smoke else LLAMA31_8B))


def scaled_shape(seq: int, batch: int, smoke: bool) -> tuple[int, int]:
    """The smoke run shrinks sequences 16x (2048 -> 128)."""
    return (seq // 16, batch) if smoke else (seq, batch)


def packed_doc_lengths(seq: int, seed: int = SEED) -> list[int]:
    """Document lengths filling one row of `seq` tokens: uniform in [seq/32, seq/2], the last cut to fit."""
    import random

    rng = random.Random(seed)
    lengths, left = [], seq
    while left > 0:
        n = min(left, rng.randint(max(seq // 32, 1), max(seq // 2, 2)))
        lengths.append(n)
        left -= n
    return lengths


def make_batch(vocab: int, seq: int, batch: int, packed: bool, device, step: int):
    """Random tokens (B, T); aligned next-token labels; doc_ids (B, T) for a packed row (else None).
    The last token of each document has no label (-100)."""
    import torch

    g = torch.Generator().manual_seed(SEED * 1000 + step)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    inputs, labels = ids[:, :-1].clone(), ids[:, 1:].clone()
    doc_ids = None
    if packed:
        doc_ids = torch.zeros(batch, seq, dtype=torch.long)
        start = 0
        for d, n in enumerate(packed_doc_lengths(seq), start=1):
            doc_ids[:, start:start + n] = d
            labels[:, start + n - 1] = -100
            start += n
    move = (lambda t: None if t is None else t.to(device, non_blocking=True))
    return move(inputs), move(labels), move(doc_ids)


# -- workers ---------------------------------------------------------------------------------------

def materialize(model, device, dtype) -> None:
    """Give every meta parameter real random values on `device`: matrices N(0, 0.02) in `dtype`,
    norm weights ones in float32 (as the loader keeps them)."""
    import torch
    from torch import nn

    g = torch.Generator(device=device).manual_seed(SEED)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if p.ndim >= 2:
                value = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=g)
            else:
                value = torch.ones(p.shape, device=device, dtype=torch.float32)
            module._parameters[name] = nn.Parameter(value, requires_grad=False)


def build_loraforge(cfg, device, nf4_backend: str | None):
    import torch

    from loraforge.lora import LoraConfig, inject
    from loraforge.model import build_on_meta

    model = build_on_meta(cfg)
    materialize(model, device, torch.bfloat16)
    model.inv_freq = model.inv_freq.to(device)
    if nf4_backend:
        from loraforge.quant.nf4 import quantize_model

        quantize_model(model, "nf4", backend=nf4_backend)
    torch.manual_seed(SEED)
    inject(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    model.gradient_checkpointing = True
    return model


def to_bnb_4bit(model, device) -> int:
    """Replace the decoder's nn.Linear layers by bitsandbytes Linear4bit (nf4, double-quantized
    scales, bf16 compute): the layers `from_pretrained(..., quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_compute_dtype=torch.bfloat16))` builds, made here from in-memory random weights."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    count = 0
    for parent in list(model.model.layers.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to(device)  # quantized on the move
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, layer)
            count += 1
    return count


def build_peer(cfg, device, nf4_backend: str | None = None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.config_sources import config_to_hf_dict

    hf_cfg = AutoConfig.for_model(**config_to_hf_dict(cfg))
    hf_cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_cfg, **hf_dtype_kwarg(torch.bfloat16))
    finally:
        torch.set_default_dtype(old)
    if nf4_backend:
        to_bnb_4bit(model, device)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                             task_type="CAUSAL_LM", target_modules=list(TARGETS)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def run_worker(args: argparse.Namespace) -> Result:
    import torch

    framework, nf4_backend, seq, batch, packed, optim_name = CONTENDERS[args.worker]
    seq, batch = scaled_shape(seq, batch, args.smoke_cpu)
    device = torch.device("cpu" if args.smoke_cpu else "cuda")
    cuda = device.type == "cuda"
    cfg = model_config(args.smoke_cpu)
    t0 = time.perf_counter()
    if framework == "peer":
        model = build_peer(cfg, device, nf4_backend)
    else:
        model = build_loraforge(cfg, device, nf4_backend)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if framework == "peer" and optim_name == "adamw_torch":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=cuda or None, foreach=None if cuda else True)
    elif framework == "peer":  # transformers' optim="paged_adamw_8bit" / "adamw_8bit": bitsandbytes' classes
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if optim_name.startswith("paged") and cuda else bnb.optim.AdamW8bit
        opt = cls(params, lr=LR, weight_decay=0.0)
    else:
        from loraforge.train.optim import make_optimizer

        opt = make_optimizer(params, LR, 0.0, 0.9, 0.999, name=optim_name)
    if cuda:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    load_s = time.perf_counter() - t0
    timer = StepTimer(cuda)
    n = args.warmup + args.steps
    for i in range(n):
        ids, labels, doc_ids = make_batch(cfg.vocab_size, seq, batch, packed, device, i)
        timer.start()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if framework == "peer":
                # HF shifts labels itself: pass the row as labels, its loss covers T - 1 tokens per row
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            elif args.chunk_tokens:
                loss, _ = model.loss(ids, labels, doc_ids, chunk_tokens=args.chunk_tokens)
            else:
                loss, _ = model.loss(ids, labels, doc_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = timer.stop()
        print(f"{args.worker} step {i + 1}/{n}: loss {float(loss.detach()):.4f} dt {dt:.3f} s", flush=True)
    tokens_per_step = seq * batch  # tokens processed per step (the figure every framework reports)
    stats = step_stats(timer.times, args.warmup, tokens_per_step)
    reserved, allocated = cuda_peak_gib() if cuda else (float("nan"), float("nan"))
    doc_text = f", documents {packed_doc_lengths(seq)}" if packed else ""
    base = f" (NF4 base, {nf4_backend} backend)" if nf4_backend and framework == "loraforge" else ""
    what = (f"transformers + peft{' over bitsandbytes Linear4bit' if nf4_backend else ''}, SDPA, gradient "
            f"checkpointing (use_reentrant=False), {optim_name}"
            if framework == "peer" else
            f"loraforge CausalLM.loss{base}, checkpointing, chunk_tokens {args.chunk_tokens or 'default'}, "
            f"{optim_name}")
    return Result(name=args.worker, tokens_per_s=stats.tokens_per_s, median_step_s=stats.median_s,
                  steps=len(stats.times), step_times=timer.times, tokens_per_step=tokens_per_step,
                  peak_rss_mib=peak_rss_mib(), gpu_reserved_gib=reserved, gpu_allocated_gib=allocated,
                  load_s=load_s, notes=f"{what}; seq {seq} x batch {batch}{doc_text}"
                                       + (f"; max allocated {allocated:.2f} GiB" if cuda else ""))


def worker_main(args: argparse.Namespace) -> int:
    ensure_loraforge_importable()
    try:
        result = run_worker(args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result = Result(name=args.worker, error=f"{type(e).__name__}: {e}", peak_rss_mib=peak_rss_mib())
    emit_result(result)
    return 0 if not result.error else 1


# -- parent ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--chunk-tokens", type=int, default=0,
                   help="loraforge LM-head/CE chunk (tokens); 0 = CausalLM.loss's default")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="dense bf16 peak for MFU (default: from the GPU name, e.g. H100 SXM 989.4)")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="tiny shape on the CPU, sequences / 16: checks that every code path runs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per contender")
    p.add_argument("--json-out", default=None)
    p.add_argument("--markdown-out", default=None, help="append the markdown table to this file")
    p.add_argument("--worker", default=None, choices=tuple(CONTENDERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.worker:
        return worker_main(args)

    import torch

    if not args.smoke_cpu and not torch.cuda.is_available():
        print("gpu_llama8b.py: CUDA is not available on this machine (torch "
              f"{torch.__version__}); run it on a GPU machine, or pass --smoke-cpu to check the code paths "
              "on a tiny model", file=sys.stderr)
        return 2
    ensure_loraforge_importable()
    names = list(CONTENDERS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    if args.smoke_cpu:
        device_name, peak = "CPU (smoke run, tiny shape)", float("nan")
    else:
        device_name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else gpu_bf16_peak_flops(device_name)
    cfg = model_config(args.smoke_cpu)
    work = tempfile.mkdtemp(prefix="loraforge-bench-gpu-")
    results = []
    for name in names:
        _, _, seq, batch, packed, _ = CONTENDERS[name]
        seq, batch = scaled_shape(seq, batch, args.smoke_cpu)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--chunk-tokens", str(args.chunk_tokens)]
        if args.smoke_cpu:
            cmd.append("--smoke-cpu")
        r = run_contender(name, cmd, os.path.join(work, f"{name}.log"), args.timeout)
        if not r.error:
            keys = mean_causal_keys(packed_doc_lengths(seq) if packed else [seq])
            r.flops_per_token = lora_flops_per_token(cfg, keys, True)
            r.mfu = mfu(r.tokens_per_s, r.flops_per_token, peak)
        results.append(r)
    lines = header([f"device: {device_name}; MFU against {peak / 1e12:.1f} TFLOP/s dense bf16"
                    if peak == peak else f"device: {device_name}",
                    f"model: Llama-3.1-8B shape{' (tiny for --smoke-cpu)' if args.smoke_cpu else ''}, random bf16 "
                    f"weights, N = {cfg.n_matmul_params() / 1e6:,.0f}M matmul params; LoRA r{RANK} alpha {ALPHA:g} "
                    f"on {','.join(TARGETS)}; AdamW lr {LR:g}; bf16 autocast; activation checkpointing",
                    f"{args.warmup} warm-up + {args.steps} timed steps, median; tokens/s counts every token of "
                    "the batch; FLOPs/token 6N + causal attention (per document when packed)",
                    f"work logs: {work}", ISSUE_PEER])
    table = markdown_table(results, "GPU: Llama-3.1-8B shape, LoRA r16 all linear", lines, PEERS, memory="gpu"
                           if not args.smoke_cpu else "rss")
    print("\n" + table + "\n")
    if args.markdown_out:
        with open(args.markdown_out, "a", encoding="utf-8") as f:
            f.write(table + "\n\n")
    if args.json_out:
        write_json(args.json_out, results, {"peak_flops": peak, "device": device_name, "header": lines})
    return 0 if all(not r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
