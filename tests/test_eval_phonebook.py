"""PhoneBook: the generator (seeded, sized to the target length with the tokenizer, the task's
layout), the scorer (cut at the first newline, strip, exact match) and its loop, and
``bamba eval phonebook`` end to end on a tiny random checkpoint (JSON + PNG, bad input)."""

from __future__ import annotations

import json
import re

import pytest

from bamba.checkpoint import from_pretrained, load_tokenizer
from bamba.default_model import byte_tokenizer
from bamba.eval.phonebook import (MIN_ENTRIES, evaluate, extract_answer, is_correct,
                                  largest_fitting, make_samples, score)
from eval_helpers import assert_one_line_error as _refused
from eval_helpers import run_eval
from conftest import build_tokenizer

LINE = re.compile(r"^(.+): (\d{10})$")


def _encoders():
    bpe = build_tokenizer()
    return {"bytes": byte_tokenizer().encode, "bpe": lambda text: bpe.encode(text)}


@pytest.fixture(params=["bytes", "bpe"])
def encode(request):
    return _encoders()[request.param]


def _book(prompt):
    """(book lines as {name: number}, shot lines, query name) parsed back from a prompt."""
    book_text, tail = prompt.split("\n\n")
    book = [LINE.match(line).groups() for line in book_text.split("\n")]
    *shots, query = tail.split("\n")
    return book, [LINE.match(s).groups() for s in shots], query


def test_the_same_seed_gives_the_same_books_and_another_seed_others(encode):
    first = make_samples(300, 3, encode, seed=7)
    assert first == make_samples(300, 3, encode, seed=7)
    other = make_samples(300, 3, encode, seed=8)
    assert [s.prompt for s in other] != [s.prompt for s in first]
    assert len({s.prompt for s in first}) == 3  # each sample is its own book


@pytest.mark.parametrize("target", [200, 400, 1500])
def test_prompts_fill_the_target_length_to_within_a_line(encode, target):
    for sample in make_samples(target, 4, encode, seed=1):
        assert sample.prompt_ids == encode(sample.prompt)
        book, _, _ = _book(sample.prompt)
        longest_line = max(len(encode(f"{name}: {number}\n")) for name, number in book)
        assert target - 2 * longest_line < sample.prompt_tokens <= target


def test_a_prompt_is_a_book_two_repeated_entries_and_the_query():
    for sample in make_samples(600, 5, byte_tokenizer().encode, seed=3):
        book, shots, query = _book(sample.prompt)
        numbers = dict(book)
        assert len(numbers) == len(book) == sample.entries  # names are unique
        assert len(shots) == 2 and all(numbers[name] == n for name, n in shots)
        assert query == f"{sample.name}:" and sample.name not in dict(shots)
        assert numbers[sample.name] == sample.answer and sample.answer[0] != "0"
        assert book.index((sample.name, sample.answer)) == round(sample.depth * (len(book) - 1))


def test_too_short_a_length_and_too_many_names_are_refused():
    with pytest.raises(ValueError, match="too short for a phone book of 3 entries"):
        make_samples(40, 1, byte_tokenizer().encode, seed=0)
    with pytest.raises(ValueError, match="distinct names"):
        make_samples(10**6, 1, lambda text: [0] * text.count("\n"), seed=0)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        make_samples(500, 0, byte_tokenizer().encode, seed=0)


def test_largest_fitting_finds_the_last_size_under_the_target():
    assert largest_fitting(lambda n: 10 * n, 95, 3, 1000) == 9
    assert largest_fitting(lambda n: 10 * n, 100, 3, 1000) == 10
    assert largest_fitting(lambda n: 10 * n, 30, 3, 1000) == 3
    with pytest.raises(ValueError, match="too short"):
        largest_fitting(lambda n: 10 * n, 29, 3, 1000)
    with pytest.raises(ValueError, match="more than the 50"):
        largest_fitting(lambda n: 10 * n, 10**6, 3, 50)
    assert MIN_ENTRIES == 3


@pytest.mark.parametrize("output, right", [
    ("1234567890", True), (" 1234567890\nAlice Smith: 1", True), ("\t1234567890  \n", True),
    ("1234567890 ", True), ("12345678901", False), ("123456789", False),
    ("\n1234567890", False), ("123-456-7890", False), ("", False), ("1234567890x", False),
])
def test_the_scorer_cuts_at_the_first_newline_strips_and_matches_exactly(output, right):
    assert is_correct(output, "1234567890") is right
    assert extract_answer(output) == output.split("\n")[0].strip()


def _copier(batch):
    """A model that copies perfectly: the queried person's number from the book."""
    out = []
    for sample in batch:
        book, _, query = _book(sample.prompt)
        out.append(" " + dict(book)[query[:-1]] + "\nsomething else")
    return out


def test_a_perfect_copier_scores_one_and_a_wrong_one_zero():
    encode = byte_tokenizer().encode
    books = {n: make_samples(n, 5, encode, seed=2) for n in (200, 700)}
    perfect = evaluate(books, _copier)
    assert [r["accuracy"] for r in perfect] == [1.0, 1.0]
    assert [r["length"] for r in perfect] == [200, 700] and perfect[0]["n"] == 5
    shifted = evaluate(books, lambda batch: [o.replace("\n", "1\n", 1) for o in _copier(batch)])
    assert [r["accuracy"] for r in shifted] == [0.0, 0.0]
    half = score(books[200], [o if i % 2 else "no" for i, o in enumerate(_copier(books[200]))],
                 examples=2)
    assert half["correct"] == 2 and half["accuracy"] == pytest.approx(0.4)
    assert [e["correct"] for e in half["examples"]] == [False, True]
    assert half["mean_prompt_tokens"] == pytest.approx(
        sum(s.prompt_tokens for s in books[200]) / 5)
    with pytest.raises(ValueError, match="2 outputs for 5 samples"):
        score(books[200], ["a", "b"])


# ---- the command ------------------------------------------------------------------------------

def _run(argv, capsys):
    return run_eval("phonebook", argv, capsys)


def test_the_command_writes_json_and_png_from_the_engine(make_hf_checkpoint, tmp_path, capsys):
    ckpt = make_hf_checkpoint("hybrid")
    out = tmp_path / "pb"
    code, cap = _run([str(ckpt), "--lengths", "150", "300", "--samples", "3", "--out", str(out),
                      "--dtype", "fp32", "--max-new-tokens", "12", "--seed", "4"], capsys)
    assert code == 0, cap.err
    result = json.loads((out / "phonebook.json").read_text())
    assert (out / "phonebook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run,) = result["runs"]
    assert run["rope_scaling"] is None and [r["length"] for r in run["lengths"]] == [150, 300]
    tokenizer = load_tokenizer(ckpt)
    for entry in run["lengths"]:
        samples = make_samples(entry["length"], 3, tokenizer.encode, seed=4)
        assert entry["n"] == 3 and len(entry["examples"]) == 3
        assert entry["mean_prompt_tokens"] == pytest.approx(
            sum(s.prompt_tokens for s in samples) / 3)
        for example, sample in zip(entry["examples"], samples):
            assert example["answer"] == sample.answer
            assert example["extracted"] == extract_answer(example["output"])
            assert example["correct"] == (example["extracted"] == sample.answer)
        assert entry["correct"] == sum(e["correct"] for e in entry["examples"])
    assert "150 tokens: accuracy" in cap.out


def test_the_engine_answer_is_the_models_greedy_continuation(make_hf_checkpoint, tmp_path,
                                                             capsys):
    """What the JSON shows is the model's own greedy output (checked against generate)."""
    import torch

    from bamba.generation import GenerationConfig, generate

    ckpt = make_hf_checkpoint("hybrid", seed=3)
    assert _run([str(ckpt), "--lengths", "200", "--samples", "2", "--out", str(tmp_path),
                 "--dtype", "fp32", "--max-new-tokens", "6"], capsys)[0] == 0
    shown = json.loads((tmp_path / "phonebook.json").read_text())["runs"][0]["lengths"][0]
    tokenizer = load_tokenizer(ckpt)
    model = from_pretrained(ckpt, dtype=torch.float32)
    for example, sample in zip(shown["examples"], make_samples(200, 2, tokenizer.encode, 0)):
        ids = generate(model, [sample.prompt_ids], GenerationConfig(
            max_new_tokens=6, eos_token_ids=model.config.eos_token_ids))[0].token_ids
        assert example["output"] == tokenizer.decode(ids).split("\n")[0]


def test_bad_input_is_one_line_and_exit_2(make_hf_checkpoint, tmp_path, capsys):
    ckpt = str(make_hf_checkpoint("hybrid"))  # max_position_embeddings 512
    out = ["--out", str(tmp_path / "o")]
    _refused(*_run([str(tmp_path / "nothing"), *out], capsys), "nothing")
    _refused(*_run([ckpt, "--lengths", "1024", *out], capsys),
                    "--lengths 1024", "context of 512 tokens", "--rope-scaling")
    _refused(*_run([ckpt, "--lengths", "500", *out], capsys), "context of 512")
    _refused(*_run([ckpt, "--rope-scaling", "{factor: 4}", *out], capsys),
                    "--rope-scaling", "not valid JSON")
    _refused(*_run([ckpt, "--rope-scaling", "[4]", *out], capsys), "JSON object")
    _refused(*_run([ckpt, "--lengths", "20", *out], capsys), "too short")
    _refused(*_run([ckpt, "--lengths", "0", *out], capsys), "--lengths")
    _refused(*_run([ckpt, "--samples", "0", *out], capsys), "--samples")
    (tmp_path / "file").write_text("x")
    _refused(*_run([ckpt, "--out", str(tmp_path / "file")], capsys), "not a directory")
    _refused(*_run([ckpt, "--rope-scaling", '{"rope_type": "no-such-type"}', *out],
                          capsys), "rope")
    assert not (tmp_path / "o").exists()


def test_rope_scaling_settings_are_one_run_each(make_hf_checkpoint, tmp_path, capsys):
    """Each setting (and 'none', the checkpoint's own) is a run of its own in the JSON."""
    ckpt = str(make_hf_checkpoint("hybrid"))
    argv = [ckpt, "--lengths", "150", "--samples", "2", "--out", str(tmp_path), "--dtype", "fp32",
            "--rope-scaling", "none", "--rope-scaling", '{"rope_type": "linear", "factor": 2}']
    code, cap = _run(argv, capsys)
    assert code == 0, cap.err
    runs = json.loads((tmp_path / "phonebook.json").read_text())["runs"]
    assert [r["rope_scaling"] for r in runs] == [None, {"rope_type": "linear", "factor": 2}]


def test_a_scaling_extends_the_lengths_beyond_the_checkpoints_context(make_hf_checkpoint,
                                                                      tmp_path, capsys):
    """With --rope-scaling the limit is the scaled context (factor x the original), not the
    checkpoint's max_position_embeddings: 700 tokens run on a 512-token model with yarn 2."""
    ckpt = str(make_hf_checkpoint("hybrid"))  # max_position_embeddings 512
    scaling = '{"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 512}'
    code, cap = _run([ckpt, "--lengths", "700", "--samples", "1", "--out", str(tmp_path),
                      "--dtype", "fp32", "--max-new-tokens", "4", "--rope-scaling", scaling],
                     capsys)
    assert code == 0, cap.err
    _refused(*_run([ckpt, "--lengths", "1100", "--samples", "1", "--out", str(tmp_path),
                    "--rope-scaling", scaling], capsys), "context of 1024 tokens")
