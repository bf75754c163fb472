"""A tokenized dataset's manifest is checked before use: counts, shard names, readable shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

from bamba.data.documents import ShardDocuments  # noqa: E402
from bamba.data.tokenize import tokenize_corpus  # noqa: E402

from test_data_prep import options, tok_dir, write_corpus  # noqa: E402,F401


@pytest.fixture()
def dataset(tmp_path: Path, tok_dir: Path) -> Path:  # noqa: F811
    tokenize_corpus([write_corpus(tmp_path / "corpus")], options(tok_dir, tmp_path / "out"))
    return tmp_path / "out"


def _edit(directory: Path, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _first_shard(manifest: dict) -> dict:
    return next(e for e in manifest["shards"] if e["documents"] > 0)


def _add_one_document(m: dict) -> None:
    _first_shard(m)["documents"] += 1
    m["documents"] += 1


def _point_outside(m: dict) -> None:
    _first_shard(m)["file"] = "../corpus/a.txt"


@pytest.mark.parametrize("change, message", [
    (_add_one_document, "documents, the manifest says"),
    (lambda m: m.update(documents=m["documents"] + 5), "documents is"),
    (lambda m: m.update(tokens=-1), "tokens is -1 but its shards hold"),
    (_point_outside, "shard file '../corpus/a.txt' is not a file name inside"),
    (lambda m: _first_shard(m).update(file="/etc/passwd"), "is not a file name inside"),
    (lambda m: m.update(shards="x"), "shards must be a list"),
    (lambda m: _first_shard(m).update(documents="2"), "has documents '2'"),
])
def test_bad_manifest_is_refused_in_one_line(dataset: Path, change, message: str) -> None:
    ShardDocuments(dataset)  # the untouched dataset reads
    _edit(dataset, change)
    with pytest.raises(ValueError) as info:
        ShardDocuments(dataset)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unreadable_shard_is_one_line(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    (dataset / _first_shard(manifest)["file"]).write_bytes(b"not arrow")
    with pytest.raises(ValueError, match="not a readable shard") as info:
        ShardDocuments(dataset)
    assert "\n" not in str(info.value)


def _write_arrow(path: Path, column) -> None:
    import pyarrow as pa

    table = pa.table({"tokens": column})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def test_a_shard_of_anything_but_id_lists_is_one_line(dataset: Path) -> None:
    import pyarrow as pa

    manifest = json.loads((dataset / "manifest.json").read_text())
    entry = _first_shard(manifest)
    _write_arrow(dataset / entry["file"], pa.array(["text"] * entry["documents"]))
    with pytest.raises(ValueError, match="column tokens is string, expected lists of token ids"
                       ) as info:
        ShardDocuments(dataset).tokens(0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ids, message", [
    ([5, 6, 7, -1], "the data has token id -1: token ids are not negative"),
    ([5, 6, 7, 300], "the data has token id 300 but the model's vocab_size is 300"),
])
def test_training_on_ids_the_model_has_no_rows_for_exits_2(dataset: Path, tmp_path: Path,
                                                            capsys, ids, message) -> None:
    """Ids past the vocabulary or negative (a signed column): one line, not an index error
    inside the embedding (negative ones were, found by corrupting shards at random)."""
    import pyarrow as pa

    from bamba.train.__main__ import main

    manifest = json.loads((dataset / "manifest.json").read_text())
    for entry in manifest["shards"]:
        docs = [ids * 8 for _ in range(entry["documents"])]
        _write_arrow(dataset / entry["file"], pa.array(docs, pa.list_(pa.int32())))
        entry["tokens"] = sum(len(d) for d in docs)
    manifest["tokens"] = sum(e["tokens"] for e in manifest["shards"])
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    code = main([str(write_yaml(tmp_path)), "--data=shards", f"--data_path={dataset}",
                 "--steps=1", f"--out_dir={tmp_path / 'run'}", "--progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("bamba train: error: ") and "\n" not in err
    assert message in err


def test_training_on_a_manifest_with_a_wrong_count_exits_2(dataset: Path, tmp_path: Path,
                                                           capsys) -> None:
    from bamba.train.__main__ import main

    _edit(dataset, _add_one_document)
    code = main([str(write_yaml(tmp_path)), "--data=shards", f"--data_path={dataset}",
                 "--steps=1", f"--out_dir={tmp_path / 'run'}", "--progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("bamba train: error: ") and "\n" not in err
    assert "the manifest says" in err


def write_yaml(directory: Path) -> Path:
    path = directory / "c.yaml"
    path.write_text("model_overrides: {vocab_size: 300, num_hidden_layers: 2, "
                    "attn_layer_indices: [1]}\nseq_len: 16\nbatch_size: 1\n")
    return path
