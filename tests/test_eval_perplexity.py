"""Perplexity: equal to transformers' own loss on a short text, the sliding window's arithmetic
(each token once; stride == context is the non-overlapping chunks), batching that pads changes
nothing, token-weighted buckets, the three input formats and ``bamba eval perplexity``'s bad
input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bamba.checkpoint import from_pretrained, load_tokenizer
from bamba.cli import main
from bamba.eval.perplexity import PositionLosses, perplexity, summarize, windows
from eval_helpers import assert_one_line_error as _refused
from eval_helpers import run_eval
from conftest import load_hf

TEXT = ("The hybrid model mixes Mamba2 layers with a few attention layers. State space models "
        "keep a fixed-size state per sequence, while attention keeps keys and values. ")


@given(length=st.integers(0, 300), context=st.integers(2, 64), data=st.data())
@settings(max_examples=300, deadline=None)
def test_windows_score_every_token_after_the_first_once(length, context, data):
    stride = data.draw(st.integers(1, context))
    spans = windows(length, context, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    for begin, end, first in spans:
        assert 0 <= begin < first < end <= length and end - begin <= context
    if stride < context:
        assert scored == list(range(1, length))  # in order, once each
    else:  # side by side: each window's first token has no history and is skipped
        assert [(b, e) for b, e, _ in spans] == [(b, min(b + context, length))
                                                 for b in range(0, length - 1, context)
                                                 if min(b + context, length) - b > 1]
        assert scored == [t for t in range(1, length) if t % context]


def _direct_losses(model, ids):
    """Per-token NLL of ids[1:] from one plain forward of the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double()


@pytest.fixture
def checkpoint(make_hf_checkpoint):
    return make_hf_checkpoint("hybrid", seed=5)


def test_perplexity_equals_transformers_loss_on_a_short_text(checkpoint):
    ids = load_tokenizer(checkpoint).encode(TEXT)
    assert len(ids) > 40
    reference = load_hf(checkpoint)
    with torch.no_grad():
        loss = reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    result = perplexity(from_pretrained(checkpoint), [ids], context=512)
    assert result["tokens"] == len(ids) - 1 and result["documents"] == 1
    assert result["nll"] == pytest.approx(loss, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_stride_equal_to_context_is_the_non_overlapping_chunks(checkpoint):
    model = from_pretrained(checkpoint)
    doc = torch.randint(3, 300, (101,), generator=torch.Generator().manual_seed(1)).tolist()
    chunks = [doc[i:i + 32] for i in range(0, len(doc), 32)]
    direct = torch.cat([_direct_losses(model, c) for c in chunks])
    for stride in (None, 32):
        result = perplexity(model, [doc], context=32, stride=stride, buckets=1)
        assert result["tokens"] == len(direct) == 101 - 4
        assert result["nll"] == pytest.approx(direct.mean().item(), abs=1e-5)


def test_a_sliding_window_scores_every_token_with_its_history(checkpoint):
    model = from_pretrained(checkpoint)
    doc = torch.randint(3, 300, (90,), generator=torch.Generator().manual_seed(2)).tolist()
    full = perplexity(model, [doc], context=200, stride=7)  # one window holds it all
    assert full["nll"] == pytest.approx(_direct_losses(model, doc).mean().item(), abs=1e-5)
    slid = perplexity(model, [doc], context=40, stride=10)
    # each window scores the 10 tokens after the previous one from the 30+ before them
    expected = [_direct_losses(model, doc[:40])]
    for begin in range(10, 60, 10):
        expected.append(_direct_losses(model, doc[begin:begin + 40])[-10:])
    expected = torch.cat(expected)
    assert slid["tokens"] == len(expected) == 89
    assert slid["nll"] == pytest.approx(expected.mean().item(), abs=1e-5)
    assert slid["nll"] != pytest.approx(full["nll"], abs=1e-4)  # less history, another loss


def test_batching_windows_of_different_lengths_changes_nothing(checkpoint):
    model = from_pretrained(checkpoint)
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (70, 23, 1, 48, 5)]
    one = perplexity(model, docs, context=32, stride=16, buckets=4, batch_size=1)
    many = perplexity(model, docs, context=32, stride=16, buckets=4, batch_size=3)
    assert one["documents"] == many["documents"] == 4  # the 1-token document has nothing scored
    assert one["tokens"] == many["tokens"] == 69 + 22 + 47 + 4
    assert many["nll"] == pytest.approx(one["nll"], abs=1e-5)
    for a, b in zip(one["buckets"], many["buckets"]):
        assert (a["start"], a["end"], a["tokens"]) == (b["start"], b["end"], b["tokens"])
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-5)


def test_buckets_weight_every_token_once():
    losses = PositionLosses.zeros(9)
    losses.add(1, np.array([1.0, 1.0, 5.0]))  # a long document: positions 1, 2, 3
    losses.add(1, np.array([1.0]))            # a short one: position 1 again
    losses.add(5, np.array([2.0, 4.0, 6.0, 8.0]))
    result = summarize(losses, buckets=2)
    assert result["tokens"] == 8 and result["nll"] == pytest.approx(28 / 8)
    first, second = result["buckets"]
    assert (first["start"], first["end"], second["end"]) == (1, 5, 9)
    assert first["tokens"] == 4 and first["nll"] == pytest.approx(8 / 4)  # not mean of means
    assert second["tokens"] == 4 and second["nll"] == pytest.approx(5.0)
    assert second["perplexity"] == pytest.approx(math.exp(5.0))
    sparse = summarize(PositionLosses.zeros(9), buckets=4)
    assert sparse["nll"] is None and all(b["tokens"] == 0 for b in sparse["buckets"])


# ---- the command ------------------------------------------------------------------------------

def _run(argv, capsys):
    return run_eval("perplexity", argv, capsys)


def test_the_command_on_text_jsonl_and_shards(checkpoint, tmp_path, capsys):
    tokenizer = load_tokenizer(checkpoint)
    texts = [TEXT * 3, TEXT[:60], "Attention layers keep keys and values for every token."]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.txt").write_text(texts[1])
    with open(tmp_path / "docs.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"body": text}) + "\n\n")
    model = from_pretrained(checkpoint)
    docs = [tokenizer.encode(t) for t in texts]
    base = [str(checkpoint), "--dtype", "fp32", "--context", "64", "--stride", "32",
            "--buckets", "3"]

    def run(files, *extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        code, cap = _run([*base, *files, "--out", str(out), *extra], capsys)
        assert code == 0, cap.err
        assert (out / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
        return json.loads((out / "perplexity.json").read_text()), cap.out

    text_result, printed = run([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    expected = perplexity(model, docs[:2], context=64, stride=32, buckets=3)
    assert text_result["tokens"] == expected["tokens"]
    assert text_result["nll"] == pytest.approx(expected["nll"], abs=1e-5)
    assert len(text_result["buckets"]) == 3 and f"{expected['perplexity']:.3f}" in printed
    jsonl_result, _ = run([str(tmp_path / "docs.jsonl")], "--format", "jsonl", "--text-key",
                          "body", "--max-documents", "2")
    assert jsonl_result["tokens"] == text_result["tokens"]
    assert jsonl_result["nll"] == pytest.approx(text_result["nll"], abs=1e-5)

    shards = tmp_path / "shards"
    capsys.readouterr()
    assert main(["tokenize", str(tmp_path / "docs.jsonl"), "--tokenizer", str(checkpoint),
                 "--out", str(shards), "--text-field", "body"]) == 0
    shard_result, _ = run([str(shards)], "--format", "shards")
    eos = tokenizer.eos_token_id
    with_eos = [tokenizer.encode(t, add_special_tokens=False) + [eos] for t in texts]
    expected = perplexity(model, with_eos, context=64, stride=32, buckets=3)
    assert shard_result["tokens"] == expected["tokens"] and shard_result["documents"] == 3
    assert shard_result["nll"] == pytest.approx(expected["nll"], abs=1e-5)


def test_the_command_in_bfloat16_is_close_to_float32(checkpoint, tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT * 4)
    results = {}
    for dtype in ("fp32", "bf16"):
        code, cap = _run([str(checkpoint), str(tmp_path / "a.txt"), "--dtype", dtype,
                          "--context", "128", "--out", str(tmp_path / dtype)], capsys)
        assert code == 0, cap.err
        results[dtype] = json.loads((tmp_path / dtype / "perplexity.json").read_text())["nll"]
    assert results["bf16"] == pytest.approx(results["fp32"], rel=0.02)


def test_the_command_on_a_gguf_file_scores_its_weights(checkpoint, tmp_path, capsys):
    """A GGUF file is a model like a checkpoint directory (its context read from the metadata):
    the f32 export of the checkpoint scores as the checkpoint does."""
    pytest.importorskip("gguf")
    from bamba.gguf.export import export_gguf

    gguf_file = export_gguf(from_pretrained(checkpoint), load_tokenizer(checkpoint),
                            tmp_path / "m.gguf", "f32")
    (tmp_path / "a.txt").write_text(TEXT * 2)
    results = {}
    for name, model in (("dir", checkpoint), ("gguf", gguf_file)):
        code, cap = _run([str(model), str(tmp_path / "a.txt"), "--dtype", "fp32", "--context",
                          "64", "--out", str(tmp_path / name)], capsys)
        assert code == 0, cap.err
        results[name] = json.loads((tmp_path / name / "perplexity.json").read_text())
    assert results["gguf"]["tokens"] == results["dir"]["tokens"]
    assert results["gguf"]["nll"] == pytest.approx(results["dir"]["nll"], abs=1e-5)


def test_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text(TEXT)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"other": 1}\n')
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe abc")
    ckpt, out = str(checkpoint), ["--out", str(tmp_path / "o")]
    cases = [
        ([ckpt, str(tmp_path / "missing.txt")], ["no such file", "missing.txt"]),
        ([str(tmp_path / "no-model"), str(text)], ["no-model"]),
        ([ckpt, str(tmp_path / "empty.txt")], ["empty.txt", "holds no text"]),
        ([ckpt, str(tmp_path / "binary.txt")], ["binary.txt", "not valid UTF-8"]),
        ([ckpt, str(tmp_path)], ["is a directory"]),
        ([ckpt, str(tmp_path / "bad.jsonl"), "--format", "jsonl"], ["bad.jsonl:2", "'text'"]),
        ([ckpt, str(text), "--format", "jsonl"], ["a.txt", ".jsonl"]),
        ([ckpt, str(tmp_path), "--format", "shards"], ["manifest.json"]),
        ([ckpt, str(text), "--context", "1024"], ["--context 1024", "context of 512",
                                                  "--rope-scaling"]),
        ([ckpt, str(text), "--context", "64", "--stride", "65"], ["stride"]),
        ([ckpt, str(text), "--buckets", "0"], ["buckets"]),
        ([ckpt, str(text), "--rope-scaling", "{yarn}"], ["--rope-scaling", "not valid JSON"]),
    ]
    for argv, fragments in cases:
        _refused(*_run([*argv, *out], capsys), *fragments)
    (tmp_path / "one.txt").write_text("x")
    _refused(*_run([ckpt, str(tmp_path / "one.txt"), *out], capsys), "fewer than 2")
    assert not (tmp_path / "o").exists()


def test_shard_ids_beyond_the_vocabulary_are_refused(checkpoint, tmp_path, capsys):
    from bamba.data.shards import FORMAT, MANIFEST, write_json, write_shard

    tokens = write_shard(tmp_path / "s" / "shard-00000.arrow", [[5, 6, 7], [8, 9999]])
    write_json(tmp_path / "s" / MANIFEST, {
        "format": FORMAT, "complete": True, "documents": 2, "tokens": tokens,
        "tokenizer": {"vocab_size": 10000},
        "shards": [{"file": "shard-00000.arrow", "documents": 2, "tokens": tokens}]})
    _refused(*_run([str(checkpoint), str(tmp_path / "s"), "--format", "shards", "--out",
                           str(tmp_path / "o")], capsys), "token id 9999", "vocabulary of 320")


def test_negative_shard_ids_are_refused(checkpoint, tmp_path, capsys):
    """A signed column's -1 (found by corrupting shards at random): refused, not an index error
    inside the embedding."""
    import pyarrow as pa

    from bamba.data.shards import FORMAT, MANIFEST, write_json

    table = pa.table({"tokens": pa.array([[5, 6, 7], [8, -1]], pa.list_(pa.int32()))})
    (tmp_path / "s").mkdir()
    with pa.OSFile(str(tmp_path / "s" / "shard-00000.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    write_json(tmp_path / "s" / MANIFEST, {
        "format": FORMAT, "complete": True, "documents": 2, "tokens": 5,
        "tokenizer": {"vocab_size": 320},
        "shards": [{"file": "shard-00000.arrow", "documents": 2, "tokens": 5}]})
    _refused(*_run([str(checkpoint), str(tmp_path / "s"), "--format", "shards", "--out",
                    str(tmp_path / "o")], capsys), "token id -1: token ids are not negative")
