"""``bamba demo``: the pipeline on a few stdlib files and a few steps, its checkpoint read back by
transformers with the same greedy continuation, reruns that skip finished stages, and the
embedded default switching to the demo's checkpoint. The full demo is marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bamba import demo
from bamba.cli import main

QUICK = ("--steps=3", "--seq_len=64", "--batch_size=2", "--warmup_steps=1", "--ckpt_every=0",
         "--progress=false", "--threads=2")
PROMPT = "import os\n"


def quick_options(root: Path, **changes) -> demo.DemoOptions:
    base = dict(root=root, config=demo.default_config_path(), overrides=QUICK, max_files=6,
                workers=1, prompt=PROMPT, max_new_tokens=20)
    return demo.DemoOptions(**{**base, **changes})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, demo.DemoReport]:
    root = tmp_path_factory.mktemp("demo")
    return root, demo.run_demo(quick_options(root))


def test_quick_demo_writes_every_stage(quick_run) -> None:
    root, report = quick_run
    work = quick_options(root).work_dir()
    assert work == root / "first-6-files"  # not the default corpus: a directory of its own
    assert report.corpus_files == 6 and report.corpus_tokens > 0
    assert report.skipped == []
    assert (work / "tokenizer" / "tokenizer.json").exists()
    assert json.loads((work / "shards" / "manifest.json").read_text())["complete"]
    hf = demo.trained_checkpoint(work)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf.iterdir()}
    assert report.train["steps"] == 3 and report.train["seq_len"] == 64
    assert report.train["final_loss"] > 0 and report.train["median_tokens_per_s"] > 0
    assert len(report.completion_ids) == 20 or report.completion_ids[-1] == 0  # 0: eos


def test_transformers_gives_the_same_greedy_continuation(quick_run) -> None:
    from transformers import AutoTokenizer, BambaForCausalLM

    root, report = quick_run
    hf_dir = demo.trained_checkpoint(quick_options(root).work_dir())
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = BambaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    ours = demo.complete(hf_dir, PROMPT, 20)[1]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=len(ours), do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ours
    text = demo.complete(hf_dir, PROMPT, 20)[0]
    assert tokenizer.decode(ours, skip_special_tokens=True) == text


def test_rerun_skips_finished_stages(quick_run) -> None:
    root, report = quick_run
    again = demo.run_demo(quick_options(root))
    assert again.skipped == ["tokenizer", "tokenize", "train"]
    assert again.completion_ids == report.completion_ids
    assert again.train == report.train


def test_more_steps_resume_the_run(quick_run, tmp_path: Path) -> None:
    import shutil

    root, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    more = demo.run_demo(quick_options(copy, overrides=(*QUICK, "--steps=4")))
    assert "train" not in more.skipped and more.train["steps"] == 4
    metrics = quick_options(copy).work_dir() / "train" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 4 continued the checkpoint of step 3


def test_embedded_default_uses_the_demo_checkpoint(quick_run, monkeypatch, caplog) -> None:
    from bamba.default_model import load_default

    root, report = quick_run
    monkeypatch.setenv(demo.DEMO_DIR_ENV, str(quick_options(root).work_dir()))
    with caplog.at_level("WARNING", logger="bamba.default_model"):
        model, tokenizer = load_default()
    assert "UNTRAINED" not in caplog.text
    assert model.config.vocab_size == 4096 and tokenizer.encode(PROMPT)
    monkeypatch.setenv(demo.DEMO_DIR_ENV, str(root / "nothing-here"))
    with caplog.at_level("WARNING", logger="bamba.default_model"):
        model, _ = load_default()
    assert "UNTRAINED" in caplog.text and model.config.vocab_size == 257


def test_cli_prints_completion_loss_and_time(quick_run, capsys) -> None:
    root, report = quick_run
    code = main(["demo", "--dir", str(root), "--max-files", "6", "--prompt", PROMPT,
                 "--max-new-tokens", "20", "--workers", "1",
                 *(f"--set={item[2:]}" for item in QUICK)])
    out = capsys.readouterr().out
    assert code == 0
    assert "loss" in out and "time:" in out and "(kept)" in out
    assert PROMPT + report.completion in out


def test_bad_options_are_one_line_errors(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--dir", str(tmp_path), "--config", str(tmp_path / "no.yaml")]) == 2
    assert "no such config" in capsys.readouterr().err
    assert main(["demo", "--dir", str(tmp_path), "--max-files", "0"]) == 2
    assert "max_files" in capsys.readouterr().err


def test_other_corpus_options_after_a_run_use_their_own_dir(quick_run) -> None:
    """The README's `--max-files 50` example after a default run: before, the shards of the
    earlier run made it fail ("holds a different tokenization")."""
    root, report = quick_run
    other = demo.run_demo(quick_options(root, max_files=5))
    assert other.corpus_files == 5 and other.skipped == []
    assert (root / "first-5-files" / "train" / "hf" / "tokenizer.json").exists()
    again = demo.run_demo(quick_options(root))  # the first run's outputs are untouched
    assert again.skipped == ["tokenizer", "tokenize", "train"]


def test_vocabulary_size_changes_the_work_dir(tmp_path: Path) -> None:
    default = quick_options(tmp_path, max_files=None)
    assert default.work_dir() == tmp_path
    bigger = quick_options(tmp_path, max_files=None,
                           overrides=(*QUICK, "--model_overrides.vocab_size=512"))
    assert bigger.work_dir() == tmp_path / "vocab-512"


def test_a_clashing_tokenization_names_no_missing_option(quick_run) -> None:
    """The error once told demo users to "choose another --out", an option the demo lacks."""
    root, _ = quick_run
    work = quick_options(root).work_dir()
    files = demo.corpus_files(max_files=3)
    with pytest.raises(ValueError, match="different tokenization") as err:
        demo.ensure_shards(files, work / "tokenizer", work / "shards", workers=1)
    assert "--out" not in str(err.value)


def test_config_is_package_data() -> None:
    import bamba

    path = demo.default_config_path()
    assert path.is_file() and path.parent == Path(bamba.__file__).parent / "configs"
    with pytest.raises(FileNotFoundError, match="not among"):
        demo.packaged_config("nothing.yaml")


def test_loss_png_or_one_line_naming_the_extra(quick_run, tmp_path: Path, monkeypatch,
                                               caplog) -> None:
    import sys

    from bamba.train.metrics import plot_loss

    metrics = quick_options(quick_run[0]).work_dir() / "train" / "metrics.jsonl"
    pytest.importorskip("matplotlib")
    assert plot_loss(metrics, tmp_path / "loss.png") and (tmp_path / "loss.png").stat().st_size
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with caplog.at_level("WARNING", logger="bamba.train.metrics"):
        assert plot_loss(metrics, tmp_path / "none.png") is None
    assert len(caplog.records) == 1 and "bamba[demo]" in caplog.text
    assert not (tmp_path / "none.png").exists()


@pytest.mark.slow
def test_full_demo(tmp_path: Path) -> None:
    """The real thing (minutes): the whole stdlib and the config's steps."""
    report = demo.run_demo(demo.DemoOptions(root=tmp_path, config=demo.default_config_path()))
    # From ln(4096) = 8.3 at the start to 5.33 after the config's steps
    # (benchmarks/results/demo.json); 6 leaves room for another CPU's rounding.
    assert report.train["final_loss"] < 6.0
    assert report.completion.strip()
