"""The trainer on the real loader (bamba.data): shards made by `bamba tokenize`'s functions,
a 2-rank loader state restored at 1 rank through the trainer's own restore path (every document
of the epoch seen exactly once, counted), and a torchrun x2 run resumed in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("pyarrow")

from bamba.data.bpe import train_bpe  # noqa: E402
from bamba.data.documents import ShardDocuments  # noqa: E402
from bamba.data.stream import doc_key  # noqa: E402
from bamba.data.tokenize import TokenizeOptions, tokenize_corpus  # noqa: E402
from bamba.train.dcp_checkpoint import TRAIN_STATE, complete_checkpoints  # noqa: E402
from bamba.train.train_config import TrainConfig  # noqa: E402
from bamba.train.metrics import read_metrics  # noqa: E402
from bamba.train.parallel import DistInfo  # noqa: E402
from bamba.train.trainer import build_source, restore_source  # noqa: E402

SEQ, ROWS = 32, 2
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, attn_layer_indices=[1],
             mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16,
             vocab_size=320, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    """(shard directory, tokenizer directory) of 40 small JSONL documents."""
    root = tmp_path_factory.mktemp("corpus")
    words = ["state", "space", "model", "attention", "layer", "token", "mamba", "hybrid"]
    lines = [{"text": f"document {i}: " + " ".join(words[(i + j) % 8] for j in range(3 + i % 17))}
             for i in range(40)]
    (root / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    train_bpe([root / "docs.jsonl"], 300, root / "tok")
    tokenize_corpus([root / "docs.jsonl"], TokenizeOptions(tokenizer_dir=root / "tok",
                                                          out=root / "shards", docs_per_shard=8))
    return root / "shards", root / "tok"


def config(shard_dir: Path, out: Path, **changes):
    raw = dict(model="tiny", model_overrides=MODEL, data="shards", data_path=str(shard_dir),
               data_options={"shuffle_buffer": 4, "mask_boundary": False}, seq_len=SEQ,
               batch_size=ROWS, steps=6, warmup_steps=1, ckpt_every=2, progress=False,
               export=False, threads=1, out_dir=str(out), **changes)
    return raw


def test_two_rank_state_restored_at_one_rank_sees_each_document_once(shards, tmp_path) -> None:
    cfg = TrainConfig(**config(shards[0], tmp_path))
    old = [build_source(cfg, 320, DistInfo(r, 2, 0, torch.device("cpu"))) for r in range(2)]
    rows = [next(src) for src in old for _ in range(3)]
    saved = {"world_size": 2, "ranks": [{"data": src.state_dict(), "rng": None} for src in old]}
    new = build_source(cfg, 320, DistInfo(0, 1, 0, torch.device("cpu")))
    restore_source(new, saved, DistInfo(0, 1, 0, torch.device("cpu")))
    docs = ShardDocuments(shards[0])
    total = sum(len(docs.tokens(i)) for i in range(len(docs)))
    rows += [next(new) for _ in range(total // (ROWS * (SEQ + 1)) + 4)]
    seen: dict[int, list[int]] = defaultdict(list)
    for batch in rows:
        full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
        for tokens, keys in zip(full.tolist(), batch["doc_keys"].tolist()):
            for t, k in zip(tokens, keys):
                if (k >> 40) & 0xFFFF == 0:  # epoch 0
                    seen[k].append(t)
    for i in range(len(docs)):
        assert seen.pop(doc_key(0, 0, i)) == docs.tokens(i).tolist(), f"document {i}"
    assert not seen  # nothing outside the epoch's documents


def test_torchrun_two_processes_on_shards_resumed_in_one(shards, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(shards[0], tmp_path / "run")))
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "bamba.train", str(path), "--steps=4", "--decay_steps=6", "--export=true"]
    done = subprocess.run(two, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_export_matches_checkpoint(tmp_path / "run", step=4)
    one = [sys.executable, "-m", "bamba.train", str(path), f"--batch_size={2 * ROWS}"]
    done = subprocess.run(one, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    assert [metrics[s]["world_size"] for s in (4, 5)] == [2, 1]
    final = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1][1]
    state = torch.load(final / TRAIN_STATE, weights_only=True)
    data = state["ranks"][0]["data"]
    assert state["world_size"] == 1 and data["layout"]["generation"] == 1  # rescaled once
    rows = 4 * 2 * ROWS + 2 * 2 * ROWS  # every row delivered, before and after the rescale
    assert sum(data["tokens_seen"].values()) == rows * (SEQ + 1)


def _assert_export_matches_checkpoint(run: Path, step: int) -> None:
    """The HF export gathered from the FSDP shards equals the DCP checkpoint of that step."""
    from bamba.checkpoint import from_pretrained
    from bamba.train.dcp_checkpoint import Checkpointer
    from bamba.train.optim import build_optimizer

    exported = from_pretrained(run / "hf")
    fresh = from_pretrained(run / "hf")
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    Checkpointer(run / "checkpoints").load(run / "checkpoints" / f"step_{step:08d}", fresh,
                                           build_optimizer(fresh, lr=1e-3))
    for name, value in exported.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def test_resume_on_shards_in_new_process_is_exact(shards, tmp_path) -> None:
    """Exact resume through the real loader (shuffle buffer, 1 DataLoader worker)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    got = {}
    for name, stops in (("straight", [6]), ("resumed", [4, 6])):
        path = tmp_path / f"{name}.yaml"
        raw = config(shards[0], tmp_path / name)
        raw["data_options"] = {**raw["data_options"], "num_workers": 1}
        path.write_text(yaml.safe_dump(raw))
        for steps in stops:
            cmd = [sys.executable, "-m", "bamba.train", str(path), f"--steps={steps}",
                   "--decay_steps=6"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr[-3000:]
        got[name] = {s: r["loss"] for s, r in read_metrics(tmp_path / name / "metrics.jsonl").items()}
    assert sorted(got["straight"]) == [1, 2, 3, 4, 5, 6]
    assert got["resumed"] == got["straight"]
