"""lm-evaluation-harness on bamba: the registered "bamba" model scores as a plain forward does
(loglikelihood, rolling windows, greedy generation), and an offline run of local YAML tasks
over JSONL files (a multiple-choice task and a generation task, no download) gives the same
numbers in process, through ``local-completions`` and through ``local-chat-completions``
against the server; ``bamba eval lm-eval`` writes lm-eval's results JSON and names an unknown
task."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models (the eval extra: lm-eval[api])
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from bamba.cli import eval_harness  # noqa: E402
from bamba.engine import LLM  # noqa: E402
from bamba.eval.harness import BambaEvalLM  # noqa: E402
from bamba.serve.app import build_app  # noqa: E402
from bamba.serve.async_engine import AsyncEngine  # noqa: E402
from scoring_helpers import forward_logprobs, plain_model  # noqa: E402
from serve_helpers import running, save_tiny_checkpoint  # noqa: E402

NAME = "tiny-bamba"
TOL = 1e-4
TASKS = ["tiny_mc", "tiny_gen"]
MC = [{"question": f"Question {i}: the hybrid model mixes", "choices": [" Mamba2 layers",
       " attention", " state space models", " keys"], "answer": i % 4} for i in range(6)]
GEN = [{"prompt": f"Attention layers keep {word}", "target": " values"}
       for word in ("keys", "values", "every token", "a state")]


def write_tasks(directory: Path) -> Path:
    """Two lm-eval tasks over local JSONL files: multiple choice (loglikelihood) and
    generate_until, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("mc", MC), ("gen", GEN)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n"
    (directory / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}    test: {directory / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (directory / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}    test: {directory / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("lmeval") / "ckpt")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lmeval") / "tasks")


@pytest.fixture(scope="module")
def lm(checkpoint: Path) -> BambaEvalLM:
    return BambaEvalLM(llm=LLM(str(checkpoint), memory_gb=0.005, max_model_len=256),
                       batch_size=3)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> torch.nn.Module:
    return plain_model(checkpoint)


def plain_score(model: torch.nn.Module, tokens: list[int], first: int) -> tuple[float, bool]:
    """bamba's own scoring of tokens[first:]: one forward, log_softmax, the tokens' entries."""
    logprobs = forward_logprobs(model, tokens)[first - 1:len(tokens) - 1]
    targets = torch.tensor(tokens[first:])
    return (float(logprobs.gather(1, targets[:, None]).sum()),
            bool((logprobs.argmax(-1) == targets).all()))


def evaluate(model: Any, tasks: Path, **kwargs: Any) -> dict:
    return lm_eval.simple_evaluate(
        model=model, tasks=kwargs.pop("names", TASKS), log_samples=True,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), **kwargs)


# ---- the model class against a plain forward ------------------------------------------------
def test_loglikelihood_equals_a_plain_forward(lm: BambaEvalLM, reference) -> None:
    pairs = [("The hybrid model", " mixes Mamba2 layers"), ("State space", " models"),
             ("", "Attention layers keep keys"), ("Numbers 0123456789, punctuation", " !?;:"),
             ("The hybrid model mixes Mamba2 layers with a few attention", " layers.")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        context_ids, continuation_ids = ([lm.prefix_token_id], lm.tok_encode(continuation)) \
            if not context else lm._encode_pair(context, continuation)
        want, want_greedy = plain_score(reference, context_ids + continuation_ids,
                                        len(context_ids))
        assert abs(logprob - want) < TOL and greedy == want_greedy
    # a greedy continuation is recognised as one
    context = lm.tok_encode("State space models keep")
    ids = list(context)
    for _ in range(4):
        ids.append(int(forward_logprobs(reference, ids)[-1].argmax()))
    [(logprob, greedy)] = lm._loglikelihood_tokens([(("", ""), context, ids[len(context):])])
    assert greedy and abs(logprob - plain_score(reference, ids, len(context))[0]) < TOL


def test_rolling_loglikelihood_scores_each_token_once(checkpoint: Path, lm: BambaEvalLM,
                                                      reference) -> None:
    text = " ".join(["State space models keep a fixed-size state per sequence."] * 3)
    tokens = lm.tok_encode(text)
    [whole] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert abs(whole - plain_score(reference, [lm.prefix_token_id] + tokens, 1)[0]) < TOL
    small = BambaEvalLM(llm=LLM(str(checkpoint), memory_gb=0.005, max_model_len=16),
                        batch_size=2)
    [windowed] = small.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        tokens, small.prefix_token_id, max_seq_len=16, context_len=1)]
    assert [t for _, predicted in windows for t in predicted] == tokens
    assert all(len(c) + len(p) - 1 <= 16 for c, p in windows) and len(windows) > 3
    want = sum(plain_score(reference, c + p, len(c))[0] for c, p in windows)
    assert abs(windowed - want) < TOL and windowed < whole - 1  # less context, worse score


def test_generate_until_is_the_greedy_continuation_cut_at_until(lm: BambaEvalLM,
                                                                 reference) -> None:
    prompts = ["State space", "café", "hybrid"]
    continuations = []
    for prompt in prompts:
        ids = lm.tok_encode(prompt)
        for _ in range(8):
            ids.append(int(forward_logprobs(reference, ids)[-1].argmax()))
        continuations.append(lm.tok_decode(ids[len(lm.tok_encode(prompt)):]))
    first = continuations[0]  # a random model: mostly byte pieces, some readable text
    stop = next(first[i:i + 2] for i in range(2, len(first) - 1)
                if first[i:i + 2].isprintable() and "\ufffd" not in first[i:i + 2])
    requests = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 8}), i)
                for i, p in enumerate(prompts)]
    got = lm.generate_until(requests)
    assert got == [c.split(stop)[0] for c in continuations]
    assert len(got[0]) < len(first)


# ---- offline tasks: in process, local-completions, local-chat-completions -------------------
@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[str]:
    """What ``bamba serve`` runs (the same app and engine), on 127.0.0.1 in this process."""
    engine = AsyncEngine(LLM(str(checkpoint), memory_gb=0.005, max_model_len=256)).start()
    with running(build_app(engine, NAME)) as base:
        yield base
    engine.shutdown()


def api_args(base: str, checkpoint: Path, route: str) -> dict:
    return {"model": NAME, "base_url": f"{base}/v1/{route}", "tokenizer_backend": "huggingface",
            "tokenizer": str(checkpoint), "max_length": 256}


def assert_same_numbers(ours: dict, theirs: dict, names: list[str]) -> None:
    """Equal metrics, and per document equal loglikelihoods (within TOL) and generations."""
    for name in names:
        mine, other = ours["results"][name], theirs["results"][name]
        metrics = [k for k in mine if "," in k]
        assert metrics and {k: mine[k] for k in metrics} == {k: other[k] for k in metrics}
        pairs = zip(ours["samples"][name], theirs["samples"][name], strict=True)
        for a, b in pairs:
            for x, y in zip(a["resps"], b["resps"], strict=True):
                if isinstance(x[0], str):
                    assert x == y
                else:
                    assert abs(x[0][0] - y[0][0]) < TOL and x[0][1] == y[0][1]


def test_offline_tasks_give_the_same_numbers_in_process_and_served(
        lm: BambaEvalLM, tasks: Path, server: str, checkpoint: Path) -> None:
    ours = evaluate(lm, tasks)
    assert ours["results"]["tiny_mc"]["sample_len"] == len(MC)
    choices = [r[0][0] for r in ours["samples"]["tiny_mc"][0]["resps"]]
    assert len(set(choices)) == 4  # real, distinct scores
    served = evaluate("local-completions", tasks,
                      model_args={**api_args(server, checkpoint, "completions"),
                                  "batch_size": 4})
    assert_same_numbers(ours, served, TASKS)
    chat_ours = evaluate(lm, tasks, names=["tiny_gen"], apply_chat_template=True)
    chat_served = evaluate("local-chat-completions", tasks, names=["tiny_gen"],
                           apply_chat_template=True,
                           model_args={**api_args(server, checkpoint, "chat/completions"),
                                       "tokenizer_backend": None})
    assert_same_numbers(chat_ours, chat_served, ["tiny_gen"])
    prompt = chat_ours["samples"]["tiny_gen"][0]["arguments"]
    assert "<|assistant|>" in json.dumps(prompt)  # the chat template rendered the prompt


# ---- the CLI ----------------------------------------------------------------------------------
def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_harness.configure(parser)
    return parser.parse_args(list(argv))


def test_cli_writes_lm_evals_results_json(checkpoint: Path, tasks: Path, lm: BambaEvalLM,
                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = cli_args(str(checkpoint), "--tasks", "tiny_mc", "--include-path", str(tasks),
                    "--only-include-path", "--out", str(out), "--limit", "4",
                    "--log-samples", "--max-model-len", "256")
    assert eval_harness.run(args) == 0
    written = json.loads((out / "results.json").read_text())
    assert written["results"]["tiny_mc"]["sample_len"] == 4
    assert {"configs", "versions", "n-shot", "config"} <= set(written)
    docs = [json.loads(line) for line in (out / "samples_tiny_mc.jsonl").read_text().splitlines()]
    ours = evaluate(lm, tasks, names=["tiny_mc"], limit=4)
    assert written["results"]["tiny_mc"]["acc,none"] == ours["results"]["tiny_mc"]["acc,none"]
    for doc, mine in zip(docs, ours["samples"]["tiny_mc"], strict=True):
        assert doc["doc_id"] == mine["doc_id"]
        for (written_score, written_greedy), (score, greedy) in zip(
                [r[0] for r in doc["resps"]], [r[0] for r in mine["resps"]], strict=True):
            assert abs(written_score - score) < TOL and written_greedy == greedy


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "tiny_mc,no_such_task"], "'no_such_task' does not exist"),
    (["--tasks", ","], "names no task"),
    (["--tasks", "tiny_mc", "--limit", "0"], "--limit"),
])
def test_cli_refuses_unknown_tasks_before_loading(tmp_path: Path, tasks: Path, argv: list[str],
                                                  message: str) -> None:
    args = cli_args(str(tmp_path / "no-model"), *argv, "--include-path", str(tasks),
                    "--only-include-path", "--out", str(tmp_path / "out"))
    with pytest.raises(ValueError, match=message) as error:
        eval_harness.run(args)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_cli_names_a_task_whose_data_cannot_be_fetched_in_one_line(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task over a hub dataset neither cached nor reachable (datasets in offline mode, as
    on a machine without the hub): one line naming the dataset, no traceback, nothing written."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: bamba-tests/no-such-dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n")
    args = cli_args(str(checkpoint), "--tasks", "hub_task", "--include-path", str(tasks),
                    "--only-include-path", "--out", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="bamba-tests/no-such-dataset") as error:
        eval_harness.run(args)
    assert "\n" not in str(error.value) and "--include-path" in str(error.value)
    assert not (tmp_path / "out").exists()


# ---- slow: the same run against a `bamba serve` process ----------------------------------------
@pytest.mark.slow
def test_local_completions_against_a_bamba_serve_process(lm: BambaEvalLM, tasks: Path,
                                                         checkpoint: Path) -> None:
    from test_serve_cli import _free_port, _wait_healthy

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bamba.cli", "serve", str(checkpoint), "--port", str(port),
         "--served-model-name", NAME, "--dtype", "float32", "--memory-gb", "0.005",
         "--max-model-len", "256", "--threads", "2", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(server, f"{base}/health")
        served = evaluate("local-completions", tasks,
                          model_args={**api_args(base, checkpoint, "completions"),
                                      "batch_size": 2})
        assert_same_numbers(evaluate(lm, tasks), served, TASKS)
    finally:
        server.terminate()
        server.communicate(timeout=30)
