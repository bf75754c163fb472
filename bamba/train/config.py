"""TrainConfig: one flat dataclass, read from YAML, overridden with ``--key=value``, validated.

Dict-valued fields (``model_overrides``, ``data_options``) take dotted overrides:
``--model_overrides.hidden_size=128``. Values in overrides are parsed as YAML scalars
(``--bf16=false``, ``--lr=1e-3``, ``--tokenizer=null``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bamba.config import PRESETS, BambaConfig, preset


DATA_KINDS = ("synthetic", "shards", "text", "sft")


@dataclass
class TrainConfig:
    # model
    model: str = "tiny"  # a preset name of bamba.config.PRESETS
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # an HF-layout checkpoint to start from (fine-tuning)
    # data: "synthetic" (seeded random documents, for tests and smoke runs), "shards"
    # (`bamba tokenize` output directories at data_path, comma-separated: one dataset each) or
    # "text" (raw files tokenized on the fly with `tokenizer`); data_options go to the loader
    # (weights, num_workers, shuffle_buffer, mask_boundary, text_field); "sft": chat or
    # prompt/completion JSONL at data_path, loss on assistant tokens only (bamba.train.sft).
    data: str = "synthetic"
    data_path: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 256
    batch_size: int = 4  # rows per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    # optimisation (Bamba recipe: AdamW 0.9/0.95, wd 0.1, quadratic warm-up, cosine to a floor)
    steps: int = 100
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    decay_steps: int | None = None  # step where the cosine reaches min_lr (default: steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    z_loss: float = 0.0
    bf16: bool = True  # bf16 autocast for the forward pass (weights and optimizer stay fp32)
    activation_checkpointing: bool = False
    # torch.compile each decoder layer in place, and the loss (trainer.compile_layers; inductor,
    # backward through AOTAutograd; parameter names unchanged). Steps of the tiny model at 8x256
    # ran 1.29x faster than eager (4167 vs 3241 tok/s; the bench model 1.19x, 266 vs 223; 2
    # threads, benchmarks/bench_train.py --compile), but the first step compiles for 40-60 s on
    # a cold inductor cache (seconds on a warm one): that pays off after ~300 tiny-model steps,
    # so it is off by default (the 150-step demo included).
    compile: bool = False
    seed: int = 0
    # run directory, checkpoints, logs, export
    out_dir: str = "runs/train"
    ckpt_every: int = 50  # optimizer steps between checkpoints; 0: only at the end
    keep_last: int = 2
    resume: bool = True  # continue from the newest checkpoint in out_dir if there is one
    log_every: int = 1
    progress: bool = True
    export: bool = True  # write the HF layout to out_dir/hf at the end
    tokenizer: str | None = None  # tokenizer.json or a directory, copied into the export
    # hardware peak for MFU: set it for your machine (2 cores of this host: 0.90 TFLOP/s bf16 by
    # the best 2048³ matmul, benchmarks/bench_train.py; an earlier host 0.41)
    peak_tflops: float = 0.9
    threads: int | None = None  # torch intra-op threads per process (None: leave as is)
    # keep freed memory in the process for the next step instead of handing it back to the
    # kernel (glibc; bamba.train.memory): ~10% faster CPU steps, resident memory stays at a
    # step's peak
    retain_memory: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "keep_last", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "ckpt_every", "weight_decay", "grad_clip", "z_loss")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.decay_end < self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_end}) must be >= warmup_steps "
                             f"({self.warmup_steps})")
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
    """Read YAML at ``path`` (None: defaults), apply ``--key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping")
        raw = dict(loaded or {})
    for item in overrides:
        apply_override(raw, item)
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}")
    return TrainConfig(**_coerce_floats(raw))


def _coerce_floats(raw: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: turn such strings into floats where a
    float is expected; anything else is left for validation to reject."""
    hints = typing.get_type_hints(TrainConfig)
    out = dict(raw)
    for name, value in raw.items():
        if isinstance(value, str) and _matches(1.5, hints[name]) and not _matches("", hints[name]):
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
    parsed = yaml.safe_load(value) if value else ""
    head, dot, sub = key.partition(".")
    if dot:
        target = raw.setdefault(head, {})
        if not isinstance(target, dict):
            raise ValueError(f"override {item!r}: {head} is not a mapping")
        target[sub] = parsed
    else:
        raw[key] = parsed


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _matches(value, hints[f.name]):
            raise ValueError(f"{f.name} must be {_type_name(hints[f.name])}, got {value!r}")
        if isinstance(value, float) and value != value:
            raise ValueError(f"{f.name} must be a number, got NaN")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))
