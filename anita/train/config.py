"""`TrainConfig`: every knob of a training run, one dataclass, read from flags and/or a config file.

The same names work everywhere: the field `lora_r` is the flag `--lora-r` and the key `lora_r`
(or `lora-r`) in a TOML or YAML file given with `--config`. Flags given on the command line win
over the file, which wins over the defaults. The defaults are what a TRL user expects of a bare
command (micro-batch 8, no accumulation, no warm-up, torch AdamW, no weight decay, max_length
1024), with QLoRA on; the paper's values are in anita/recipes/ (docs/recipe.md). Whatever a run
will do is printed on its first line (`anita.train.loop.describe`).

DPO's config (`anita.dpo.config.DPOConfig`) subclasses `TrainConfig`, so it reuses the loop's fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from anita.arguments import finite_float
from anita.dtypes import PRECISIONS, check_bf16_device, training_dtypes
from anita.errors import AnitaError, check_number
from anita.model.activation_checkpointing import CHECKPOINTING
from anita.model.llama import PROJECTIONS
from anita.model.logprobs import DEFAULT_CHUNK_SIZE
from anita.sources import parse_columns
from anita.sources.source import DEFAULT_SPLIT
from anita.train.tracking import check_report_to

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same library, as a package (an optional dependency)
    import tomli as tomllib

# Fields that may differ between a run and its `--resume`: they do not change the numbers (how much
# is recomputed in backward does not: the checkpointing modes give bit-equal gradients, docs/speed.md).
RESUMABLE_CHANGES = {"resume", "save_steps", "keep_checkpoints", "eval_steps", "progress", "data_cache", "report_to",
                     "checkpointing",  # gradients bit-equal in every mode
                     "gradient_checkpointing",  # an older run.json's name for checkpointing (see ALIASES)
                     "chunk_size"}  # the head's chunks: per-token log-probs do not depend on them
# The settings of a fresh adapter; with --adapter the adapter's own are used, so these are refused.
FRESH_ADAPTER_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "rslora", "targets")
# Pairs of fields that set one thing two ways: both set is an error, unless a flag sets one and the
# config file the other, where the flag wins and the file's value is dropped.
EXCLUSIVE_PAIRS = (("batch_size", "max_tokens"),)
# Older names that still work, as documented aliases of a field: name -> (field, {old value: new value}).
# `--gradient-checkpointing` / `--no-gradient-checkpointing` and the key `gradient_checkpointing = true|false`
# are `checkpointing = full|off`; given beside `checkpointing` they must agree on whether it is on.
ALIASES = {"gradient_checkpointing": ("checkpointing", {True: "full", False: "off"})}
# A source and what selects its rows: a flag naming another source drops the file's split and config.
SOURCE_SELECTORS = {"data": ("data_split", "data_config"), "eval_data": ("eval_split", "eval_config")}


def flag(default, help: str, **kw):
    """A dataclass field with its help text (used for `--help` and docs)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- what to train, where
    model: str | None = flag(None, "HF-layout model directory or Hub id (required)")
    data: str | None = flag(None, "training data (required): a .jsonl/.json/.jsonl.gz/.parquet/.csv/.arrow file, a "
                                "Hub-layout directory or a Hub dataset id org/name; messages, ShareGPT, Alpaca, "
                                "prompt/completion or text rows (docs/data.md)")
    data_split: str | None = flag(None, "split of a dataset directory or Hub id given as --data (e.g. train_sft; "
                                        "default: train); a single file has none")
    data_config: str | None = flag(None, "config (subset) of a dataset directory or Hub id given as --data")
    output: str | None = flag(None, "run directory: adapter/, checkpoints/, metrics.jsonl, plot (required)")
    eval_data: str | None = flag(None, "held-out data, any source and format --data takes; its loss is logged "
                                     "every --eval-steps")
    eval_split: str | None = flag(None, "split of a dataset directory or Hub id given as --eval-data (e.g. "
                                        "test_sft; default: train); a single file has none")
    eval_config: str | None = flag(None, "config (subset) of a dataset directory or Hub id given as --eval-data")
    adapter: str | None = flag(None, "PEFT adapter to keep training (as the demo's Italian stage continues the DPO "
                                     "adapter), with its own r, alpha, dropout and targets, so --lora-r, "
                                     "--lora-alpha, --lora-dropout, --rslora and --targets are refused with it; "
                                     "default: a fresh LoRA")
    # ------------------------------------------------------------------ base model and LoRA
    qlora: bool = flag(True, "load the base linears in 4-bit NF4 (double quantization), i.e. QLoRA, as the recipe "
                     "does; --no-qlora trains LoRA over the full-precision base")
    lora_r: int = flag(16, "LoRA rank r of a fresh adapter")
    lora_alpha: float = flag(8.0, "LoRA alpha of a fresh adapter (scale = alpha/r, or alpha/sqrt(r) with --rslora)")
    lora_dropout: float = flag(0.0, "dropout on the LoRA input of a fresh adapter")
    rslora: bool = flag(False, "rank-stabilised LoRA scale alpha/sqrt(r) for a fresh adapter")
    targets: list[str] = flag(list(PROJECTIONS), "comma-separated module names a fresh adapter adapts, or all-linear")
    adapter_dtype: str | None = flag(None, "dtype of the LoRA weights and their gradients (and of --optimizer adamw's "
                                           "moments): fp32, or bf16 (the QLoRA paper's); default: bf16 over an NF4 "
                                           "base in bf16, as TRL's trainers cast a 4-bit model's adapters, else fp32",
                                     choices=["fp32", "bf16"])
    precision: str | None = flag(None, "compute dtype: bf16 autocast over fp32 master weights, or fp32, the exact "
                                       "reference mode (the head and adapters follow it unless set); default: bf16 "
                                       "where the device has it natively (CUDA compute capability 8+, AVX512-BF16/AMX "
                                       "CPUs), as TRL trains, else fp32",
                                 choices=list(PRECISIONS))
    checkpointing: str = flag("full", "activation checkpointing: full (recompute each block in backward), selective "
                                      "(keep the projection and attention outputs, recompute the element-wise "
                                      "work) or off; --gradient-checkpointing and --no-gradient-checkpointing "
                                      "(key gradient_checkpointing = true/false) are older names for full and off",
                              choices=list(CHECKPOINTING))
    head_dtype: str | None = flag(None, "dtype of the output head's matmuls in the loss: bf16 (as HF/TRL under "
                                        "autocast) or fp32; the log-softmax stays fp32 (docs/speed.md gives the loss "
                                        "difference); default: the precision's",
                                  choices=["fp32", "bf16"])
    fused_projections: bool = flag(False, "run the frozen q/k/v and gate/up base weights as one matmul each "
                                          "(equal to the plain path up to rounding; checkpoints keep HF's names)")
    device: str = flag("cpu", "cpu or cuda (under torchrun, cuda means cuda:LOCAL_RANK)")
    fsdp: bool = flag(False, "under torchrun, shard the frozen base, the adapter and its optimizer state over the "
                             "processes (FSDP2, one group per decoder block) instead of copying the model to each "
                             "(DDP); docs/distributed.md")
    # ------------------------------------------------------------------------------- data
    max_length: int = flag(1024, "longest sequence in tokens; longer rows are cut at the end (TRL's default)")
    packing: bool = flag(False, "pack several examples into each row (attention never crosses them); with "
                                "--max-tokens each micro-batch is one padding-free row")
    max_tokens: int | None = flag(None, "build micro-batches by a token budget instead of --batch-size: at most N "
                                        "tokens each counting padding, examples of similar length together; "
                                        "default: batch_size rows")
    skip_bad_rows: bool = flag(False, "skip and count malformed rows instead of stopping at the first one")
    max_rows: int | None = flag(None, "read only the first N rows of --data (the same slice every run)")
    columns: list[str] = flag([], "rename the source's columns to the ones anita reads, NAME=COLUMN,..., e.g. "
                                  "prompt=question,completion=answer")
    text_field: str | None = flag(None, "train on this column as plain text (continued pre-training), whatever "
                                        "the other columns")
    data_cache: str | None = flag(None, "folder of the tokenized-data cache (default $ANITA_DATA_CACHE, else "
                                        "$ANITA_CACHE/tokenized)")
    # ----------------------------------------------------------------------- optimisation
    optimizer: str = flag("adamw", "adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes; paged only on CUDA, "
                                   "plain 8-bit on CPU)",
                        choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    lr: float = flag(2e-4, "peak learning rate (a LoRA rate: 10x TRL's full fine-tuning default)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    scheduler: str = flag("linear", "decay after warm-up", choices=["linear", "cosine", "constant"])
    warmup_steps: int = flag(0, "linear warm-up steps (ignored when --warmup-ratio is set)")
    warmup_ratio: float | None = flag(None, "warm-up as a fraction of all steps (rounded up), as in HF")
    max_grad_norm: float = flag(1.0, "clip the global gradient norm to this (0 = no clipping; not in the recipe)")
    batch_size: int = flag(8, "rows per micro-batch (per process)")
    grad_accum: int = flag(1, "micro-batches accumulated per optimizer step (per process)")
    epochs: int = flag(1, "passes over the data (ignored when --max-steps is set)")
    max_steps: int | None = flag(None, "optimizer steps to run (overrides --epochs)")
    seed: int = flag(42, "seed of LoRA init, data order and dropout")
    chunk_size: int = flag(DEFAULT_CHUNK_SIZE, "tokens per chunk of the chunked output-head loss (not in the recipe)")
    # --------------------------------------------------------------------- run management
    save_steps: int = flag(100, "write a checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = flag(2, "how many recent checkpoints to keep")
    eval_steps: int | None = flag(None, "evaluate on --eval-data every N steps (always before and after)")
    resume: bool = flag(False, "continue the run in --output from its last checkpoint")
    progress: bool = flag(True, "show a tqdm progress bar")
    report_to: list[str] = flag([], "also log every metrics.jsonl record to these trackers, comma-separated: "
                                    "tensorboard (event files in OUTPUT/tensorboard), trackio (its local "
                                    "database), or none; pip install 'anita[track]' (docs/training.md)")

    def __post_init__(self):
        # The dtypes left unset (None) are what a TRL user gets on this device (`anita.dtypes.training_dtypes`),
        # fixed here so that run.json, the first line and every reader see the dtypes the run uses. (So
        # `dataclasses.replace(cfg, device=...)` keeps them: build a new TrainConfig to choose them anew.)
        self.precision, self.head_dtype, self.adapter_dtype = training_dtypes(
            self.device, self.qlora, self.precision, self.head_dtype, self.adapter_dtype)

    def validate(self, source: str = "config", given: set[str] = frozenset()) -> "TrainConfig":
        """Raise AnitaError naming the first field that is missing, out of range, or set but unused.

        `given` names the fields the user set (flags, config-file keys); a fresh adapter's settings
        set beside --adapter are refused even when they equal the defaults."""
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise AnitaError(f"{source}: {name!r} is required (flag --{name.replace('_', '-')})")
        check_field_types(self, source)
        positive = ("lora_r", "max_length", "batch_size", "grad_accum", "epochs", "chunk_size", "save_steps",
                    "keep_checkpoints", "max_steps", "eval_steps", "max_tokens")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AnitaError(f"{source}: {name!r} must be at least 1, got {value}")
        if self.max_rows is not None and self.max_rows < 1:
            raise AnitaError(f"{source}: 'max_rows' must be at least 1, got {self.max_rows}")
        try:
            parse_columns(self.columns)
        except AnitaError as e:
            raise AnitaError(f"{source}: {str(e).replace('--columns', 'columns', 1)}") from None
        if self.lora_alpha <= 0:
            raise AnitaError(f"{source}: 'lora_alpha' must be > 0, got {self.lora_alpha}")
        for name in ("lr", "weight_decay", "warmup_steps", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise AnitaError(f"{source}: {name!r} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise AnitaError(f"{source}: 'lora_dropout' must be in [0, 1), got {self.lora_dropout}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio <= 1:
            raise AnitaError(f"{source}: 'warmup_ratio' must be in [0, 1], got {self.warmup_ratio}")
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value not in choices and not (value is None and _field_type(type(self), f.name)[1]):
                raise AnitaError(f"{source}: {f.name!r} must be one of {', '.join(choices)}, got {value!r}")
        if not self.targets:
            raise AnitaError(f"{source}: 'targets' must name at least one module")
        if self.max_tokens is not None and "batch_size" in given:
            raise AnitaError(f"{source}: set either 'batch_size' (rows per micro-batch) or 'max_tokens' (a token "
                             "budget per micro-batch), not both")
        check_held_out(self, source)
        if "bf16" in (self.precision, self.head_dtype, self.adapter_dtype):
            check_bf16_device(self.device, f"{source}: bf16 on device {self.device}")
        check_report_to(self.report_to, source)
        check_fsdp_settings(self, source)
        if self.adapter:
            unused = [n for n in FRESH_ADAPTER_FIELDS if n in given or getattr(self, n) != field_default(type(self), n)]
            if unused:
                raise AnitaError(f"{source}: {', '.join(unused)}: settings of a fresh adapter, but --adapter continues "
                                 f"{self.adapter} with its own r, alpha, dropout, rsLoRA and targets; drop them")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_aliases(values: dict, source: str) -> dict:
    """`values` (field -> value, from one source: the flags or a config file) with each older name of
    `ALIASES` replaced by the field it stands for; an alias that contradicts its field is an error."""
    values = dict(values)
    for alias, (name, meaning) in ALIASES.items():
        if alias not in values:
            continue
        old = values.pop(alias)
        if not isinstance(old, bool):
            raise AnitaError(f"{source}: {alias!r} must be true or false, got {old!r}")
        if name in values and (values[name] == "off") != (meaning[old] == "off"):
            raise AnitaError(f"{source}: {alias} = {str(old).lower()} contradicts {name} = {values[name]}; "
                             f"keep only {name}")
        values.setdefault(name, meaning[old])
    return values


def check_fsdp_settings(cfg: TrainConfig, source: str = "config") -> None:
    """AnitaError for what a sharded (--fsdp) run cannot do here: bitsandbytes' 8-bit optimizers
    update plain tensors, not FSDP's sharded DTensors; the fused projections (a shortcut beside the
    plain path) are not held equal to it over sharded weights."""
    if not cfg.fsdp:
        return
    if cfg.optimizer != "adamw":
        raise AnitaError(f"{source}: fsdp needs optimizer adamw (torch's, which updates sharded tensors); "
                         f"{cfg.optimizer} from bitsandbytes cannot: drop --optimizer {cfg.optimizer} or --fsdp")
    if cfg.fused_projections:
        raise AnitaError(f"{source}: fused_projections is not supported with fsdp; drop --fused-projections or --fsdp")


def check_held_out(cfg: TrainConfig, source: str = "config") -> None:
    """AnitaError if `eval_data` is the training data itself (the same source, split and config): its
    loss would be logged as held-out while measuring rows the model trains on."""
    if not cfg.eval_data or cfg.data is None:
        return
    same_source = Path(cfg.data).expanduser().resolve() == Path(cfg.eval_data).expanduser().resolve()
    if same_source and (cfg.data_split or DEFAULT_SPLIT) == (cfg.eval_split or DEFAULT_SPLIT) \
            and cfg.data_config == cfg.eval_config:
        raise AnitaError(f"{source}: eval_data {cfg.eval_data} is the training data itself (same source, split and "
                         "config), so its loss would not be held out; give held-out rows (or another --eval-split)")


# ------------------------------------------------------------------------ value checking
def check_field_types(cfg, source: str) -> None:
    """Every int field holds an int and every float field a finite number (NaN, inf and a TOML
    1e400 are refused here, before any range check: NaN passes `x < 0`)."""
    for f in dataclasses.fields(cfg):
        kind, _ = _field_type(type(cfg), f.name)
        value = getattr(cfg, f.name)
        if value is not None and kind in (int, float):
            check_number(f"{source}: {f.name!r}", value, integer=kind is int)


def field_default(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _field_type(cls, name: str):
    """The field's type with `| None` removed, and whether None is allowed."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return args[0], True
    return hint, False


def coerce(cls, name: str, value, source: str):
    """Check (and gently convert) one value for field `name`; errors name the source and field."""
    kind, optional = _field_type(cls, name)
    if value is None and optional:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, str):
        return value
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    expected = "a list of strings" if typing.get_origin(kind) is list else kind.__name__
    raise AnitaError(f"{source}: {name!r} must be {expected}{' or null' if optional else ''}, got {value!r}")


def read_config_file(path, cls=TrainConfig) -> dict:
    """Keys and values of a TOML (.toml) or YAML (.yaml/.yml) config file, checked against `cls`."""
    path = Path(path)
    if not path.is_file():
        raise AnitaError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise AnitaError(f"{path}: not valid TOML ({e})") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise AnitaError(f"{path}: not valid YAML ({e})") from None
    else:
        raise AnitaError(f"{path}: config files must end in .toml, .yaml or .yml")
    if not isinstance(raw, dict):
        raise AnitaError(f"{path}: expected a table of key = value settings at the top level")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names and name not in ALIASES:
            raise AnitaError(f"{path}: unknown key {key!r}; expected one of {', '.join(sorted(names))}")
        values[name] = value if name in ALIASES else coerce(cls, name, value, str(path))
    return resolve_aliases(values, str(path))


# ---------------------------------------------------------------------------- the flags
def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field (`lora_r` -> `--lora-r`); booleans get `--x/--no-x`. Defaults are
    suppressed so that `config_from_args` can tell the flags given from those left out."""
    parser.add_argument("--config", help="TOML or YAML file with the same keys as the flags")
    for f in dataclasses.fields(cls):
        kind, _ = _field_type(cls, f.name)
        option = "--" + f.name.replace("_", "-")
        default = field_default(cls, f.name)
        help_text = f.metadata.get("help", "") + ("" if default is None else f" (default: {default})")
        kw = dict(default=argparse.SUPPRESS, help=help_text, dest=f.name)
        if kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(kind) is list:
            parser.add_argument(option, type=str, metavar="A,B,...", **kw)
        else:  # a float flag must be finite (its range is checked by `validate`)
            parser.add_argument(option, type=finite_float() if kind is float else kind,
                                choices=f.metadata.get("choices"), **kw)
    for alias, (name, meaning) in ALIASES.items():
        parser.add_argument("--" + alias.replace("_", "-"), action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, dest=alias,
                            help=f"older names: --{alias.replace('_', '-')} is --{name} {meaning[True]}, "
                                 f"--no-{alias.replace('_', '-')} is --{name} {meaning[False]}")


def add_config_command(subparsers, name: str, cls, func, help: str, description: str) -> argparse.ArgumentParser:
    """The subcommand `anita NAME`, whose flags are the fields of `cls` (`add_config_arguments`), run by `func(args)`."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_config_arguments(parser, cls)
    parser.set_defaults(func=func)
    return parser


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    """Defaults, then the `--config` file, then the flags given; validated. A flag wins over the file
    also where fields depend on each other: a flag setting one field of an `EXCLUSIVE_PAIRS` pair drops
    the file's value of the other, and a flag naming another source than the file's drops the file's
    split and config of it (`SOURCE_SELECTORS`), so `--config recipe.toml --max-tokens 4096 --data x.jsonl` works."""
    from_file = read_config_file(args.config, cls) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    flags = resolve_aliases({name: value if name in ALIASES else coerce(cls, name, value, f"--{name.replace('_', '-')}")
                             for name, value in vars(args).items() if name in names or name in ALIASES},
                            "command line")
    overridden = [(a, b) for pair in EXCLUSIVE_PAIRS for a, b in (pair, pair[::-1])] + \
        [(name, selector) for name, selectors in SOURCE_SELECTORS.items() for selector in selectors]
    for flag_name, dropped in overridden:
        if flag_name in flags and dropped not in flags and flags[flag_name] != from_file.get(flag_name):
            from_file.pop(dropped, None)  # back to its default
    values = {**from_file, **flags}
    return cls(**values).validate(getattr(args, "config", None) or "command line", given=set(values))


def differences(a: dict, b: dict, ignore=RESUMABLE_CHANGES) -> list[str]:
    """Names of the fields whose values differ between two configs (as dicts, e.g. from run.json)."""
    keys = (set(a) | set(b)) - set(ignore)
    return sorted(k for k in keys if json.dumps(a.get(k)) != json.dumps(b.get(k)))
