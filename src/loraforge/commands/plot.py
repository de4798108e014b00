"""`loraforge plot METRICS.jsonl...`: training and eval loss against iterations as a PNG, one
colour per run, from the metrics files `finetune` writes next to its adapters.

  loraforge plot lora-metrics.jsonl
  loraforge plot run-a/lora-metrics.jsonl run-b/lora-metrics.jsonl -o compare.png --labels a,b
"""

from __future__ import annotations

import argparse
import os

from loraforge.errors import LoraforgeError

USAGE = "loraforge plot [options] METRICS.jsonl [METRICS.jsonl ...]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metrics", metavar="METRICS.jsonl", nargs="+", help="metrics files written by finetune")
    parser.add_argument("-o", "--out", metavar="FILE.png", default=None,
                        help="output PNG (default: the first metrics file with .png, or -compare.png for several)")
    parser.add_argument("--labels", default=None, help="comma-separated run names (default: the file names)")
    parser.add_argument("--title", default="loraforge: loss", help="plot title")


def run(args: argparse.Namespace) -> int:
    from loraforge.train.report import plot_losses

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.metrics):
        raise LoraforgeError(f"--labels names {len(labels)} runs for {len(args.metrics)} metrics files")
    if labels is None and len(args.metrics) > 1:
        labels = [os.path.relpath(p) for p in args.metrics]
    out = args.out
    if out is None:
        stem = os.path.splitext(args.metrics[0])[0]
        out = stem + (".png" if len(args.metrics) == 1 else "-compare.png")
    try:
        plot_losses(args.metrics, out, labels, title=args.title)
    except ImportError:
        raise LoraforgeError("plotting needs matplotlib: pip install matplotlib") from None
    print(f"plot: wrote {out}")
    return 0
