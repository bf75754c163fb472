"""Pure parts of training: LR schedule, config validation, AdamW groups, loss, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from bamba.config import preset
from bamba.model import BambaLM, init_weights
from bamba.train.dcp_checkpoint import Checkpointer, complete_checkpoints, latest_checkpoint
from bamba.train.train_config import load_config
from bamba.train.data import SyntheticSource
from bamba.train.loss import lm_loss_sums
from bamba.train.metrics import flops_per_token, linear_params
from bamba.train.optim import build_optimizer, decays
from bamba.train.schedule import Schedule, lr_at
from bamba.train.trainer import clip_and_step

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, attn_layer_indices=[1],
             mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16,
             vocab_size=256, num_attention_heads=4, num_key_value_heads=2)


# ---- (f) LR schedule -------------------------------------------------------------------------
def test_schedule_bamba_recipe_key_steps() -> None:
    s = Schedule(peak=3e-4, warmup=2000, total=100_000, floor=1e-5)
    assert s(0) == pytest.approx(3e-4 / 2000**2)
    assert s(999) == pytest.approx(3e-4 * 0.25)  # quadratic: half-way in steps, a quarter in LR
    assert s(1999) == pytest.approx(3e-4)
    assert s(2000) == pytest.approx(3e-4)  # cosine starts at the peak
    assert s(51_000) == pytest.approx((3e-4 + 1e-5) / 2)  # cosine mid-point
    assert s(100_000) == pytest.approx(1e-5)
    assert s(10**7) == pytest.approx(1e-5)


def test_schedule_is_monotone_up_then_down() -> None:
    values = [lr_at(t, peak=1.0, warmup=10, total=50, floor=0.1) for t in range(60)]
    assert all(a < b for a, b in zip(values[:10], values[1:10]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert min(values[10:]) == pytest.approx(0.1) and values[0] == pytest.approx(0.01)
    assert values[30] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_schedule_without_warmup_and_bad_values() -> None:
    assert lr_at(0, peak=2.0, warmup=0, total=10, floor=0.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, peak=1.0, warmup=1, total=2, floor=0.0)
    with pytest.raises(ValueError, match="floor"):
        Schedule(peak=1e-4, warmup=1, total=2, floor=1e-3)
    with pytest.raises(ValueError, match="decay end"):
        Schedule(peak=1e-4, warmup=10, total=2, floor=0.0)


# ---- (g) config ------------------------------------------------------------------------------
def test_config_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nlr: 3e-4\nmodel_overrides: {vocab_size: 512}\nsteps: 20\n")
    cfg = load_config(path, ["--lr=1e-3", "--model_overrides.num_hidden_layers=4",
                             "--model_overrides.attn_layer_indices=[1]", "--bf16=false"])
    assert cfg.lr == 1e-3 and cfg.bf16 is False and cfg.steps == 20
    model_cfg = cfg.model_config()
    assert (model_cfg.vocab_size, model_cfg.num_hidden_layers) == (512, 4)
    assert load_config(path).lr == 3e-4  # YAML's "3e-4" (no dot) is read as a float


@pytest.mark.parametrize("override, message", [
    ("--lr=abc", "lr must be float, got 'abc'"),
    ("--lr=0", "lr must be > 0"),
    ("--steps=0", "steps must be > 0"),
    ("--batch_size=1.5", "batch_size must be int"),
    ("--bf16=3", "bf16 must be bool"),
    ("--min_lr=1", "min_lr must be in"),
    ("--beta2=1", "beta2 must be in"),
    ("--warmup_steps=1000", "decay_steps (100) must be >= warmup_steps (1000)"),
    ("--model=huge", "unknown model preset 'huge'"),
    ("--data=web", "data must be one of synthetic, shards, text, sft; got 'web'"),
    ("--data=shards", "data='shards' needs data_path"),
    ("--grad_clip=-1", "grad_clip must be >= 0"),
    ("--colour=red", "unknown config key 'colour'"),
    ("lr=1", "not of the form --key=value"),
])
def test_bad_config_values_give_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_model_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_overrides"):
        load_config(None, ["--model_overrides.colour=1"]).model_config()
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_cli_reports_bad_config_in_one_line(tmp_path: Path, capsys) -> None:
    from bamba.train.__main__ import main

    (tmp_path / "c.yaml").write_text("steps: -3\n")
    assert main([str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bamba train: error: steps must be > 0, got -3"


# ---- optimizer and loss ----------------------------------------------------------------------
def test_weight_decay_groups() -> None:
    model = BambaLM(preset("tiny", **SMALL))
    names = {n for n, p in model.named_parameters() if not decays(n, p)}
    assert "model.embed_tokens.weight" in names
    assert all(any(n.endswith(k) for n in names) for k in ("A_log", "D", "dt_bias", "conv1d.bias"))
    assert "model.layers.0.input_layernorm.weight" in names
    assert "model.layers.0.mamba.norm.weight" in names
    decayed = {n for n, p in model.named_parameters()} - names
    assert "lm_head.weight" in decayed and "model.layers.0.mamba.in_proj.weight" in decayed
    assert "model.layers.0.mamba.conv1d.weight" in decayed
    opt = build_optimizer(model, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95)
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_params


def test_loss_matches_torch_and_ignores_labels() -> None:
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3] = labels[1, 0] = -100
    sums = lm_loss_sums(logits, labels)
    mean = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert sums.tokens == 8
    torch.testing.assert_close(sums.total / sums.tokens, mean)
    z = lm_loss_sums(logits, labels, z_loss=1e-2)
    lse = torch.logsumexp(logits, -1)[labels != -100]
    torch.testing.assert_close(z.total, sums.total + 1e-2 * lse.square().sum())
    with pytest.raises(ValueError, match="disagree"):
        lm_loss_sums(logits, labels[:, :4])


def test_flops_per_token_counts_matmuls() -> None:
    cfg = preset("tiny", **SMALL)
    model = BambaLM(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith("proj.weight") or n == "lm_head.weight")
    assert linear_params(cfg) == matmul
    assert flops_per_token(cfg, 64) > 6 * matmul
    assert flops_per_token(cfg, 128) > flops_per_token(cfg, 64)  # attention grows with length


def test_synthetic_source_is_resumable_and_world_independent() -> None:
    one = SyntheticSource(vocab_size=64, seq_len=16, batch_size=4, seed=3)
    rows = torch.cat([next(one)["input_ids"] for _ in range(2)])  # global rows 0..7
    pair = [SyntheticSource(vocab_size=64, seq_len=16, batch_size=2, rank=r, world_size=2, seed=3)
            for r in range(2)]
    first = [next(s)["input_ids"] for s in pair]
    torch.testing.assert_close(torch.cat(first), rows[:4])
    resumed = SyntheticSource(vocab_size=64, seq_len=16, batch_size=4, seed=3)
    resumed.load_state_dict(pair[0].state_dict())
    torch.testing.assert_close(next(resumed)["input_ids"], rows[4:])
    batch = one.row(0)
    assert (batch["labels"] == -100).sum() == batch["seq_idx"].max() + 1  # one per document


# ---- (d) checkpoint atomicity (in process) ---------------------------------------------------
def _model_and_optimizer(seed: int) -> tuple[BambaLM, torch.optim.Optimizer]:
    model = init_weights(BambaLM(preset("tiny", **SMALL)), seed=seed)
    opt = build_optimizer(model, lr=1e-3)
    model(torch.randint(0, 256, (1, 8))).float().mean().backward()
    opt.step()
    return model, opt


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    model, opt = _model_and_optimizer(0)
    ckpt.save(1, model, opt, {"data": {"rows": 7}})
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*args, **kwargs):
        raise OSError("disk full")  # after DCP wrote the shards, before the rename

    monkeypatch.setattr(Checkpointer, "_write_train_state", boom)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError):
        ckpt.save(2, model, opt, {"data": {"rows": 9}})
    assert (tmp_path / "step_00000002.tmp").is_dir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    fresh, fresh_opt = _model_and_optimizer(1)
    state = ckpt.load(latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert state["step"] == 1 and state["ranks"] == [{"data": {"rows": 7}}]
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved[name]), name
    monkeypatch.undo()
    ckpt.save(3, model, opt, {"data": {"rows": 11}})
    assert not (tmp_path / "step_00000002.tmp").exists()  # the partial write was cleared


def test_keep_last_and_optimizer_roundtrip(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    model, opt = _model_and_optimizer(0)
    for step in (1, 2, 3):
        ckpt.save(step, model, opt, {})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 3]
    fresh, fresh_opt = _model_and_optimizer(5)
    ckpt.load(tmp_path / "step_00000003", fresh, fresh_opt)
    for (_, a), (_, b) in zip(sorted(opt.state_dict()["state"].items()),
                              sorted(fresh_opt.state_dict()["state"].items())):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        ckpt.load(tmp_path, fresh, fresh_opt)


# ---- the loop in process ---------------------------------------------------------------------
def _losses(tmp_path: Path, name: str, *overrides: str, **model) -> dict[int, float]:
    from bamba.train.trainer import train

    cfg = load_config(None, [f"--out_dir={tmp_path / name}", "--steps=3", "--warmup_steps=1",
                             "--seq_len=32", "--batch_size=2", "--progress=false", "--export=false",
                             "--bf16=false", *overrides])
    cfg.model_overrides = {**SMALL, **model}
    return train(cfg).losses


def test_activation_checkpointing_and_accumulation_keep_the_math(tmp_path: Path) -> None:
    plain = _losses(tmp_path, "plain")
    recomputed = _losses(tmp_path, "ac", "--activation_checkpointing=true")
    assert plain.keys() == recomputed.keys() == {1, 2, 3}
    for step in plain:
        assert abs(plain[step] - recomputed[step]) < 1e-6
    # 2 micro-batches of 1 row = 1 micro-batch of 2 rows (token-weighted mean over the step)
    accumulated = _losses(tmp_path, "accum", "--batch_size=1", "--grad_accum=2")
    for step in plain:
        assert abs(plain[step] - accumulated[step]) < 1e-5


@pytest.mark.parametrize("overrides, message", [
    (["--data=shards", "--data_path=/nonexistent/shards"], "no manifest.json in /nonexistent/shards"),
    (["--data=sft", "--data_path=BAD", "--tokenizer=TOK"], "BAD:2: not a JSON object"),
    (["--data=sft", "--data_path=LATIN1", "--tokenizer=TOK"],
     "LATIN1: not UTF-8 text (invalid continuation byte at byte 12)"),
    (["--data=sft", "--data_path=/nonexistent/chat.jsonl", "--tokenizer=TOK"],
     "/nonexistent/chat.jsonl: no such fine-tuning file"),
    (["--data=text", "--data_path=EMPTY", "--tokenizer=TOK"], "no .txt/.py/.jsonl/.parquet files"),
    (["--data=text", "--data_path=TEXT", "--tokenizer=TOK", "--data_options.weights=[-1]"],
     "weights must be finite and >= 0"),
    (["--data=text", "--data_path=TEXT", "--tokenizer=TOK", "--model_overrides.vocab_size=200"],
     "the data has token id"),  # 300-token tokenizer, 200-token model
    (["--data=text", "--data_path=TEXT", "--tokenizer=TOK", "--data_options.workers=2"],
     "unknown data_options key 'workers'"),
])
def test_bad_data_gives_one_line_errors(overrides, message, tmp_path: Path, capsys) -> None:
    from bamba.data.bpe import train_bpe
    from bamba.train.__main__ import main

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "\xe9", "completion": "b"}\n'
                                            .encode("latin-1"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("some text to train on\n" * 20)
    if any("TOK" in o for o in overrides):
        train_bpe([tmp_path / "text" / "a.txt"], 300, tmp_path / "tok")
    paths = {"BAD": tmp_path / "bad.jsonl", "LATIN1": tmp_path / "latin1.jsonl", "EMPTY": tmp_path / "empty", "TEXT": tmp_path / "text",
             "TOK": tmp_path / "tok"}
    args = [f"--out_dir={tmp_path / 'run'}", "--steps=1", "--warmup_steps=0", "--progress=false"]
    for item in overrides:  # dotted model overrides apply on top of the YAML's SMALL
        key, value = item.split("=", 1)
        args.append(f"{key}={paths.get(value, value)}")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model_overrides": SMALL}))
    assert main([str(tmp_path / "c.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bamba train: error: ") and "\n" not in err
    assert message.replace("BAD", str(paths["BAD"])).replace("LATIN1", str(paths["LATIN1"])) in err


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    _losses(tmp_path, "run")
    with pytest.raises(ValueError, match="holds a different model"):
        _losses(tmp_path, "run", "--steps=4", vocab_size=128)


def _clipped_step(fused: bool, max_norm: float,
                  grad: float = 2.0) -> tuple[float, torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused)
    layer.weight.grad = torch.full((4, 3), grad)
    layer.bias.grad = torch.zeros(4)
    return clip_and_step(layer, opt, max_norm, distributed=False), layer, opt


@pytest.mark.parametrize("fused", [False, True])
def test_clip_returns_the_norm_before_clipping_and_leaves_grads_clipped(fused: bool) -> None:
    norm, layer, opt = _clipped_step(fused, max_norm=1.0)
    assert not hasattr(opt, "grad_scale")  # the divisor does not outlive the step
    assert norm == pytest.approx(2.0 * math.sqrt(12))
    assert float(torch.linalg.vector_norm(layer.weight.grad)) == pytest.approx(1.0, rel=1e-5)
    norm, layer, _ = _clipped_step(fused, max_norm=0.0)  # 0: measure only
    assert norm == pytest.approx(2.0 * math.sqrt(12))
    assert float(torch.linalg.vector_norm(layer.weight.grad)) == pytest.approx(norm, rel=1e-5)


@pytest.mark.parametrize("max_norm", [0.0, 1.0, 100.0])
def test_clip_folded_into_the_fused_step_equals_clipping_first(max_norm: float) -> None:
    """The fused AdamW's grad_scale divisor gives the step of clip_grad_norm_ + step."""
    _, folded, _ = _clipped_step(True, max_norm, grad=0.7)
    _, plain, _ = _clipped_step(False, max_norm, grad=0.7)
    for a, b in zip(folded.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["tiny-demo", "stdlib-demo", "tiny-finetune"])
def test_example_configs_validate(name: str) -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert cfg.steps > cfg.warmup
    if not cfg.init_from:
        assert cfg.model_config().vocab_size > 0
