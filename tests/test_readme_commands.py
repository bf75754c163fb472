"""Every shell command in README.md's ```bash blocks runs, as written, so an example cannot rot.

How they run: in README order, each through ``bash -c`` in a temp directory that links ``configs``
to the clone's (the README's commands run from the clone), with ``HOME`` a temp directory in
which a short ``bamba demo`` ran first (the README's commands follow its set-up, and several use
the demo's checkpoint), and ``BAMBA_CACHE`` kept so the native kernels are not rebuilt.

Two explicit tables change what runs, each entry with its reason, and each must still match a
README command (so they cannot go stale): ``EXCLUDED`` commands do not run here, ``SHORTER``
replaces a piece of a command with smaller options. A command that serves (``bamba serve``) runs
until its /health answers, then is stopped.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK = "--steps=2 --warmup_steps=1 --seq_len=64 --progress=false"

EXCLUDED = {
    "bash scripts/demo.sh": ".ci/run runs it first on a clean clone, fresh venv and empty HOME",
    "bash scripts/test.sh": ".ci/run runs it after the demo (it runs this test)",
}
# (piece of a README command, what runs instead, why)
SHORTER = [
    ("--set steps=300", "--set steps=2 --set seq_len=64 --set batch_size=2 --set warmup_steps=1"
     " --set progress=false", "300 training steps take minutes"),
    ("--max-files 50", "--max-files 5", "fewer files to train the tokenizer on"),
    ("--steps=100", QUICK, "100 training steps take minutes"),
    ("--out_dir=runs/x2", f"--out_dir=runs/x2 {QUICK}", "the config's 60 steps, twice over"),
    ("--init_from=$HOME/.cache/bamba/demo/train/hf",
     f"--init_from=$HOME/.cache/bamba/demo/train/hf {QUICK}", "the config's 50 steps"),
    ("--port 8000", "--port {port}", "port 8000 may be taken on a shared machine"),
]
SERVING = "bamba serve "


def without_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a shell comment (outside quotes, after a blank)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r" {2,}", " ", without_comment(line.strip()))
            if command:
                commands.append(command)
    return commands


COMMANDS = readme_commands((REPO / "README.md").read_text())


def to_run(command: str) -> str:
    for piece, replacement, _ in SHORTER:
        command = command.replace(piece, replacement)
    return command


def test_tables_match_the_readme() -> None:
    assert len(COMMANDS) >= 9
    assert set(EXCLUDED) <= set(COMMANDS), set(EXCLUDED) - set(COMMANDS)
    for piece, _, _ in SHORTER:
        assert any(piece in command for command in COMMANDS), f"{piece!r} is in no command"


def test_commands_are_extracted_whole() -> None:
    text = ("x\n```bash\nbamba a \\\n    --b 1   # note\n# comment\n\nbamba c --p \"a # b\"\n```"
            "\n```python\nno\n```\n")
    assert readme_commands(text) == ["bamba a --b 1", 'bamba c --p "a # b"']


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(working directory, environment) after a short default demo in a fresh HOME."""
    tmp = tmp_path_factory.mktemp("readme")
    work, home = tmp / "work", tmp / "home"
    work.mkdir()
    home.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "BAMBA_CACHE": os.environ.get("BAMBA_CACHE", str(Path.home() / ".cache" / "bamba"))}
    env.pop("BAMBA_DEMO_DIR", None)
    demo = ["bamba", "demo", "--max-new-tokens", "4",
            *(f"--set={item.removeprefix('--')}" for item in QUICK.split())]
    subprocess.run(demo, cwd=work, env=env, check=True, timeout=900, capture_output=True)
    return work, env


def serve_until_healthy(command: str, work: Path, env: dict[str, str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["bash", "-c", "exec " + command.format(port=port)], cwd=work,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert r.status == 200
                    return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"{command}: no /health answer (rc {proc.poll()})")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in EXCLUDED],
                         ids=lambda c: c[:60])
def test_readme_command_runs(command: str, readme_env) -> None:
    work, env = readme_env
    if command.startswith(SERVING):
        serve_until_healthy(to_run(command), work, env)
        return
    out = subprocess.run(["bash", "-c", to_run(command)], cwd=work, env=env, timeout=900,
                         capture_output=True, text=True)
    assert out.returncode == 0, f"{to_run(command)}\n{out.stderr[-3000:]}"
