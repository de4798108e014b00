"""Where a training step's time goes: torch profiler over a few steps of the seeds' SmolLM2 settings
(batch 4 x ctx 64, LoRA r4 on the seven projections, AdamW, gradient clip), as `loraforge finetune`
builds them, with each lever switchable. Prints the share of self CPU time per kind of work and the
top operators.

  python bench/profile_step.py --base-dtype f32 --compile on --threads 2
  LORAFORGE_CPU_LINEAR=aten LORAFORGE_STACK_PROJECTIONS=0 python bench/profile_step.py   # levers off
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ensure_loraforge_importable  # noqa: E402

# kind of work -> operator-name fragments (the first match wins)
KINDS = (
    ("matmul: frozen base (oneDNN)", ("mkldnn::_linear_pointwise",)),
    ("matmul: torch BLAS (LoRA factors; base when not oneDNN)", ("aten::mm", "aten::addmm", "aten::bmm",
                                                                  "aten::linear", "aten::matmul")),
    ("quantized weights: decoding", ("loraforge::split_linear",)),
    ("attention", ("scaled_dot_product", "flex_attention")),
    ("LM head softmax / cross-entropy", ("logsumexp", "exp_", "log_softmax", "gather")),
    ("compiled elementwise kernels (Inductor)", ("cpp_fused", "Torch-Compiled Region", "CompiledFunction",
                                                "triton_")),
    ("optimizer (AdamW) and clipping", ("Optimizer", "_foreach", "clip_grad", "linalg_vector_norm")),
    ("elementwise ops (eager)", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow",
                                 "aten::rsqrt", "aten::mean", "aten::neg", "aten::cat", "aten::copy_",
                                 "aten::fill_", "aten::zero_", "aten::sum", "aten::where", "aten::cos",
                                 "aten::sin", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous",
                                 "aten::empty", "aten::split", "aten::view", "aten::reshape", "aten::transpose",
                                 "aten::index", "aten::embedding", "aten::block_diag", "aten::t")),
)


def kind_of(name: str) -> str:
    for kind, fragments in KINDS:
        if any(f in name for f in fragments):
            return kind
    return "other (autograd engine, Python, small ops)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-dtype", default="f32", choices=("f32", "quantized", "bf16"))
    p.add_argument("--compile", default="off", choices=("on", "off"))
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    ensure_loraforge_importable()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from loraforge import compiled
    from loraforge.kernels import cpu_linear
    from loraforge.loader import load_model
    from loraforge.lora import LoraConfig, inject

    torch.set_num_threads(args.threads)
    model = load_model(None, args.base_dtype).model
    torch.manual_seed(1)
    inject(model, LoraConfig(r=4, alpha=4.0))
    model.gradient_checkpointing = args.checkpointing
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids, labels = torch.randint(0, vocab, (4, 64), generator=g), torch.randint(0, vocab, (4, 64), generator=g)

    def step() -> None:
        loss, _ = model.loss(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if args.compile == "on":
        compiled.enable(model)
        seconds, active = compiled.probe(model, lambda: model.loss(ids, labels)[0].backward())
        print(f"compiled in {seconds:.1f} s (active: {active})")
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        shares[kind_of(e.key)] = shares.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    switches = (f"base {args.base_dtype}, --compile {args.compile}, checkpointing {args.checkpointing}, "
                f"CPU linear backend {cpu_linear.backend()}, stacked projections {model.stack_projections}")
    print(f"\n{switches}; {args.threads} threads; {wall:.3f} s per profiled step (profiler on)\n")
    print("| kind of work | share of self CPU time |\n|---|---:|")
    for kind, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {100 * t / total:.1f}% |")
    print("\n| operator | self CPU ms per step | calls per step |\n|---|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / args.steps:.1f} | {e.count // args.steps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
