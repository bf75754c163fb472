"""The offline demo: the Python standard library's source -> a trained hybrid -> a completion.

Four stages, each the project's own function, each skipped when its output already exists (so a
rerun goes straight to generation, and an interrupted run continues where it stopped):

1. ``train_bpe``: a byte-level BPE tokenizer on the stdlib's ``.py`` files (no tests, no
   site-packages) -> ``ROOT/tokenizer``;
2. ``tokenize_corpus``: Arrow shards -> ``ROOT/shards`` (resumable by itself);
3. ``bamba.train.trainer.train`` with the demo config (``bamba/configs/stdlib-demo.yaml``,
   package data) -> ``ROOT/train`` (checkpoints, metrics.jsonl, loss.png) and the HF layout
   ``ROOT/train/hf``;
4. ``bamba.generation.generate``: a greedy completion of a Python prompt.

ROOT defaults to ``$BAMBA_DEMO_DIR`` or ``~/.cache/bamba/demo``; ``bamba.default_model`` loads
``ROOT/train/hf`` as the embedded default once it exists. A run on another corpus (``corpus``,
``max_files``) or vocabulary size works in a directory of its own below ROOT (``work_dir``), so
it never collides with the default run's tokenizer and shards.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEMO_DIR_ENV = "BAMBA_DEMO_DIR"
# Tests are not what the demo should learn to write, and site-packages is not the stdlib.
STDLIB_EXCLUDE = ("site-packages/*", "test/*", "*/test/*", "*/tests/*", "idlelib/idle_test/*")
CONFIG_NAME = "stdlib-demo.yaml"
SUMMARY = "demo-train.json"  # written after training: what a skipped rerun reports


def demo_dir() -> Path:
    """Where the demo writes (and ``load_default`` looks): $BAMBA_DEMO_DIR or ~/.cache/bamba/demo."""
    env = os.environ.get(DEMO_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bamba" / "demo"


def trained_checkpoint(root: Path | None = None) -> Path:
    """The HF-layout directory the demo exports into."""
    return (demo_dir() if root is None else root) / "train" / "hf"


def packaged_config(name: str) -> Path:
    """A file of ``bamba/configs`` (package data, so installed wheels have it too)."""
    path = importlib.resources.files("bamba.configs") / name
    if not isinstance(path, Path) or not path.is_file():
        raise FileNotFoundError(f"{name}: not among the package's configs ({path})")
    return path


def default_config_path() -> Path:
    """The demo's training config, ``stdlib-demo.yaml`` of the installed package."""
    return packaged_config(CONFIG_NAME)


@dataclass(frozen=True)
class DemoOptions:
    root: Path
    config: Path
    overrides: tuple[str, ...] = ()  # --key=value for the training config
    corpus: Path | None = None  # None: the stdlib of this Python
    max_files: int | None = None  # the first N corpus files (sorted), for quick runs
    workers: int = 2
    prompt: str = "def fibonacci(n):"
    max_new_tokens: int = 48

    def work_dir(self) -> Path:
        """Where this run's stages write: ``root`` for the default corpus and vocabulary, else a
        directory below it named after what differs (e.g. ``root/first-50-files``)."""
        parts = [] if self.corpus is None else [self.corpus.expanduser().resolve().name]
        if self.max_files is not None:
            parts.append(f"first-{self.max_files}-files")
        vocab = _vocab_size(self)
        if vocab != _vocab_size(DemoOptions(root=self.root, config=self.config)):
            parts.append(f"vocab-{vocab}")
        return self.root / "-".join(parts) if parts else self.root


@dataclass
class DemoReport:
    completion: str = ""
    completion_ids: list[int] = field(default_factory=list)
    corpus_files: int = 0
    corpus_tokens: int = 0
    train: dict[str, Any] = field(default_factory=dict)  # the SUMMARY record
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time of this run
    skipped: list[str] = field(default_factory=list)  # stages whose output existed


def corpus_files(root: Path | None = None, max_files: int | None = None) -> list[Path]:
    """The demo corpus: ``.py`` files below ``root`` (default: the stdlib), minus tests."""
    from bamba.data.sources import list_input_files

    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = [p for p in list_input_files([root], STDLIB_EXCLUDE) if p.suffix == ".py"]
    if max_files is not None:
        if max_files < 1:
            raise ValueError(f"max_files must be >= 1, got {max_files}")
        files = files[:max_files]
    if not files:
        raise ValueError(f"no .py files below {root}")
    return files


def ensure_tokenizer(files: Sequence[Path], out: Path, vocab_size: int) -> bool:
    """Train the BPE tokenizer into ``out`` unless it is there; True if it was trained."""
    from bamba.data.bpe import train_bpe

    if (out / "tokenizer.json").exists():
        return False
    train_bpe(files, vocab_size, out)
    return True


def ensure_shards(files: Sequence[Path], tokenizer: Path, out: Path, workers: int) -> dict[str, Any]:
    """Tokenize into ``out`` (``tokenize_corpus`` skips the shards a previous run finished)."""
    from bamba.data.tokenize import TokenizeOptions, tokenize_corpus

    opts = TokenizeOptions(tokenizer_dir=tokenizer, out=out, workers=workers)
    return tokenize_corpus(files, opts, progress=True)


def train_config(opts: DemoOptions, tokenizer: Path, shards: Path) -> Any:
    """The demo config with this run's paths, the tokenizer's special ids and the overrides."""
    from dataclasses import replace

    from bamba.cores import choose_threads
    from bamba.tokenizer import load_tokenizer
    from bamba.train.train_config import load_config

    tok = load_tokenizer(tokenizer)
    paths = ["--data=shards", f"--data_path={shards}", f"--tokenizer={tokenizer}",
             f"--out_dir={opts.work_dir() / 'train'}", "--model_overrides.bos_token_id=null",
             f"--model_overrides.eos_token_id={tok.eos_token_id}",
             f"--model_overrides.pad_token_id={tok.pad_token_id}"]
    cfg = load_config(opts.config, [*paths, *opts.overrides])
    return replace(cfg, threads=choose_threads(cfg.threads))


def ensure_trained(cfg: Any) -> tuple[dict[str, Any], bool]:
    """Train (resuming any checkpoint) unless the export and its summary match ``cfg.steps``;
    returns (summary, trained)."""
    from bamba.train.trainer import train

    out = Path(cfg.out_dir)
    summary_path = out / SUMMARY
    if summary_path.exists() and (out / "hf" / "config.json").exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("steps") == cfg.steps:
            return summary, False
    began = time.perf_counter()
    result = train(cfg)
    if result.stopped or result.export_dir is None:
        raise ValueError("training stopped before the end; run the demo again to continue")
    summary = summarize(out / "metrics.jsonl", cfg, time.perf_counter() - began)
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, summary_path)
    return summary, True


def summarize(metrics: Path, cfg: Any, seconds: float, tail: int = 10) -> dict[str, Any]:
    """Loss and speed of a finished run from its metrics log (all of it, across resumes)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    last = {r["step"]: r for r in rows}  # a resumed step logs again: keep its latest record
    steps = sorted(last)
    if not steps:
        raise ValueError(f"{metrics}: no steps logged")
    tail_rows = [last[s] for s in steps[-tail:]]
    speeds = sorted(last[s]["tokens_per_s"] for s in steps[1:] or steps)  # step 1 warms up
    return {"steps": cfg.steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
            "model": cfg.model, "tokens": cfg.steps * cfg.seq_len * cfg.batch_size * cfg.grad_accum,
            "first_loss": last[steps[0]]["loss"], "final_loss": last[steps[-1]]["loss"],
            f"mean_loss_last_{len(tail_rows)}": sum(r["loss"] for r in tail_rows) / len(tail_rows),
            "median_tokens_per_s": speeds[len(speeds) // 2],
            "median_mfu": sorted(last[s]["mfu"] for s in steps)[len(steps) // 2],
            "train_seconds_this_run": seconds}


def complete(model_dir: Path, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """Greedy completion of ``prompt`` by the checkpoint in ``model_dir`` (fp32)."""
    from bamba.checkpoint import from_pretrained, load_tokenizer
    from bamba.generation import GenerationConfig, generate
    from bamba.generation_defaults import stop_token_ids

    tokenizer = load_tokenizer(model_dir)
    model = from_pretrained(model_dir)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    eos = stop_token_ids(model.config, model.generation_defaults, tokenizer)
    (result,) = generate(model, [ids], GenerationConfig(max_new_tokens=max_new_tokens,
                                                        eos_token_ids=eos))
    return tokenizer.decode(result.token_ids), result.token_ids


def run_demo(opts: DemoOptions) -> DemoReport:
    """All four stages; each is timed and skipped when its output exists."""
    report = DemoReport()
    work = opts.work_dir()
    if work != opts.root:
        log.info("another corpus or vocabulary than the default run's: working in %s", work)
    tok_dir, shard_dir = work / "tokenizer", work / "shards"
    stage = time.perf_counter()
    files = corpus_files(opts.corpus, opts.max_files)
    report.corpus_files = len(files)
    _stage(report, "tokenizer", ensure_tokenizer(files, tok_dir, _vocab_size(opts)), stage)
    stage = time.perf_counter()
    done = _shards_complete(shard_dir)
    report.corpus_tokens = int(ensure_shards(files, tok_dir, shard_dir, opts.workers)["tokens"])
    _stage(report, "tokenize", not done, stage)
    stage = time.perf_counter()
    report.train, trained = ensure_trained(train_config(opts, tok_dir, shard_dir))
    _stage(report, "train", trained, stage)
    stage = time.perf_counter()
    report.completion, report.completion_ids = complete(
        trained_checkpoint(work), opts.prompt, opts.max_new_tokens)
    _stage(report, "generate", True, stage)
    return report


def _vocab_size(opts: DemoOptions) -> int:
    """The model's vocabulary size under the config and overrides (the tokenizer's target)."""
    from bamba.train.train_config import load_config

    return load_config(opts.config, list(opts.overrides)).model_config().vocab_size


def _shards_complete(out: Path) -> bool:
    from bamba.data import shards as shard_io

    path = out / shard_io.MANIFEST
    return path.exists() and bool(shard_io.read_json(path).get("complete"))


def _stage(report: DemoReport, name: str, ran: bool, began: float) -> None:
    report.seconds[name] = time.perf_counter() - began
    if not ran:
        report.skipped.append(name)
    log.info("%s: %s in %.1f s", name, "done" if ran else "already there", report.seconds[name])
