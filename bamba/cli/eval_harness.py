"""``bamba eval lm-eval MODEL --tasks T1,T2 --out DIR``: lm-evaluation-harness tasks on a bamba
model, in this process (the "bamba" lm-eval model: ``bamba.eval.harness``).

Writes DIR/results.json as lm-eval serialises its results (and, with --log-samples,
DIR/samples_TASK.jsonl). Local YAML tasks come in with --include-path. A task name lm-eval
does not know fails before the model loads.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from bamba.data.shards import atomic_write_bytes

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR_OR_ID", help="checkpoint directory or hub id")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated lm-eval task (or group) names")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="directory for results.json (and the samples)")
    parser.add_argument("--include-path", default=None, metavar="DIR",
                        help="a directory of extra task YAMLs (local tasks)")
    parser.add_argument("--only-include-path", action="store_true",
                        help="know only the tasks under --include-path (skips indexing "
                             "lm-eval's built-in tasks)")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task at most (a fraction when below 1)")
    parser.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                        help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows of one scoring forward")
    parser.add_argument("--max-gen-toks", type=int, default=256,
                        help="tokens a generation task may produce, unless the task says")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="render prompts with the tokenizer's chat template")
    parser.add_argument("--log-samples", action="store_true",
                        help="also write every document's prompt, responses and metrics")
    parser.add_argument("--seed", type=int, default=1234,
                        help="lm-eval's seeds and the sampling seed of generations")
    parser.add_argument("--dtype", default=None,
                        help="weights dtype (default: float32 for scoring)")
    parser.add_argument("--memory-gb", type=float, default=2.0,
                        help="GB (10^9 bytes) for the engine's KV blocks and state slots")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: the model's)")


def task_names(tasks: str, include_path: str | None,
               builtin: bool = True) -> tuple[list[str], Any]:
    """The task names asked for and lm-eval's TaskManager (over ``include_path`` and, with
    ``builtin``, lm-eval's own tasks); ValueError naming an unknown task."""
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks names no task")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: no such directory")
    if not builtin and include_path is None:
        raise ValueError("--only-include-path needs --include-path")
    manager = TaskManager(include_path=include_path, include_defaults=builtin)
    for name in names:
        if not manager.match_tasks([name]):
            raise ValueError(f"lm-eval task {name!r} does not exist")
    return names, manager


def run(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.utils import handle_non_serializable
    except ImportError as exc:
        raise ValueError(f"bamba eval lm-eval needs the eval extra (pip install "
                         f"'bamba[eval]'): {exc}") from None
    if args.limit is not None and not args.limit > 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    names, manager = task_names(args.tasks, args.include_path, not args.only_include_path)
    from bamba.eval.harness import BambaEvalLM

    model = BambaEvalLM(args.model, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
                        dtype=args.dtype, memory_gb=args.memory_gb,
                        max_model_len=args.max_model_len, seed=args.seed)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    try:
        results = lm_eval.simple_evaluate(
            model=model, tasks=names, task_manager=manager, num_fewshot=args.num_fewshot,
            limit=limit, log_samples=args.log_samples,
            apply_chat_template=args.apply_chat_template, random_seed=args.seed,
            numpy_random_seed=args.seed, torch_random_seed=args.seed,
            fewshot_random_seed=args.seed)
    except ConnectionError as exc:  # datasets' words for a task's data it cannot fetch
        raise ValueError(f"a task's data is neither in the datasets cache nor reachable: {exc} "
                         f"(tasks over local files: --include-path)") from None
    samples = results.pop("samples", {}) if args.log_samples else {}
    args.out.mkdir(parents=True, exist_ok=True)
    dumped = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    atomic_write_bytes(args.out / "results.json", dumped.encode())
    for task, docs in samples.items():
        lines = [json.dumps(d, default=handle_non_serializable, ensure_ascii=False) for d in docs]
        atomic_write_bytes(args.out / f"samples_{task}.jsonl",
                           "".join(f"{x}\n" for x in lines).encode())
    from lm_eval.utils import make_table

    print(make_table(results))
    log.info("wrote %s", args.out / "results.json")
    return 0
