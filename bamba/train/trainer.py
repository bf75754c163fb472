"""The pretraining loop: one process or torchrun + FSDP2, exact resume, HF export.

One optimizer step = ``grad_accum`` micro-batches per rank. The loss of a step is the mean over
every counted token of the step (all micro-batches, all ranks): each micro-batch contributes its
summed loss divided by the step's global token count, so the gradient does not depend on how
tokens fall into micro-batches or ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bamba.model import BambaLM, init_weights
from bamba.native import accelerate
from bamba.train import parallel
from bamba.budget import check_memory, local_process_count
from bamba.train.dcp_checkpoint import Checkpointer, latest_checkpoint, rng_state, set_rng_state
from bamba.train.train_config import TrainConfig
from bamba.train.data import Batch, BatchSource, SyntheticSource, build_loader_source
from bamba.train.loss import compiled_loss_terms, lm_loss_sums, loss_terms
from bamba.train.memory import retain_freed_memory
from bamba.train.metrics import (MetricsLog, flops_per_token, mfu, plot_loss, progress_bar,
                                 quiet_logging)
from bamba.train.optim import build_optimizer, set_lr
from bamba.train.schedule import Schedule

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out_dir: Path
    start_step: int  # 0, or the step a checkpoint was resumed from
    final_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, this process's steps
    tokens_per_s: float = 0.0  # mean over this process's steps
    export_dir: Path | None = None
    stopped: bool = False  # ended early by SIGTERM (checkpointed; run again to continue)


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    tokens: int  # counted (non-ignored) tokens of the step, all ranks


def build_source(cfg: TrainConfig, vocab_size: int, info: parallel.DistInfo) -> BatchSource:
    if cfg.data == "synthetic":
        return SyntheticSource(vocab_size=vocab_size, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                               rank=info.rank, world_size=info.world_size, seed=cfg.seed)
    if cfg.data == "sft":
        from bamba.checkpoint import load_tokenizer
        from bamba.train.sft import SFTSource, load_examples

        tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return SFTSource(load_examples(cfg.data_path, tokenizer), seq_len=cfg.seq_len,
                         batch_size=cfg.batch_size, pad_id=pad, rank=info.rank,
                         world_size=info.world_size, seed=cfg.seed)
    if cfg.data in ("shards", "text"):
        paths = [p.strip() for p in (cfg.data_path or "").split(",") if p.strip()]
        return build_loader_source(cfg.data, paths, cfg.data_options, seq_len=cfg.seq_len,
                                   batch_size=cfg.batch_size, seed=cfg.seed, rank=info.rank,
                                   world_size=info.world_size, tokenizer=cfg.tokenizer)
    raise ValueError(f"unknown data kind {cfg.data!r}")


def build_model(cfg: TrainConfig, info: parallel.DistInfo) -> BambaLM:
    """Seeded init (the same on every rank) or ``init_from``'s weights, then activation
    checkpointing and FSDP2 if distributed."""
    if cfg.init_from:
        from bamba.checkpoint import from_pretrained

        model = dense_for_training(from_pretrained(cfg.init_from, dtype=torch.float32,
                                                   device=info.device))
        model.train()
    else:
        model = init_weights(BambaLM(cfg.model_config()), seed=cfg.seed).to(info.device)
    accelerate(model)  # the native training conv, before wrappers replace the layers
    if cfg.activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    if cfg.compile:
        compile_layers(model)
    if info.distributed:
        parallel.shard_model(model)
    return model


def dense_for_training(model: BambaLM) -> BambaLM:
    """``model`` with any quantized weights (a compressed-tensors checkpoint, a GGUF file)
    dequantized to float32 trainable parameters, as transformers loads a GGUF file to train:
    the fine-tune starts from the weights they stand for and exports a dense model."""
    from bamba.quant.apply import dequantize_model
    from bamba.quant.weights import QuantizedWeights

    if not any(isinstance(m, QuantizedWeights) for m in model.modules()):
        return model
    log.info("init_from holds quantized weights: dequantized to float32 for training")
    dequantize_model(model, torch.float32)
    for parameter in model.parameters():
        parameter.requires_grad_(parameter.is_floating_point())
    return model


def compile_layers(model: BambaLM) -> None:
    """Regional compilation: each decoder layer compiled in place (``nn.Module.compile``).

    Layers of one kind share their compiled graphs (parameters are graph inputs), so inductor
    compiles one Mamba and one attention layer, forward and backward, whatever the depth: a
    fraction of whole-model compile time, for the same step time. In place, so state_dict keys,
    activation checkpointing, FSDP2 units and checkpoints see the same modules. On a CPU the
    graphs' kernel launches go through a C++ wrapper instead of Python (``cpp_wrapper``), which
    saves the launches' Python overhead (GPU graphs keep inductor's default).
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    for layer in model.model.layers:
        layer.compile(options={"cpp_wrapper": True} if on_cpu else None)


def restore_source(source: BatchSource, train_state: dict[str, Any], info: parallel.DistInfo) -> None:
    """Give the loader every saved rank's state: it takes its own when the layout (ranks,
    workers) is unchanged, and re-splits what is left otherwise. RNG state is per rank, so it
    is restored only at the same world size (new ranks keep their seeded streams)."""
    source.load_state_dict([r["data"] for r in train_state["ranks"]])
    if train_state["world_size"] == info.world_size:
        set_rng_state(train_state["ranks"][info.rank]["rng"])


def check_batch(batch: Batch, vocab_size: int, seq_len: int) -> None:
    """Catch a tokenizer/model mismatch with a clear message (not an index error deep inside)."""
    ids = batch["input_ids"]
    if ids.shape[-1] != seq_len:
        raise ValueError(f"the data gives rows of {ids.shape[-1]} tokens, seq_len is {seq_len}")
    top, bottom = int(ids.max()), int(ids.min())
    if top >= vocab_size:
        raise ValueError(f"the data has token id {top} but the model's vocab_size is {vocab_size}: "
                         "tokenizer and model disagree")
    if bottom < 0:
        raise ValueError(f"the data has token id {bottom}: token ids are not negative")


def _autocast(cfg: TrainConfig, device: torch.device):
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch],
               cfg: TrainConfig, info: parallel.DistInfo) -> StepStats:
    """Forward/backward over the micro-batches, clip, update."""
    local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    (global_tokens,) = parallel.all_reduce_sum([local_tokens], info.device)
    scale = info.world_size / max(global_tokens, 1.0)  # FSDP averages gradients over ranks
    ce_sum = 0.0
    terms = compiled_loss_terms() if cfg.compile else loss_terms
    for i, batch in enumerate(batches):
        if info.distributed:  # reduce-scatter once per step, after the last micro-batch
            model.set_requires_gradient_sync(i == len(batches) - 1)
        batch = {k: v.to(info.device) for k, v in batch.items()}
        with _autocast(cfg, info.device):
            logits = model(batch["input_ids"], seq_idx=batch["seq_idx"],
                           positions=batch.get("position_ids"))
        sums = lm_loss_sums(logits, batch["labels"], cfg.z_loss, terms)
        (sums.total * scale).backward()
        ce_sum += float(sums.ce)
    grad_norm = clip_and_step(model, optimizer, cfg.grad_clip, info.distributed)
    optimizer.zero_grad(set_to_none=True)
    (ce_total,) = parallel.all_reduce_sum([ce_sum], info.device)
    return StepStats(loss=ce_total / max(global_tokens, 1.0), grad_norm=grad_norm,
                     tokens=int(global_tokens))


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
                  distributed: bool) -> float:
    """Clip the gradients to a global norm of ``max_norm`` (0: no clipping), step the
    optimizer, and return the norm before clipping (all shards).

    In one process with the fused AdamW the clip factor is not applied in a pass of its own:
    it goes to the step as the grads' divisor (``grad_scale``, the hook torch's fused optimizers
    give mixed-precision scalers), so the grads are read once less. The divisor is
    1 / clip factor, the factor ``clip_grad_norm_`` uses (both leave the grads clipped).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_norm if max_norm > 0 else float("inf")
    if distributed or not optimizer.defaults.get("fused"):
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        optimizer.step()
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    factor = torch.clamp(limit / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s factor
    optimizer.grad_scale = (1.0 / factor).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return float(norm)


def check_finite(stats: StepStats, step: int, checkpoints: Path) -> None:
    """ValueError (before anything is saved) when a step's loss or gradient norm is NaN/inf:
    the weights are no longer worth keeping; the last checkpoint is the last good state."""
    if math.isfinite(stats.loss) and math.isfinite(stats.grad_norm):
        return
    last = latest_checkpoint(checkpoints)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
    raise ValueError(f"step {step}: loss {stats.loss}, gradient norm {stats.grad_norm}; "
                     f"stopped without saving this state ({kept}; lower lr or raise warmup_steps)")


class StopSignal:
    """Preemption: SIGTERM asks the run to finish its step, checkpoint and return (instead of
    dying mid-step). Installed only in the main thread, restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: stopping after this step with a checkpoint")
        self.requested = True

    def agreed(self, info: parallel.DistInfo) -> bool:
        """True on every rank if any rank was asked to stop (ranks must stop at the same step)."""
        if not info.distributed:
            return self.requested
        (votes,) = parallel.all_reduce_sum([float(self.requested)], info.device)
        return votes > 0


class Trainer:
    """Holds the pieces of a run; ``run()`` trains to ``cfg.steps`` and exports."""

    def __init__(self, cfg: TrainConfig, info: parallel.DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.out_dir = Path(cfg.out_dir)
        check_memory(cfg.model_config(), cfg.batch_size, cfg.seq_len, info.world_size,
                     local_process_count(info.world_size))
        self.model = build_model(cfg, info)
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         betas=(cfg.beta1, cfg.beta2))
        self.schedule = Schedule(peak=cfg.lr, warmup=cfg.warmup, total=cfg.decay_end,
                                 floor=cfg.min_lr)
        self.source = build_source(cfg, self.model.config.vocab_size, info)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", cfg.keep_last)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.flops_token = flops_per_token(self.model.config, cfg.seq_len)
        self.step = 0

    def resume(self) -> None:
        state = None
        if self.cfg.resume:
            state = self.checkpointer.load_latest(self.model, self.optimizer, self._same_model)
        if state is None:
            torch.manual_seed(self.cfg.seed + self.info.rank)
            return
        restore_source(self.source, state, self.info)
        self.step = int(state["step"])

    def _same_model(self, path: Path, train_state: dict[str, Any]) -> None:
        saved = train_state["meta"].get("model_config")
        if saved is not None and saved != self.model.config.to_hf_dict():
            raise ValueError(f"{path} holds a different model than this config; use another "
                             "out_dir or --resume=false")

    @property
    def tokens_per_step(self) -> int:
        """Positions per optimizer step over all ranks (what tokens/s counts)."""
        cfg = self.cfg
        return cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.info.world_size

    def save(self) -> None:
        local = {"data": self.source.state_dict(), "rng": rng_state()}
        meta = {"config": self.cfg.to_dict(), "model_config": self.model.config.to_hf_dict()}
        self.checkpointer.save(self.step, self.model, self.optimizer, local, meta)

    def run(self) -> TrainResult:
        self.resume()
        result = TrainResult(out_dir=self.out_dir, start_step=self.step, final_step=self.step)
        cfg = self.cfg
        show = cfg.progress and self.info.is_main
        bar = progress_bar(cfg.steps, self.step, show)
        with StopSignal() as stop, quiet_logging(show):
            busy = self._loop(result, bar, stop)
        bar.close()
        result.final_step = self.step
        steps_run = self.step - result.start_step
        result.tokens_per_s = self.tokens_per_step * steps_run / busy if busy else 0.0
        if cfg.export and not result.stopped:
            result.export_dir = self.export()
        return result

    def _loop(self, result: TrainResult, bar: Any, stop: StopSignal) -> float:
        """Train until ``cfg.steps`` or an agreed stop; returns the seconds spent in steps."""
        cfg = self.cfg
        busy = 0.0
        while self.step < cfg.steps:
            began = time.perf_counter()
            lr = self.schedule(self.step)
            set_lr(self.optimizer, lr)
            batches = [next(self.source) for _ in range(cfg.grad_accum)]
            for batch in batches:
                check_batch(batch, self.model.config.vocab_size, cfg.seq_len)
            stats = train_step(self.model, self.optimizer, batches, cfg, self.info)
            elapsed = time.perf_counter() - began
            busy += elapsed
            self.step += 1
            result.losses[self.step] = stats.loss
            self._log(stats, lr, self.tokens_per_step / elapsed, bar)
            check_finite(stats, self.step, self.checkpointer.root)
            result.stopped = stop.agreed(self.info)
            due = cfg.ckpt_every and self.step % cfg.ckpt_every == 0
            if self.step == cfg.steps or due or result.stopped:
                self.save()
            if result.stopped:
                log.info("stopped at step %d; run again to continue", self.step)
                break
        return busy

    def _log(self, stats: StepStats, lr: float, tokens_per_s: float, bar: Any) -> None:
        """One JSONL record (rank 0; ``tokens_per_s`` counts every position, ``loss_tokens``
        the positions with a label) and the progress bar's loss / tokens/s / MFU."""
        util = mfu(tokens_per_s, self.flops_token, self.cfg.peak_tflops)
        if self.info.is_main and self.step % self.cfg.log_every == 0:
            self.metrics.write({"step": self.step, "loss": stats.loss, "lr": lr,
                                "grad_norm": stats.grad_norm, "loss_tokens": stats.tokens,
                                "tokens_per_s": tokens_per_s, "mfu": util,
                                "world_size": self.info.world_size})
        bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{tokens_per_s:.0f}", mfu=f"{util:.1%}",
                        refresh=False)
        bar.update(1)

    def export(self) -> Path | None:
        """Gather the full weights to rank 0 and write the HF layout to ``out_dir/hf``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        target = None
        if self.info.is_main:
            from bamba.checkpoint import load_tokenizer, save_pretrained

            plain = BambaLM(self.model.config)
            plain.load_state_dict(full)
            source = self.cfg.tokenizer or self.cfg.init_from
            tokenizer = load_tokenizer(source) if source else None
            target = save_pretrained(plain, self.out_dir / "hf", tokenizer=tokenizer)
            plot_loss(self.metrics.path, self.out_dir / "loss.png")
        parallel.barrier()
        return target


def train(cfg: TrainConfig) -> TrainResult:
    """Run ``cfg`` in this process (joining the torchrun group if there is one)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.retain_memory:
        retain_freed_memory()
    info = parallel.init_distributed()
    clean = False
    try:
        result = Trainer(cfg, info).run()
        clean = True
        return result
    finally:
        parallel.teardown(clean)
