"""Fine-tuning: loss masks from the chat template, packing, and pretrain -> export -> finetune."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bamba.train.sft import DEFAULT_CHAT_TEMPLATE, SFTSource, encode_example, pack_rows

tokenizers = pytest.importorskip("tokenizers")

MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, attn_layer_indices=[1],
             mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16,
             vocab_size=320, num_attention_heads=4, num_key_value_heads=2)
CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Add 2 and 3."},
                     {"role": "assistant", "content": "5"},
                     {"role": "user", "content": "Double it."},
                     {"role": "assistant", "content": "10"}]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from bamba.data.bpe import train_bpe

    root = tmp_path_factory.mktemp("tok")
    text = " ".join(f"user assistant system add double {i} brief it and" for i in range(50))
    (root / "corpus.txt").write_text(text)
    train_bpe([root / "corpus.txt"], 300, root / "tok")
    return root / "tok"


@pytest.fixture
def tokenizer(tokenizer_dir):
    from bamba.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def test_chat_mask_covers_exactly_the_assistant_turns(tokenizer) -> None:
    assert tokenizer.chat_template is None  # the default template is used, then put back
    ids, train = encode_example(CHAT, tokenizer)
    assert tokenizer.chat_template is None
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    whole = tokenizer.apply_chat_template(CHAT["messages"], add_generation_prompt=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == whole
    trained = [i for i, t in zip(ids, train) if t]
    eos = tokenizer.eos_token_id
    assert trained.count(eos) == 2  # each assistant turn ends with EOS, and it is trained on
    text = tokenizer.decode(trained, skip_special_tokens=True)
    assert text == "510"  # the assistant contents, nothing of the prompts


def test_prompt_completion_and_bad_records(tokenizer) -> None:
    ids, train = encode_example({"prompt": "add 2", "completion": " it"}, tokenizer)
    assert tokenizer.decode([i for i, t in zip(ids, train) if t], skip_special_tokens=False) \
        == " it" + tokenizer.special["eos_token"]
    assert not any(train[:len(tokenizer.encode("add 2", add_special_tokens=False))])
    with pytest.raises(ValueError, match="no assistant"):
        encode_example({"messages": [{"role": "user", "content": "hi"}]}, tokenizer)
    with pytest.raises(ValueError, match="needs 'messages'"):
        encode_example({"text": "x"}, tokenizer)


def test_packing_keeps_examples_whole_and_masks_padding() -> None:
    examples = [([1, 2, 3, 4], [False, False, True, True]), ([5, 6, 7], [False, True, True]),
                ([8] * 20, [True] * 20)]
    rows = pack_rows(examples, [0, 1, 2], seq_len=6, pad_id=0)
    assert rows[0]["input_ids"].tolist() == [1, 2, 3, 5, 6, 0]
    assert rows[0]["labels"].tolist() == [-100, 3, 4, 6, 7, -100]
    assert rows[0]["seq_idx"].tolist() == [0, 0, 0, 1, 1, 2]
    assert rows[1]["input_ids"].tolist() == [8] * 6  # truncated to one row
    source = SFTSource(examples, seq_len=6, batch_size=1, pad_id=0, seed=1)
    stream = [next(source)["input_ids"] for _ in range(6)]  # crosses into epochs 1 and 2
    again = SFTSource(examples, seq_len=6, batch_size=1, pad_id=0, seed=1)
    again.load_state_dict({"rows": 3, "seed": 1, "examples": 3})
    assert all(torch.equal(next(again)["input_ids"], row) for row in stream[3:])


def test_pretrain_export_then_finetune(tokenizer_dir, tmp_path: Path, capsys) -> None:
    from bamba.checkpoint import from_pretrained
    from bamba.cli.finetune import run as finetune
    from bamba.train.train_config import load_config
    from bamba.train.trainer import train

    base = load_config(None, [f"--out_dir={tmp_path / 'pre'}", "--steps=2", "--warmup_steps=1",
                              "--seq_len=32", "--batch_size=2", "--progress=false",
                              f"--tokenizer={tokenizer_dir}"])
    base.model_overrides = MODEL
    exported = train(base).export_dir
    assert (exported / "tokenizer.json").is_file()
    _assert_transformers_agrees(exported)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "pre" / "loss.png").stat().st_size > 1000
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in
                            [CHAT, {"prompt": "add 2 and 2", "completion": " 4"}] * 4))
    args = argparse.Namespace(config=None, overrides=[f"--init_from={exported}", f"--data_path={data}", "--steps=3",
                             "--warmup_steps=1", "--seq_len=48", "--batch_size=2",
                             f"--out_dir={tmp_path / 'ft'}", "--progress=false", "--ckpt_every=2"])
    assert finetune(args) == 0
    assert "step 3: loss" in capsys.readouterr().out
    model = from_pretrained(tmp_path / "ft" / "hf")
    start = from_pretrained(exported)
    assert model.config == start.config
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)  # it trained


def _assert_transformers_agrees(directory: Path) -> None:
    """The trainer's export loads in transformers and gives bamba's logits."""
    transformers = pytest.importorskip("transformers")
    from bamba.checkpoint import from_pretrained

    ids = torch.randint(3, 300, (1, 24))
    ours = from_pretrained(directory)(ids)
    theirs = transformers.BambaForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, theirs(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("source", ["int8", "q8_0.gguf"])
def test_finetune_from_a_quantized_checkpoint_trains_its_dequantized_weights(
        make_hf_checkpoint, tmp_path: Path, source) -> None:
    """A quantized init_from (a compressed-tensors checkpoint, a GGUF file with its tied table)
    starts from the weights it stands for, dequantized to float32 trainable parameters (the
    same logits), trains every linear and exports a dense checkpoint (it trained two steps of
    norms alone, then failed to export)."""
    from bamba.checkpoint import from_pretrained, load_tokenizer
    from bamba.cli import main
    from bamba.cli.finetune import run as finetune
    from bamba.gguf.export import export_gguf
    from bamba.quant.weights import QuantizedWeights
    from bamba.train.trainer import dense_for_training

    dense = make_hf_checkpoint("granite", tie_word_embeddings=True)
    quantized = tmp_path / source
    if source == "int8":
        assert main(["quantize", str(dense), str(quantized), "--scheme", "int8",
                     "--no-progress"]) == 0
    else:
        export_gguf(from_pretrained(dense), load_tokenizer(dense), quantized, "q8_0")
    held = from_pretrained(quantized)
    assert any(isinstance(m, QuantizedWeights) for m in held.modules())
    trainable = dense_for_training(from_pretrained(quantized))
    assert not any(isinstance(m, QuantizedWeights) for m in trainable.modules())
    assert all(p.requires_grad for p in trainable.parameters() if p.is_floating_point())
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(trainable(ids), held(ids))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [CHAT] * 4))
    args = argparse.Namespace(config=None, overrides=[
        f"--init_from={quantized}", f"--data_path={data}", "--steps=2", "--warmup_steps=1",
        "--seq_len=48", "--batch_size=2", f"--out_dir={tmp_path / 'ft'}", "--progress=false",
        f"--tokenizer={dense}"])
    assert finetune(args) == 0
    tuned = from_pretrained(tmp_path / "ft" / "hf")
    assert not any(isinstance(m, QuantizedWeights) for m in tuned.modules())
    before = trainable.model.layers[0].mamba.in_proj.weight
    assert not torch.equal(tuned.model.layers[0].mamba.in_proj.weight, before)  # it trained
