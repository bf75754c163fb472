"""Config errors are one line (exit 2), every key is documented in --help, overrides take
``--key value`` and a default the user never set does not contradict one they did."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from bamba.cli import main as cli_main
from bamba.config import BambaConfig, preset
from bamba.train.train_config import TrainConfig, load_config

from test_train_units import SMALL


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("bamba train: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("yaml_text, message", [
    ("model_overrides: {time_step_limit: []}\n", "time_step_limit must be a list of 2 float, got []"),
    ("model_overrides: {rms_norm_eps: x}\n", "rms_norm_eps must be float, got 'x'"),
    ("model_overrides: {rms_norm_eps: .inf}\n", "rms_norm_eps must be a finite number"),
    ("model_overrides: {attn_layer_indices: '1'}\n", "attn_layer_indices must be a list of int"),
    ("model_overrides: {num_hidden_layers: 2.5}\n", "num_hidden_layers must be int"),
    ("steps: [1\n", "not valid YAML"),
    ("steps: 3\n  lr: 1\n", "not valid YAML"),
])
def test_bad_config_files_exit_2_in_one_line(yaml_text: str, message: str, tmp_path: Path,
                                             capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    err = _one_line_error(capsys, cli_main(["train", str(path), f"--out_dir={tmp_path / 'run'}",
                                            "--progress=false"]))
    assert message in err


def test_out_dir_that_is_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    err = _one_line_error(capsys, cli_main(["train", str(_yaml(tmp_path)),
                                            f"--out_dir={tmp_path / 'file'}"]))
    assert "out_dir" in err and "is not a directory" in err


@pytest.mark.parametrize("field, value, message", [
    ("rope_parameters", "x", "rope_parameters must be a mapping, got 'x'"),
    ("rms_norm_eps", "x", "rms_norm_eps must be float, got 'x'"),
    ("time_step_limit", [], "time_step_limit must be a list of 2 float"),
    ("time_step_limit", "ab", "time_step_limit must be a list of 2 float"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 0}, "rope_theta must be > 0"),
    ("tie_word_embeddings", "no", "tie_word_embeddings must be bool"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
    ("mamba_n_heads", 0, "mamba_n_heads must be a positive integer, got 0"),
])
def test_bad_config_json_fields(field: str, value, message: str, tmp_path: Path) -> None:
    raw = {**preset("tiny", **SMALL).to_hf_dict(), field: value}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as info:
        BambaConfig.from_json_file(tmp_path / "config.json")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_json_round_trip_keeps_infinity() -> None:
    config = preset("tiny", **SMALL)
    again = BambaConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict())))
    assert again == config and math.isinf(again.time_step_limit[1])


def test_help_lists_every_key_with_its_default_and_meaning(capsys) -> None:
    for verb in ("train", "finetune"):
        with pytest.raises(SystemExit):
            cli_main([verb, "--help"])
        out = capsys.readouterr().out
        for f in dataclasses.fields(TrainConfig):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            shown = "null" if default is None else json.dumps(default)
            assert f"  {f.name} (" in out and f"default {shown})" in out, f.name
            assert f.metadata["help"].split()[0] in out, f.name


def test_overrides_take_a_space_as_well_as_an_equals_sign(tmp_path: Path) -> None:
    cfg = load_config(None, ["--steps", "10", "--lr=1e-3", "--model_overrides.vocab_size", "512",
                             "--min_lr", "-0"])
    assert (cfg.steps, cfg.lr, cfg.model_overrides, cfg.min_lr) == (10, 1e-3, {"vocab_size": 512}, 0)
    with pytest.raises(ValueError, match="override --steps needs a value"):
        load_config(None, ["--steps", "--lr=1"])


def test_a_default_warmup_adapts_to_a_short_run_but_an_explicit_one_does_not() -> None:
    assert load_config(None, ["--steps=5"]).warmup == 5
    assert load_config(None, ["--steps=5", "--decay_steps=3"]).warmup == 3
    assert load_config(None, []).warmup == 10  # the default run is unchanged
    assert load_config(None, ["--steps=50", "--warmup_steps=0"]).warmup == 0
    with pytest.raises(ValueError, match=r"decay_steps \(5\) must be >= warmup_steps \(10\)"):
        load_config(None, ["--steps=5", "--warmup_steps=10"])


def test_short_run_from_the_command_line(tmp_path: Path, capsys) -> None:
    code = cli_main(["train", str(_yaml(tmp_path)), "--steps", "2", "--export=false"])
    assert code == 0, capsys.readouterr().err
    assert "step 2: loss" in capsys.readouterr().out


def _yaml(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"model_overrides": SMALL, "seq_len": 32, "batch_size": 1,
                                "progress": False, "bf16": False,
                                "out_dir": str(tmp_path / "run")}))
    return path


@pytest.mark.parametrize("name", ["tiny-demo", "stdlib-demo"])
def test_shipped_configs_take_a_short_run(name: str) -> None:
    config = Path(__file__).parent.parent / "configs" / f"{name}.yaml"
    assert load_config(config, ["--steps", "5"]).warmup == 5
    assert load_config(config).warmup == 10
