"""What a run tells the user: per-iteration lines (llama.cpp's `train_opt_callback` format),
a metrics JSONL, experiment trackers (TensorBoard, Weights & Biases, MLflow) and a loss plot.

Trackers are optional dependencies, checked when the run starts; W&B runs offline and MLflow
writes a local store unless the user's environment says otherwise (WANDB_MODE,
MLFLOW_TRACKING_URI), so no network is needed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from typing import Any, Iterable, Sequence

from loraforge.atomic import atomic_path
from loraforge.errors import LoraforgeError, file_error

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


_quiet = False  # processes other than rank 0 of a torchrun run print nothing


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def out(msg: str) -> None:
    if not _quiet:
        print(msg, flush=True)


def warn(msg: str) -> None:
    if not _quiet:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def format_hms(seconds: float) -> str:
    seconds = max(0, int(math.floor(seconds)))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# -- metrics JSONL -------------------------------------------------------------------------------

class Metrics:
    """One JSON object per line. A resumed run keeps the lines up to its checkpoint's iteration
    (steps logged after the last save, before an interruption, are dropped) and appends."""

    def __init__(self, path: str, resume_iteration: int | None) -> None:
        self.path = path
        if resume_iteration is not None and os.path.exists(path):
            kept = [r for r in read_metrics(path) if int(r.get("iter", 0)) <= resume_iteration
                    and not r.get("summary")]
            with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self.f = open(path, "a" if resume_iteration is not None else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file (a torn last line, from a kill, is skipped)."""
    if not os.path.isfile(path):
        raise file_error(path, "no such metrics file")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


# -- trackers ------------------------------------------------------------------------------------

def check_trackers(names: Sequence[str]) -> None:
    """Fail at start, not at the first log line, when a tracker's package is missing."""
    for name in names:
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise LoraforgeError(f"--report-to {name} needs the {package} package: pip install {package} "
                                 "(or pip install 'loraforge[tracking]')")


class Trackers:
    """Fans scalars out to the chosen trackers. `log({"train/loss": 2.1, ...}, step)`."""

    def __init__(self, names: Sequence[str], folder: str, run_name: str, config: dict[str, Any]) -> None:
        self.names = list(names)
        self.tb = self.wandb_run = self.mlflow = None
        if not self.names:
            return
        os.makedirs(folder, exist_ok=True)
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(folder, "tensorboard", run_name))
        if "wandb" in self.names:
            import wandb

            self.wandb_run = wandb.init(project="loraforge", name=run_name, dir=folder, config=config,
                                        mode=os.environ.get("WANDB_MODE", "offline"), reinit="finish_previous")
        if "mlflow" in self.names:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                # a local folder store: no server, no database package (MLflow keeps it in maintenance mode)
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri("file:" + os.path.abspath(os.path.join(folder, "mlruns")))
            mlflow.set_experiment("loraforge")
            mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})
            self.mlflow = mlflow

    def log(self, scalars: dict[str, float], step: int) -> None:
        scalars = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# -- per-iteration lines -------------------------------------------------------------------------

class StepPrinter:
    """Per-iteration lines like llama.cpp's train_opt_callback, plus a progress bar on a terminal;
    every step also goes to the metrics file and the trackers."""

    def __init__(self, metrics: Metrics, trackers: Trackers, n_iter: int, memory: Any = None) -> None:
        self.metrics, self.trackers, self.memory = metrics, trackers, memory
        self.prev_loss: float | None = None
        self.bar = None
        if sys.stderr.isatty() and n_iter > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=n_iter, unit="it", dynamic_ncols=True, leave=False, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, log: Any) -> None:
        """log: train.loop.StepLog."""
        bar = ""
        if self.prev_loss is not None:
            improvement = self.prev_loss - log.loss
            bar = "|" + "-" * max(0, int(1 + improvement * 10 + 0.5)) + ">"
        self.prev_loss = log.loss
        line = (f"train_opt_callback: iter={log.iteration:6d} sample={log.sample}/{log.n_items} "
                f"sched={log.sched:.6f} loss={log.loss:.6f} dt={format_hms(log.dt)} eta={format_hms(log.eta)} {bar}")
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
            self.bar.set_postfix(loss=f"{log.loss:.4f}")
            self.bar.update(1)
        else:
            out(line)
        tokens_per_s = log.tokens / log.dt if log.dt > 0 else 0.0
        memory_mib = self.memory() if self.memory is not None else None
        self.metrics.write({"iter": log.iteration, "sample": log.sample, "epoch": log.epoch, "sched": log.sched,
                            "lr": log.lr, "loss": log.loss, "grad_norm": log.grad_norm, "tokens": log.tokens,
                            "tokens_per_s": tokens_per_s, "dt": log.dt, "eta": log.eta,
                            "memory_mib": memory_mib})
        self.trackers.log({"train/loss": log.loss, "train/lr": log.lr, "train/grad_norm": log.grad_norm,
                           "train/tokens_per_s": tokens_per_s, "train/epoch": log.epoch,
                           "train/memory_mib": memory_mib}, log.iteration)

    def eval(self, iteration: int, loss: float, ppl: float) -> None:
        out(f"eval: iter={iteration} eval_loss={loss:.6f} ppl={ppl:.3f}")
        self.metrics.write({"iter": iteration, "eval_loss": loss, "eval_ppl": ppl})
        self.trackers.log({"eval/loss": loss, "eval/perplexity": ppl}, iteration)


class Silent:
    """Stands in for Metrics, Trackers and StepPrinter where nothing is written (ranks > 0 of a
    torchrun run): every call does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return self


# -- loss plot -----------------------------------------------------------------------------------

def plot_losses(metrics_paths: Sequence[str], out_png: str, labels: Iterable[str] | None = None,
                title: str = "loraforge: loss") -> str:
    """A PNG of training loss (and eval loss, as markers) against iterations, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels is not None else [os.path.basename(p) for p in metrics_paths]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    drawn = 0
    for i, path in enumerate(metrics_paths):
        records = read_metrics(path)
        color = f"C{i % 10}"
        train = sorted((r["iter"], r["loss"]) for r in records if "loss" in r and r.get("loss") is not None)
        evals = sorted((r["iter"], r["eval_loss"]) for r in records if "eval_loss" in r)
        if train:
            ax.plot([t[0] for t in train], [t[1] for t in train], color=color, linewidth=1.2,
                    label=f"{labels[i]} train")
            drawn += 1
        if evals:
            ax.plot([e[0] for e in evals], [e[1] for e in evals], color=color, linestyle="--", marker="o",
                    markersize=4, label=f"{labels[i]} eval")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise LoraforgeError(f"no loss values to plot in {', '.join(metrics_paths)}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png
