"""The typed run spec of `finetune`: every setting of a run, in sections, validated once.

It is built in one place (`build_spec`) from a config file (YAML or JSON) and the flags given
on the command line (flags override the file), and it is the only thing the training code
receives. Each field carries its flag names and help text (read by `commands/finetune.py` to
make the parser), and its config key is the field name, e.g.

    model:
      model_base: open-llama-3b-v2-q8_0.gguf
    lora:
      lora_r: 8
    optimizer:
      lr: 2.0e-4

Flat files (`lora_r: 8` at the top level) are accepted too. An error names the flag, or the
config key and file, and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from loraforge.errors import LoraforgeError

OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
SCHEDULERS = ("llama", "linear", "cosine", "constant")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
BASE_DTYPES = ("auto", "f32", "f16", "bf16", "quantized")
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text")
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# llama.cpp finetune --rank-* flags -> HF module short names
RANK_MODULES = {
    "rank_wq": "q_proj", "rank_wk": "k_proj", "rank_wv": "v_proj", "rank_wo": "o_proj",
    "rank_ffn_gate": "gate_proj", "rank_ffn_down": "down_proj", "rank_ffn_up": "up_proj",
    "rank_tok_embd": "embed_tokens", "rank_out": "lm_head",
}
NORM_RANKS = ("rank_att_norm", "rank_ffn_norm", "rank_out_norm")


def opt(default: Any, *flags: str, help: str, metavar: str | None = None, choices: tuple | None = None,
        negative: str | None = None, hidden: tuple[str, ...] = ()) -> Any:
    """A spec field: its default, its flags (first = main name), help text, and for booleans the
    flag that sets it False (`negative`). `hidden`: accepted aliases not shown in --help."""
    meta = {"flags": flags, "help": help, "metavar": metavar, "choices": choices, "negative": negative,
            "hidden": hidden}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSpec:
    model_base: str | None = opt(None, "--model-base", "-m", "--model", metavar="PATH",
                                 help="base model: GGUF file or HF folder (default: the embedded "
                                      "SmolLM2-135M-Instruct)")
    base_dtype: str = opt("auto", "--base-dtype", choices=BASE_DTYPES,
                          help="keep a GGUF base quantized in memory, or dequantize it; auto keeps a "
                               "quantized GGUF quantized when its dense copy would be large")
    quantize: str | None = opt(None, "--quantize", choices=("nf4",), help="QLoRA: quantize an HF base to NF4")
    device: str = opt("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N")
    threads: int = opt(0, "--threads", "-t", help="CPU threads (0: all cores)")
    seed: int = opt(-1, "--seed", help="random seed (-1: from the clock; a resumed run keeps its seed)")
    checkpointing: bool = opt(True, "--use-checkpointing", negative="--no-checkpointing",
                              help="gradient (activation) checkpointing: less memory, ~30%% more time")
    compile: str = opt("auto", "--compile", choices=("auto", "on", "off"),
                       help="run the decoder layers through torch.compile (C++ on the CPU, Triton on CUDA); "
                            "auto: on CUDA, and on the CPU for runs of 300+ iterations (long enough to win back the "
                            "compile time)")
    no_flash: bool = opt(False, "--no-flash", hidden=("--flash",),
                         help="accepted for llama.cpp compatibility (SDPA picks the attention kernel)")
    fsdp: bool = opt(False, "--fsdp",
                     help="under torchrun: shard the frozen base and the LoRA weights, gradients and AdamW "
                          "state over the processes with FSDP2 (a dense base: f32/f16/bf16; --optim adamw_torch)")
    dist_timeout: int = opt(1800, "--dist-timeout",  # torch's default for gloo, transformers' ddp_timeout
                            help="under torchrun: seconds a process waits for the others before the run stops "
                                 "with an error (a process that died is usually noticed at once)")


@dataclass
class LoraSpec:
    lora_r: int = opt(4, "--lora-r", help="default LoRA rank; scale = alpha / rank")
    lora_alpha: float = opt(4.0, "--lora-alpha", help="LoRA alpha")
    lora_dropout: float = opt(0.0, "--lora-dropout", help="dropout on the adapters' input, in [0, 1)")
    use_rslora: bool = opt(False, "--use-rslora", help="rank-stabilised LoRA: scale = alpha / sqrt(rank)")
    target_modules: str = opt(DEFAULT_TARGETS, "--target-modules",
                              help="HF module names (comma separated) or all-linear")
    rank_wq: int | None = opt(None, "--rank-wq", help="rank of attention q (0: no adapter; default --lora-r)")
    rank_wk: int | None = opt(None, "--rank-wk", help="rank of attention k")
    rank_wv: int | None = opt(None, "--rank-wv", help="rank of attention v")
    rank_wo: int | None = opt(None, "--rank-wo", help="rank of the attention output")
    rank_ffn_gate: int | None = opt(None, "--rank-ffn_gate", "--rank-ffn-gate", hidden=("--rank-w1",),
                                    help="rank of the feed-forward gate")
    rank_ffn_down: int | None = opt(None, "--rank-ffn_down", "--rank-ffn-down", hidden=("--rank-w2",),
                                    help="rank of the feed-forward down projection")
    rank_ffn_up: int | None = opt(None, "--rank-ffn_up", "--rank-ffn-up", hidden=("--rank-w3",),
                                  help="rank of the feed-forward up projection")
    rank_tok_embd: int | None = opt(None, "--rank-tok-embd", "--rank-tok_embd",
                                    help="rank of the token embeddings (default 0: none)")
    rank_out: int | None = opt(None, "--rank-out", help="rank of the output layer (default 0: none)")
    rank_att_norm: int | None = opt(None, "--rank-att-norm", "--rank-att_norm",
                                    help="accepted; norm adapters are not trained (llama.cpp ignores them)")
    rank_ffn_norm: int | None = opt(None, "--rank-ffn-norm", "--rank-ffn_norm",
                                    help="accepted; norm adapters are not trained")
    rank_out_norm: int | None = opt(None, "--rank-out-norm", "--rank-out_norm",
                                    help="accepted; norm adapters are not trained")


@dataclass
class DataSpec:
    train_data: str | None = opt(None, "--train-data", metavar="FILE",
                                 help="training text, or a .json/.jsonl/.csv/.parquet instruction dataset "
                                      "(default: the bundled Shakespeare)")
    ctx: int = opt(128, "--ctx", help="tokens per text sample (and the row length of datasets)")
    batch: int = opt(8, "--batch", "--batch-size",
                     help="samples per micro-batch; under torchrun the global batch of all processes together "
                          "(each of N processes runs batch/N of them, so it must divide by N)")
    sample_start: str = opt("", "--sample-start", help="text samples start at this string (default: every token)")
    include_sample_start: bool = opt(False, "--include-sample-start",
                                     help="keep the sample-start string in the sample")
    escape: bool = opt(False, "--escape", help="process \\n-style escapes in --sample-start")
    overlapping_samples: bool = opt(False, "--overlapping-samples",
                                    help="samples run past the next sample start")
    fill_with_next_samples: bool = opt(False, "--fill-with-next-samples",
                                       help="fill a short sample with the following ones")
    separate_with_eos: bool = opt(False, "--separate-with-eos", help="put EOS between filled samples")
    separate_with_bos: bool = opt(True, "--separate-with-bos", negative="--no-separate-with-bos",
                                  help="put BOS between filled samples")
    data_format: str = opt("auto", "--data-format", choices=DATA_FORMATS,
                           help="dataset format (auto: detected from the columns)")
    columns: str | None = opt(None, "--columns", help="column mapping, e.g. instruction=question,output=answer")
    template: str = opt("auto", "--template", metavar="NAME|FILE",
                        help="prompt template: alpaca, chatml, model, raw, auto or a template file")
    train_on_inputs: bool = opt(False, "--train-on-inputs", help="also train on prompt tokens")
    packing: bool = opt(False, "--packing", help="several samples per row, attention kept apart")
    max_seq_length: int | None = opt(None, "--max-seq-length", help="longest dataset sample (default: --ctx)")
    overflow: str = opt("truncate", "--overflow", choices=("truncate", "drop"),
                        help="what happens to a longer sample")
    on_bad_row: str = opt("skip", "--on-bad-row", choices=("skip", "error"),
                          help="a malformed dataset row is skipped (and counted) or stops the run")
    eval_data: str | None = opt(None, "--eval-data", metavar="FILE",
                                help="held-out text or dataset for eval loss / perplexity")
    eval_split: float = opt(0.0, "--eval-split",
                            help="hold out this fraction for eval (text: the end of the file; datasets: a "
                                 "random fraction, or a count of samples when >= 1)")


@dataclass
class OptimSpec:
    optim: str = opt("adamw_torch", "--optim", choices=OPTIMIZERS,
                     help="optimizer: AdamW (torch), or bitsandbytes' 8-bit / paged 8-bit AdamW")
    lr: float = opt(1e-3, "--adam-alpha", "--lr", "--learning-rate", help="peak learning rate")
    weight_decay: float = opt(0.1, "--adam-decay", "--weight-decay", help="AdamW weight decay")
    adam_beta1: float = opt(0.9, "--adam-beta1", help="AdamW beta1")
    adam_beta2: float = opt(0.999, "--adam-beta2", help="AdamW beta2")
    grad_clip: float = opt(1.0, "--adam-gclip", "--max-grad-norm", help="gradient norm clip (0: off)")
    lr_scheduler: str = opt("llama", "--lr-scheduler", choices=SCHEDULERS,
                            help="llama: llama.cpp's warmup + cosine decay; linear/cosine/constant as "
                                 "transformers")
    warmup: int | None = opt(None, "--warmup", "--warmup-steps",
                             help="warmup iterations (default: 100 for llama's schedule, else 0)")
    warmup_ratio: float | None = opt(None, "--warmup-ratio", help="warmup as a fraction of the run (rounded up)")
    cos_decay_steps: int = opt(1000, "--cos-decay-steps", help="llama schedule: cosine decay length")
    cos_decay_restart: float = opt(1.1, "--cos-decay-restart", help="llama schedule: restart length multiplier")
    cos_decay_min: float = opt(0.1, "--cos-decay-min", help="llama schedule: lowest multiplier")
    enable_restart: bool = opt(False, "--enable-restart", help="llama schedule: restart the cosine decay")


@dataclass
class LoopSpec:
    adam_iter: int | None = opt(None, "--adam-iter",
                                help="iterations to run in this invocation, as llama.cpp (default 256)")
    max_steps: int | None = opt(None, "--max-steps", help="train up to this many iterations in total")
    epochs: float | None = opt(None, "--epochs", help="passes over the data (instead of --adam-iter)")
    grad_acc: int = opt(1, "--grad-acc", "--gradient-accumulation-steps",
                        help="micro-batches per optimizer step")
    save_every: int = opt(10, "--save-every", help="save every N iterations (0: only at the end)")
    eval_every: int = opt(0, "--eval-every", help="evaluate every N iterations (0: at the end only)")
    eval_on_start: bool = opt(False, "--eval-on-start", help="evaluate the untrained model first")
    early_stopping_patience: int = opt(0, "--early-stopping-patience",
                                       help="stop after N evaluations without a lower eval loss (0: off)")


@dataclass
class OutputSpec:
    checkpoint_in: str = opt("checkpoint.gguf", "--checkpoint-in", metavar="FILE",
                             help="resume from this checkpoint if it exists")
    checkpoint_out: str = opt("checkpoint-ITERATION.gguf", "--checkpoint-out", metavar="PATTERN",
                              help="checkpoint files; ITERATION -> the iteration number and LATEST")
    lora_out: str = opt("ggml-lora-ITERATION-f32.gguf", "--lora-out", metavar="PATTERN",
                        help="GGUF LoRA adapters for llama.cpp --lora; ITERATION -> number and LATEST")
    peft_out: str | None = opt(None, "--peft-out", metavar="FOLDER", help="also write a PEFT adapter folder")
    metrics_out: str | None = opt(None, "--metrics-out", metavar="FILE",
                                  help="metrics JSONL (default: next to --lora-out)")
    save_total_limit: int = opt(0, "--save-total-limit",
                                help="keep only the newest N ITERATION files (LATEST always kept; 0: all)")
    load_best_at_end: bool = opt(False, "--load-best-at-end",
                                 help="also write the adapter of the lowest eval loss as ...-BEST")
    plot_loss: bool = opt(True, "--plot-loss", negative="--no-plot-loss",
                          help="write a PNG of training and eval loss next to the adapter at the end")


@dataclass
class LoggingSpec:
    report_to: str = opt("none", "--report-to", metavar="LIST",
                         help="tracking: tensorboard, wandb, mlflow (comma separated) or none")
    run_name: str | None = opt(None, "--run-name", help="run name for the trackers (default: the adapter name)")
    logging_dir: str | None = opt(None, "--logging-dir", metavar="FOLDER",
                                  help="where trackers write (default: <adapter>-runs next to the adapter)")


@dataclass
class RunSpec:
    """Everything a `finetune` run needs, in sections."""

    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optimizer: OptimSpec = field(default_factory=OptimSpec)
    loop: LoopSpec = field(default_factory=LoopSpec)
    outputs: OutputSpec = field(default_factory=OutputSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    # where each non-default value came from: field name -> "--flag" or "key in FILE" (for messages)
    origin: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {key: value}}: the effective spec, as --print-config writes it."""
        return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in sections()}

    def report_targets(self) -> list[str]:
        return [t for t in (x.strip() for x in self.logging.report_to.split(",")) if t and t != "none"]


def sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RunSpec) if f.name != "origin"]


def spec_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every setting: field name -> (section name, dataclass field)."""
    return _FIELDS


_SECTION_TYPES = {"model": ModelSpec, "lora": LoraSpec, "data": DataSpec, "optimizer": OptimSpec,
                  "loop": LoopSpec, "outputs": OutputSpec, "logging": LoggingSpec}
_FIELDS = {f.name: (section, f) for section, cls in _SECTION_TYPES.items() for f in dataclasses.fields(cls)}


def _describe(name: str, origin: dict[str, str]) -> str:
    """How a user set `name`: its flag, or its key and file."""
    if name in origin:
        return origin[name]
    _, f = spec_fields()[name]
    return f.metadata["flags"][0]


def _coerce(name: str, f: dataclasses.Field, value: Any, where: str) -> Any:
    """A config-file value in the field's type, or a one-line error naming the key and file."""
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise LoraforgeError(f"{where}: {name} must not be empty")
    try:
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float)
                                                                        and value.is_integer())):
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if kind.startswith("str"):
            if isinstance(value, (list, tuple)) and name in ("target_modules", "report_to"):
                return ",".join(str(v) for v in value)
            if isinstance(value, (dict, list)):
                raise ValueError(f"expected text, got {type(value).__name__}")
            return str(value)
    except (TypeError, ValueError) as e:
        raise LoraforgeError(f"{where}: {name}: {e}") from None
    return value


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON config file as a mapping; one-line errors for a missing or malformed file."""
    from loraforge.errors import file_error

    if not os.path.isfile(path):
        raise file_error(path, "no such config file" if not os.path.exists(path) else "is not a file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise file_error(path, f"config is not UTF-8 text (byte {e.start})") from None
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise file_error(path, f"not valid JSON (line {e.lineno}: {e.msg})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f"line {mark.line + 1}: " if mark is not None else ""
            raise file_error(path, f"not valid YAML ({at}{getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise file_error(path, "a config file must be a mapping of keys to values")
    return data


def flatten_config(data: Mapping[str, Any], path: str) -> dict[str, tuple[Any, str]]:
    """{field name: (value, "key in FILE")} from sectioned or flat config data."""
    fields = spec_fields()
    section_names = {s.name for s in sections()}
    out: dict[str, tuple[Any, str]] = {}

    def put(key: str, value: Any, shown: str) -> None:
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise LoraforgeError(f"{path}: unknown config key {shown!r}{hint}")
        if key in out:
            raise LoraforgeError(f"{path}: {shown!r} is given twice")
        out[key] = (value, f"{shown} in {path}")

    for key, value in data.items():
        key = str(key)
        if key in section_names:
            if not isinstance(value, dict):
                raise LoraforgeError(f"{path}: section {key!r} must be a mapping of keys to values")
            for sub, v in value.items():
                if str(sub) in fields and fields[str(sub)][0] != key:
                    raise LoraforgeError(f"{path}: {key}.{sub} belongs in section {fields[str(sub)][0]!r}")
                put(str(sub), v, f"{key}.{sub}")
        else:
            put(key.replace("-", "_"), value, key)
    return out


def build_spec(file_values: Mapping[str, tuple[Any, str]] | None = None,
               flag_values: Mapping[str, tuple[Any, str]] | None = None) -> RunSpec:
    """The validated spec: defaults, then the config file's values, then the flags'.

    Both mappings are {field name: (value, where)}; `where` names the flag or the key and file.
    File values are converted to the field's type here; flag values come typed from the parser.
    """
    fields = spec_fields()
    spec = RunSpec()
    for source in (file_values or {}, flag_values or {}):
        for name, (value, where) in source.items():
            section, f = fields[name]
            if source is file_values:
                value = _coerce(name, f, value, where)
            setattr(getattr(spec, section), name, value)
            spec.origin[name] = where
    validate(spec)
    return spec


def validate(spec: RunSpec) -> None:
    """Every check that can be made before any file is read or any model loaded."""
    def bad(name: str, problem: str) -> LoraforgeError:
        return LoraforgeError(f"{_describe(name, spec.origin)}: {problem}")

    values = {name: getattr(getattr(spec, section), name) for name, (section, _) in spec_fields().items()}
    for name, (section, f) in spec_fields().items():
        v = values[name]
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(name, f"must be a finite number, got {v}")
        choices = f.metadata["choices"]
        if choices and v is not None and v not in choices:
            raise bad(name, f"must be one of {', '.join(choices)}, got {v!r}")
    for name in ("batch", "ctx", "grad_acc", "lr", "epochs", "max_seq_length", "cos_decay_steps", "dist_timeout"):
        if values[name] is not None and values[name] <= 0:
            raise bad(name, f"must be positive, got {values[name]}")
    for name in ("adam_iter", "max_steps", "save_every", "eval_every", "threads", "warmup", "lora_r",
                 "save_total_limit", "early_stopping_patience", *RANK_MODULES, *NORM_RANKS):
        if values[name] is not None and values[name] < 0:
            raise bad(name, f"must be >= 0, got {values[name]}")
    for name in ("weight_decay", "grad_clip", "lora_alpha"):
        if values[name] < 0:
            raise bad(name, f"must be >= 0, got {values[name]}")
    if not 0.0 <= values["lora_dropout"] < 1.0:
        raise bad("lora_dropout", f"must be in [0, 1), got {values['lora_dropout']}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= values[name] < 1.0:
            raise bad(name, f"must be in [0, 1), got {values[name]}")
    if values["eval_split"] < 0 or (values["eval_split"] >= 1 and not float(values["eval_split"]).is_integer()):
        raise bad("eval_split", f"must be a fraction in [0, 1) or a whole count of samples, got {values['eval_split']}")
    if values["warmup_ratio"] is not None and not 0.0 <= values["warmup_ratio"] <= 1.0:
        raise bad("warmup_ratio", f"must be in [0, 1], got {values['warmup_ratio']}")
    if not 0.0 <= values["cos_decay_min"] <= 1.0:
        raise bad("cos_decay_min", f"must be in [0, 1], got {values['cos_decay_min']}")
    if values["cos_decay_restart"] <= 0:
        raise bad("cos_decay_restart", f"must be positive, got {values['cos_decay_restart']}")
    unknown = [t for t in spec.logging.report_to.split(",") if t.strip() and t.strip() not in REPORT_TO]
    if unknown:
        raise bad("report_to", f"unknown tracker {unknown[0].strip()!r} (choose from {', '.join(REPORT_TO)})")
    if values["eval_data"] and values["eval_split"]:
        raise bad("eval_split", "give --eval-data or --eval-split, not both")
    has_eval = bool(values["eval_data"] or values["eval_split"])
    for name in ("eval_every", "eval_on_start", "early_stopping_patience", "load_best_at_end"):
        if values[name] and not has_eval:
            raise bad(name, "needs held-out data (--eval-data or --eval-split)")
    if values["early_stopping_patience"] and not values["eval_every"]:
        raise bad("early_stopping_patience", "needs --eval-every (evaluations to compare)")
    if values["load_best_at_end"] and not values["eval_every"]:
        raise bad("load_best_at_end", "needs --eval-every (evaluations to choose from)")
    given = [n for n in ("adam_iter", "max_steps", "epochs") if values[n] is not None]
    if len(given) > 1:
        first = _describe(given[0], spec.origin)
        raise bad(given[1], f"give one of --adam-iter, --max-steps, --epochs (also got {first})")
    if values["save_total_limit"] and "ITERATION" not in spec.outputs.checkpoint_out:
        raise bad("save_total_limit", "needs ITERATION in --checkpoint-out (numbered files to remove)")
    if values["quantize"] and values["base_dtype"] not in ("auto",):
        raise bad("quantize", f"--quantize nf4 decides how the base is held; drop --base-dtype {values['base_dtype']}")


def to_yaml(spec: RunSpec) -> str:
    """The effective spec as a YAML config file that reproduces the run."""
    import yaml

    header = ("# loraforge finetune run spec (loraforge finetune --config THIS_FILE reproduces the run;\n"
              "# seed -1 takes the clock: set a seed for a bit-identical rerun)\n")
    return header + yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=False)


def from_dict(data: Mapping[str, Any], where: str = "checkpoint") -> RunSpec:
    """A spec back from `to_dict` output (as stored in a checkpoint)."""
    return build_spec(flatten_config(data, where))
