"""``compile: true``: the compiled training step gives the eager step's losses (slow: inductor
compiles for a minute or more on this CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bamba.train.train_config import load_config
from bamba.train.trainer import train

SMALL = ("--model_overrides.hidden_size=64", "--model_overrides.intermediate_size=128",
         "--model_overrides.num_hidden_layers=2", "--model_overrides.attn_layer_indices=[1]",
         "--model_overrides.mamba_n_heads=2", "--model_overrides.mamba_d_state=16",
         "--model_overrides.mamba_chunk_size=16", "--model_overrides.vocab_size=256",
         "--seq_len=32", "--batch_size=2", "--steps=3", "--warmup_steps=1", "--progress=false",
         "--export=false", "--ckpt_every=0", "--bf16=false")


def test_compile_flag_validates() -> None:
    assert load_config(None, ["--compile=true"]).compile is True
    with pytest.raises(ValueError, match="compile"):
        load_config(None, ["--compile=3"])


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    eager = train(load_config(None, [*SMALL, f"--out_dir={tmp_path / 'eager'}"]))
    compiled = train(load_config(None, [*SMALL, "--compile=true", f"--out_dir={tmp_path / 'c'}"]))
    assert sorted(compiled.losses) == [1, 2, 3]
    for step, loss in eager.losses.items():
        assert compiled.losses[step] == pytest.approx(loss, rel=1e-4)
