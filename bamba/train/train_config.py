"""TrainConfig: one flat dataclass, read from YAML, overridden with ``--key=value``, validated.

``--key value`` works as well. Each field carries its meaning (``bamba train --help`` lists them).
Dict-valued fields (``model_overrides``, ``data_options``) take dotted overrides:
``--model_overrides.hidden_size=128``. Values in overrides are parsed as YAML scalars
(``--bf16=false``, ``--lr=1e-3``, ``--tokenizer=null``).
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bamba.config import PRESETS, BambaConfig, check_field_types, matches_type, preset, type_name


DATA_KINDS = ("synthetic", "shards", "text", "sft")
DEFAULT_WARMUP = 10


def _key(default: Any = dataclasses.MISSING, help: str = "", *,
         factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its meaning (``help``), which ``bamba train --help`` lists."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    # model
    model: str = _key("tiny", "a preset of bamba.config.PRESETS: " + ", ".join(sorted(PRESETS)))
    model_overrides: dict[str, Any] = _key(
        factory=dict, help="BambaConfig fields that change the preset "
        "(--model_overrides.hidden_size=128)")
    init_from: str | None = _key(None, "an HF-layout checkpoint or a GGUF file to start from "
                                       "(fine-tuning; quantized weights start dequantized to "
                                       "float32)")
    # data
    data: str = _key("synthetic", "synthetic (seeded random documents, for tests and smoke "
                     "runs), shards (`bamba tokenize` output directories at data_path, "
                     "comma-separated: one dataset each), text (raw files tokenized on the fly "
                     "with tokenizer) or sft (chat or prompt/completion JSONL at data_path, loss "
                     "on assistant tokens only)")
    data_path: str | None = _key(None, "the data's files or directories (comma-separated)")
    data_options: dict[str, Any] = _key(
        factory=dict, help="loader options: weights, num_workers, shuffle_buffer, "
        "mask_boundary, text_field")
    seq_len: int = _key(256, "tokens per row")
    batch_size: int = _key(4, "rows per micro-batch per process")
    grad_accum: int = _key(1, "micro-batches per optimizer step")
    # optimisation (Bamba recipe: AdamW 0.9/0.95, wd 0.1, quadratic warm-up, cosine to a floor)
    steps: int = _key(100, "optimizer steps of the run")
    lr: float = _key(3e-4, "peak learning rate")
    min_lr: float = _key(1e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int | None = _key(None, f"steps of quadratic warm-up (null: {DEFAULT_WARMUP}, "
                                    "or fewer if the decay ends sooner)")
    decay_steps: int | None = _key(None, "step where the cosine reaches min_lr (null: steps)")
    weight_decay: float = _key(0.1, "AdamW weight decay (not on norms, biases, embeddings)")
    beta1: float = _key(0.9, "AdamW beta1")
    beta2: float = _key(0.95, "AdamW beta2")
    grad_clip: float = _key(1.0, "max global gradient norm; 0 disables clipping")
    z_loss: float = _key(0.0, "weight of the z-loss (log-sum-exp of the logits, squared)")
    bf16: bool = _key(True, "bf16 autocast for the forward pass (weights and optimizer stay "
                      "fp32)")
    activation_checkpointing: bool = _key(False, "recompute each layer in the backward pass "
                                          "(less memory, ~1/3 more compute)")
    # Each decoder layer compiled in place (trainer.compile_layers): faster steps
    # (benchmarks/README.md#training), but the first step compiles for about a minute on a cold
    # inductor cache, which a short run (the demo's) does not win back: off by default.
    compile: bool = _key(False, "torch.compile each decoder layer and the loss (the first "
                         "step compiles for about a minute)")
    seed: int = _key(0, "seed of the initial weights and the synthetic data")
    # run directory, checkpoints, logs, export
    out_dir: str = _key("runs/train", "run directory: checkpoints/, metrics.jsonl, loss.png, hf/")
    ckpt_every: int = _key(50, "optimizer steps between checkpoints; 0: only at the end")
    keep_last: int = _key(2, "checkpoints kept")
    resume: bool = _key(True, "continue from the newest checkpoint in out_dir if there is one")
    log_every: int = _key(1, "steps between metrics.jsonl records")
    progress: bool = _key(True, "show a progress bar")
    export: bool = _key(True, "write the HF layout to out_dir/hf at the end")
    tokenizer: str | None = _key(None, "tokenizer.json or a directory, copied into the export")
    # benchmarks/host.py measures a machine's bf16 matmul peak (describe_host)
    peak_tflops: float = _key(0.9, "the hardware's peak TFLOP/s, for MFU (set it for your "
                              "machine)")
    threads: int | None = _key(None, "torch intra-op threads per process (null: leave as is)")
    retain_memory: bool = _key(True, "keep freed memory in the process for the next step "
                               "(glibc: no page faults per step; resident memory stays at a "
                               "step's peak)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_field_types(self, infinite=())
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "keep_last", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = ("ckpt_every", "weight_decay", "grad_clip", "z_loss")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps is not None and self.decay_end < self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_end}) must be >= warmup_steps "
                             f"({self.warmup_steps})")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ValueError(f"decay_steps must be > 0, got {self.decay_steps}")
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ValueError(f"out_dir {self.out_dir} exists and is not a directory")
        if self.model not in PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; known: {', '.join(sorted(PRESETS))}")
        if self.data not in DATA_KINDS:
            raise ValueError(f"data must be one of {', '.join(DATA_KINDS)}; got {self.data!r}")
        if self.data in ("text", "sft") and not (self.tokenizer or self.init_from):
            raise ValueError(f"data={self.data!r} needs tokenizer (or init_from with a tokenizer)")
        if self.init_from and self.model_overrides:
            raise ValueError("model_overrides cannot change the architecture of init_from")
        if self.data != "synthetic" and not self.data_path:
            raise ValueError(f"data={self.data!r} needs data_path")
        if self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0, got {self.peak_tflops}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be > 0, got {self.threads}")

    @property
    def decay_end(self) -> int:
        return self.steps if self.decay_steps is None else self.decay_steps

    @property
    def warmup(self) -> int:
        """warmup_steps, or its default: 10 steps, fewer when the decay ends sooner."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(DEFAULT_WARMUP, self.decay_end)

    def model_config(self) -> BambaConfig:
        if self.init_from:
            from bamba.checkpoint import load_config as load_model_config

            return load_model_config(self.init_from)
        try:
            return preset(self.model, **self.model_overrides)
        except TypeError as exc:  # an unknown field name
            raise ValueError(f"model_overrides: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read YAML at ``path`` (None: defaults), apply ``--key=value`` / ``--key value``
    overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping")
        raw = dict(loaded or {})
    for item in pair_overrides(overrides):
        apply_override(raw, item)
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}")
    return TrainConfig(**_coerce_floats(raw))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"{problem} at line {mark.line + 1}" if mark is not None else problem


def pair_overrides(items: list[str] | tuple[str, ...]) -> list[str]:
    """``["--steps", "10", "--lr=1e-3"]`` -> ``["--steps=10", "--lr=1e-3"]``."""
    out: list[str] = []
    rest = list(items)
    while rest:
        item = rest.pop(0)
        if item.startswith("--") and "=" not in item:
            if not rest or rest[0].startswith("--"):
                raise ValueError(f"override {item} needs a value (--key=value or --key value)")
            item = f"{item}={rest.pop(0)}"
        out.append(item)
    return out


def _coerce_floats(raw: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: turn such strings into floats where a
    float is expected; anything else is left for validation to reject."""
    hints = typing.get_type_hints(TrainConfig)
    out = dict(raw)
    for name, value in raw.items():
        hint = hints[name]
        if isinstance(value, str) and matches_type(1.5, hint) and not matches_type("", hint):
            try:
                out[name] = float(value)
            except ValueError:
                pass  # reported by validate() with the field's name
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``--key=value`` (or ``--dict_key.sub=value``) to the raw mapping in place."""
    key, sep, value = item.removeprefix("--").partition("=")
    if not item.startswith("--") or not sep or not key:
        raise ValueError(f"override {item!r} is not of the form --key=value")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"override {item!r}: not a YAML value ({_yaml_problem(exc)})") from None
    head, dot, sub = key.partition(".")
    if dot:
        target = raw.setdefault(head, {})
        if not isinstance(target, dict):
            raise ValueError(f"override {item!r}: {head} is not a mapping")
        target[sub] = parsed
    else:
        raw[key] = parsed


def keys_help() -> str:
    """Every config key with its type, default and meaning (for ``bamba train --help``)."""
    hints = typing.get_type_hints(TrainConfig)
    lines = ["config keys (YAML, or --key=value / --key value after the config):"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "null" if default is None else json.dumps(default)
        lines.append(f"  {f.name} ({type_name(hints[f.name])}, default {shown})")
        lines.extend(textwrap.wrap(f.metadata["help"], width=88, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6))
    return "\n".join(lines)
