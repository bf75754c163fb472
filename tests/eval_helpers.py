"""What the ``bamba eval`` command tests share: running a subcommand, checking a refusal."""

from __future__ import annotations

from typing import Any

from bamba.cli import main


def run_eval(subcommand: str, argv: list[str], capsys: Any) -> tuple[int, Any]:
    """(exit code, captured output) of ``bamba eval SUBCOMMAND argv --threads 1``."""
    capsys.readouterr()  # drop what making the checkpoint printed
    code = main(["eval", subcommand, *argv, "--threads", "1"])
    return code, capsys.readouterr()


def assert_one_line_error(code: int, captured: Any, *fragments: str) -> None:
    """Exit code 2 and one stderr line ``bamba eval: error: ...`` holding every fragment."""
    assert code == 2
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bamba eval: error:"), captured.err
    for fragment in fragments:
        assert fragment in err[0]
