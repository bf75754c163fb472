"""Data preparation: train-tokenizer, tokenize (shards, manifest, determinism, resume), sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from bamba.cli import main  # noqa: E402
from bamba.data.bpe import EOS_TOKEN, PAD_TOKEN, train_bpe  # noqa: E402
from bamba.data.documents import ShardDocuments, TextDocuments  # noqa: E402
from bamba.data.loader import build_loader  # noqa: E402
from bamba.data.shards import ShardReader, read_json  # noqa: E402
from bamba.data.tokenize import TokenizeOptions, tokenize_corpus  # noqa: E402
from bamba.tokenizer import load_tokenizer  # noqa: E402

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "for i in range(10):\n    print(i * i)\n",
    "# a comment line\nx = [1, 2, 3]\n",
    "while True:\n    break\n",
]


def write_corpus(root: Path) -> Path:
    """Every kind of input, with empty documents and one file that is not UTF-8."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(TEXTS[0])
    (root / "b.py").write_text(TEXTS[1])
    (root / "empty.txt").write_text("  \n")
    (root / "bad.py").write_bytes(b"x = '\xff\xfe'\n")
    lines = [{"text": TEXTS[2]}, {"text": ""}, {"text": TEXTS[3]}]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    pq.write_table(pa.table({"text": [TEXTS[4], TEXTS[5]]}), root / "d.parquet")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "e.txt").write_text(TEXTS[0] + TEXTS[3])
    (root / "notes.md").write_text("ignored: not a supported suffix")
    return root


# sorted order: a.txt, b.py, bad.py, c.jsonl, d.parquet, empty.txt, sub/e.txt
EXPECTED = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[3], TEXTS[4], TEXTS[5], TEXTS[0] + TEXTS[3]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    corpus = write_corpus(root / "corpus")
    train_bpe([corpus], vocab_size=300, out=root / "tokenizer")
    return root / "tokenizer"


def options(tok_dir: Path, out: Path, **kw) -> TokenizeOptions:
    return TokenizeOptions(tokenizer_dir=tok_dir, out=out, docs_per_shard=kw.pop("per", 2), **kw)


def test_trained_tokenizer_loads_in_transformers(tok_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tok_dir)
    theirs = AutoTokenizer.from_pretrained(str(tok_dir))
    assert theirs.eos_token == EOS_TOKEN and theirs.pad_token == PAD_TOKEN
    assert ours.vocab_size == 300 and ours.eos_token_id is not None
    for text in TEXTS + ["ünïcode ✓ 🙂"]:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids
        assert ours.decode(ids) == text  # byte-level: every text round-trips


def test_train_tokenizer_rejects_tiny_vocab(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="vocab-size"):
        train_bpe([write_corpus(tmp_path / "c")], vocab_size=100, out=tmp_path / "t")


def test_tokenize_writes_shards_and_manifest(tmp_path, tok_dir):
    corpus = write_corpus(tmp_path / "corpus")
    m = tokenize_corpus([corpus], options(tok_dir, tmp_path / "out"))
    tok = load_tokenizer(tok_dir)
    expect = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in EXPECTED]
    got = [ShardReader(tmp_path / "out" / e["file"])[i].tolist()
           for e in m["shards"] for i in range(e["documents"])]
    assert got == expect
    assert m["complete"] and m["documents"] == len(EXPECTED)
    assert m["tokens"] == sum(map(len, expect))
    assert (m["skipped_empty"], m["skipped_invalid_utf8"]) == (2, 1)
    assert read_json(tmp_path / "out" / "manifest.json") == m
    assert len(ShardDocuments(tmp_path / "out")) == len(EXPECTED)


def test_tokenize_is_independent_of_worker_count(tmp_path, tok_dir):
    corpus = write_corpus(tmp_path / "corpus")
    one = tokenize_corpus([corpus], options(tok_dir, tmp_path / "one"))
    two = tokenize_corpus([corpus], options(tok_dir, tmp_path / "two", workers=2))
    assert one == two
    for e in one["shards"]:
        assert (tmp_path / "one" / e["file"]).read_bytes() == (tmp_path / "two" / e["file"]).read_bytes()


def test_tokenize_resumes_skipping_finished_shards(tmp_path, tok_dir):
    corpus, out = write_corpus(tmp_path / "corpus"), tmp_path / "out"
    full = tokenize_corpus([corpus], options(tok_dir, out))
    # Simulate an interrupted run: shard 1 never finished.
    manifest = read_json(out / "manifest.json")
    lost = manifest["shards"][1]["file"]
    original = (out / lost).read_bytes()
    manifest["shards"][1], manifest["complete"] = None, False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / lost).unlink()
    with pytest.raises(ValueError, match="did not finish"):
        ShardDocuments(out)
    stamps = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in full["shards"] if e["file"] != lost}
    again = tokenize_corpus([corpus], options(tok_dir, out))
    assert again == full and (out / lost).read_bytes() == original
    assert stamps == {f: (out / f).stat().st_mtime_ns for f in stamps}  # not rewritten


def test_tokenize_refuses_a_different_plan(tmp_path, tok_dir):
    corpus, out = write_corpus(tmp_path / "corpus"), tmp_path / "out"
    tokenize_corpus([corpus], options(tok_dir, out))
    with pytest.raises(ValueError, match="different tokenization"):
        tokenize_corpus([corpus], options(tok_dir, out, per=3))


def test_strict_utf8_names_the_file(tmp_path, tok_dir):
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(ValueError, match="bad.py is not valid UTF-8"):
        tokenize_corpus([corpus], options(tok_dir, tmp_path / "out", strict_utf8=True))


def test_bad_inputs(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match="no such file"):
        tokenize_corpus([tmp_path / "missing"], options(tok_dir, tmp_path / "out"))
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "e.txt").write_text("")
    (tmp_path / "only" / "bad.txt").write_bytes(b"\xff")
    with pytest.raises(ValueError, match="no documents in 2 input files"):
        tokenize_corpus([tmp_path / "only"], options(tok_dir, tmp_path / "out"))
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(ValueError, match="x.jsonl:1: no field 'text'"):
        tokenize_corpus([tmp_path / "x.jsonl"], options(tok_dir, tmp_path / "out2"))


def test_cli_verbs(tmp_path, tok_dir, capsys, monkeypatch):
    from bamba import cli

    monkeypatch.setattr(cli, "COMMANDS", {v: cli.COMMANDS[v] for v in ("tokenize", "train-tokenizer")})
    corpus = write_corpus(tmp_path / "corpus")
    assert main(["train-tokenizer", str(corpus), "--vocab-size", "280", "--out", str(tmp_path / "t")]) == 0
    assert main(["tokenize", str(corpus), "--tokenizer", str(tmp_path / "t" / "tokenizer.json"),
                 "--out", str(tmp_path / "s"), "--docs-per-shard", "3"]) == 0
    assert read_json(tmp_path / "s" / "manifest.json")["documents"] == len(EXPECTED)
    assert main(["tokenize", str(tmp_path / "nope"), "--tokenizer", str(tok_dir),
                 "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bamba tokenize: error: no such file or directory")


def test_loader_over_shards_covers_an_epoch(tmp_path, tok_dir):
    corpus = write_corpus(tmp_path / "corpus")
    tokenize_corpus([corpus], options(tok_dir, tmp_path / "out"))
    docs = ShardDocuments(tmp_path / "out")
    loader = build_loader([docs], seq_len=8, batch_size=2, mask_boundary=False)
    seen: dict[int, list[int]] = {}
    it = iter(loader)
    while len(seen) < len(docs) or any(len(seen[k]) < len(docs.tokens(k)) for k in seen):
        b = next(it)
        rows = np.concatenate([b["input_ids"].numpy(), b["labels"][:, -1:].numpy()], axis=1)
        for t, k in zip(rows.ravel(), b["doc_keys"].numpy().ravel()):
            if k >> 40 == 0:
                seen.setdefault(int(k), []).append(int(t))
    assert {k: v for k, v in seen.items()} == {i: docs.tokens(i).tolist() for i in range(len(docs))}


def test_text_documents_tokenize_on_the_fly(tmp_path, tok_dir):
    corpus = write_corpus(tmp_path / "corpus")
    docs = TextDocuments([corpus], tok_dir)
    tok = load_tokenizer(tok_dir)
    texts = [t for t in (docs.text(i) for i in range(len(docs))) if t is not None]
    assert texts == EXPECTED  # empty and undecodable slots give no text
    assert docs.tokens(0).tolist() == tok.encode(TEXTS[0], add_special_tokens=False) + [tok.eos_token_id]
    loader = build_loader([docs], seq_len=8, batch_size=2, num_workers=2)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 8)


def test_on_the_fly_over_only_empty_files_raises(tmp_path, tok_dir):
    (tmp_path / "e").mkdir()
    for i in range(3):
        (tmp_path / "e" / f"{i}.txt").write_text("")
    loader = build_loader([TextDocuments([tmp_path / "e"], tok_dir)], seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="no tokens"):
        next(iter(loader))


def test_directory_listing_is_sorted_and_excludes(tmp_path):
    from bamba.data.sources import list_input_files

    corpus = write_corpus(tmp_path / "corpus")
    names = [p.relative_to(corpus).as_posix() for p in list_input_files([corpus])]
    assert names == ["a.txt", "b.py", "bad.py", "c.jsonl", "d.parquet", "empty.txt", "sub/e.txt"]
    assert "sub/e.txt" not in [p.relative_to(corpus).as_posix()
                               for p in list_input_files([corpus], exclude=("sub/*",))]
    with pytest.raises(ValueError, match="unsupported input"):
        list_input_files([corpus / "notes.md"])
