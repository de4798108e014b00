"""`loraforge finetune`: llama.cpp finetune's flags and files, plus instruction tuning.

Plain text (the default, llama.cpp style): token windows of --ctx over the whole file.
A .json/.jsonl/.csv/.parquet --train-data is an instruction/chat dataset (see data/).
"""

from __future__ import annotations

import argparse

import torch

from loraforge.errors import LoraforgeError

TEXT_SUFFIXES = (".txt", ".text", ".md", "")
DATASET_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

# llama.cpp finetune --rank-* flags -> HF module short names
RANK_FLAGS = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "ffn_gate": "gate_proj", "ffn_down": "down_proj", "ffn_up": "up_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
    "tok_embd": "embed_tokens", "out": "lm_head",
}
NORM_RANK_FLAGS = ("att_norm", "ffn_norm", "out_norm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("files (llama.cpp finetune names)")
    g.add_argument("--model-base", "-m", "--model", dest="model_base", default=None,
                   help="base model: GGUF file or HF folder (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--train-data", default=None,
                   help="training text (default: bundled Shakespeare) or a .json/.jsonl/.csv/.parquet dataset")
    g.add_argument("--checkpoint-in", default="checkpoint.gguf",
                   help="resume from this checkpoint if it exists (default: %(default)s)")
    g.add_argument("--checkpoint-out", default="checkpoint-ITERATION.gguf",
                   help="checkpoint file pattern; ITERATION -> iteration number and LATEST")
    g.add_argument("--lora-out", default="ggml-lora-ITERATION-f32.gguf",
                   help="GGUF LoRA adapter pattern for llama.cpp --lora; ITERATION -> number and LATEST")
    g.add_argument("--peft-out", default=None, help="also write a PEFT adapter folder at the end")
    g.add_argument("--metrics-out", default=None, help="metrics JSONL (default: next to --lora-out)")
    g.add_argument("--save-every", type=int, default=10, help="save every N iterations (0: only at the end)")

    g = p.add_argument_group("run")
    g.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--base-dtype", default="auto", choices=("auto", "f32", "f16", "bf16", "quantized"),
                   help="keep a GGUF base quantized in memory, or dequantize it")
    g.add_argument("--quantize", default=None, choices=("nf4",), help="QLoRA: quantize an HF base to NF4")
    g.add_argument("--seed", type=int, default=-1, help="random seed (-1: from time)")
    g.add_argument("--use-checkpointing", dest="checkpointing", action="store_true", default=True,
                   help="gradient (activation) checkpointing (default)")
    g.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    g.add_argument("--no-flash", action="store_true", help="accepted for compatibility (SDPA picks the kernel)")
    g.add_argument("--flash", action="store_true", help=argparse.SUPPRESS)

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=4, help="default rank (default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=4.0, help="alpha; scale = alpha / rank")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--use-rslora", action="store_true", help="scale = alpha / sqrt(rank)")
    g.add_argument("--target-modules", default=None,
                   help="HF module names (comma separated) or all-linear (default: all seven projections)")
    for flag in ("wq", "wk", "wv", "wo", "ffn_gate", "ffn_down", "ffn_up", "w1", "w2", "w3",
                 "tok_embd", "out"):
        g.add_argument(f"--rank-{flag}", f"--rank-{flag.replace('_', '-')}", dest=f"rank_{flag}", type=int,
                       default=None, help=argparse.SUPPRESS if flag in ("w1", "w2", "w3") else None)
    for flag in NORM_RANK_FLAGS:
        g.add_argument(f"--rank-{flag.replace('_', '-')}", f"--rank-{flag}", dest=f"rank_{flag}", type=int,
                       default=None, help="accepted; norm adapters are not trained (llama.cpp ignores them)")

    g = p.add_argument_group("optimizer and schedule (llama.cpp names, HF aliases)")
    g.add_argument("--adam-iter", dest="adam_iter", type=int, default=None,
                   help="optimizer iterations to run in this invocation (default 256)")
    g.add_argument("--max-steps", type=int, default=None, help="train up to this many iterations in total")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (instead of --adam-iter)")
    g.add_argument("--batch", "--batch-size", dest="batch", type=int, default=8)
    g.add_argument("--grad-acc", "--gradient-accumulation-steps", dest="grad_acc", type=int, default=1)
    g.add_argument("--ctx", type=int, default=128, help="context (tokens per sample)")
    g.add_argument("--adam-alpha", "--lr", dest="lr", type=float, default=1e-3)
    g.add_argument("--adam-decay", "--weight-decay", dest="weight_decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-gclip", "--max-grad-norm", dest="grad_clip", type=float, default=1.0)
    g.add_argument("--lr-scheduler", default="llama", choices=("llama", "linear", "cosine", "constant"))
    g.add_argument("--warmup", "--warmup-steps", dest="warmup", type=int, default=None,
                   help="warmup iterations (default 100 for llama's schedule, 0 otherwise)")
    g.add_argument("--warmup-ratio", type=float, default=None)
    g.add_argument("--cos-decay-steps", type=int, default=1000)
    g.add_argument("--cos-decay-restart", type=float, default=1.1)
    g.add_argument("--cos-decay-min", type=float, default=0.1)
    g.add_argument("--enable-restart", action="store_true")

    g = p.add_argument_group("text samples (llama.cpp)")
    g.add_argument("--sample-start", default="")
    g.add_argument("--include-sample-start", action="store_true")
    g.add_argument("--escape", action="store_true")
    g.add_argument("--overlapping-samples", action="store_true")
    g.add_argument("--fill-with-next-samples", action="store_true")
    g.add_argument("--separate-with-eos", action="store_true")
    g.add_argument("--separate-with-bos", action="store_true", default=True)
    g.add_argument("--no-separate-with-bos", dest="separate_with_bos", action="store_false")

    g = p.add_argument_group("instruction data")
    g.add_argument("--data-format", default="auto",
                   help="auto | alpaca | sharegpt | messages | prompt_completion | text")
    g.add_argument("--columns", default=None, help="column mapping, e.g. instruction=question,output=answer")
    g.add_argument("--template", default="auto", help="alpaca | chatml | model | auto | a template FILE")
    g.add_argument("--train-on-inputs", action="store_true", help="also train on prompt tokens")
    g.add_argument("--packing", action="store_true", help="several samples per row, attention kept apart")
    g.add_argument("--max-seq-length", type=int, default=None, help="longest sample (default: --ctx)")
    g.add_argument("--overflow", default="truncate", choices=("truncate", "drop"))
    g.add_argument("--on-bad-row", default="skip", choices=("skip", "error"))
    g.add_argument("--eval-data", default=None)
    g.add_argument("--eval-split", type=float, default=0.0)
    g.add_argument("--eval-every", type=int, default=0)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise LoraforgeError(f"--{name.replace('_', '-')} must be positive, got {value}")


def run(args: argparse.Namespace) -> int:
    from loraforge.train.finetune import Finetune

    _positive(args, "batch", "ctx", "grad_acc", "lr", "threads", "epochs", "max_seq_length")
    for name in ("adam_iter", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise LoraforgeError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.save_every < 0:
        raise LoraforgeError(f"--save-every must be >= 0, got {args.save_every}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from loraforge.atomic import check_writable
    from loraforge.train.finetune import pattern_path

    for pattern in (args.checkpoint_out, args.lora_out):
        check_writable(pattern_path(pattern, "LATEST"))
    Finetune(args).run()
    return 0
