"""What a non-editable install holds and what the demo's install brings: the built wheel carries
the configs (package data), and the demo runs from that wheel, outside the source tree, with
only the packages `scripts/demo.sh` installs (core dependencies + its extras)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["bamba/configs/stdlib-demo.yaml", "bamba/configs/tiny-demo.yaml",
           "bamba/configs/tiny-finetune.yaml", "bamba/configs/chat-example.jsonl",
           "bamba/native/layer_step.c"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel from a copy of the source (the tree itself stays clean)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO / "bamba", src / "bamba",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp / "dist"), str(src)],
                   check=True, timeout=300, capture_output=True)
    (built,) = (tmp / "dist").glob("bamba-*.whl")
    return built


def test_wheel_ships_the_configs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED) <= names, sorted(set(SHIPPED) - names)


def demo_install_modules() -> tuple[set[str], set[str]]:
    """(import names the demo's install brings, import names of the other extras only), from
    pyproject.toml and the extras scripts/demo.sh passes to scripts/install.sh."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    match = re.search(r"scripts/install\.sh\s+([\w,]+)", (REPO / "scripts/demo.sh").read_text())
    extras = match.group(1).split(",") if match else []

    def names(requirements: list[str]) -> set[str]:
        dists = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}
        return {"yaml" if d == "pyyaml" else d.replace("-", "_") for d in dists
                if not d.startswith("bamba")}

    brought = names(project["dependencies"])
    for extra in extras:
        brought |= names(project["optional-dependencies"][extra])
    others = set().union(*(names(reqs) for reqs in project["optional-dependencies"].values()))
    return brought, others - brought


def test_demo_install_brings_pyarrow_and_matplotlib() -> None:
    brought, _ = demo_install_modules()
    assert {"pyarrow", "matplotlib"} <= brought


BLOCKED_DEMO = """
    import importlib.abc, importlib.machinery, sys
    BLOCKED = set(sys.argv[1].split(","))
    class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # A spec without an origin whose loading fails: importing a blocked package raises
        # ModuleNotFoundError, while a probe that only reads the spec's origin (torch._dynamo
        # asks find_spec about optional packages) sees no installed file.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, self)
        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r} (not in the demo's install)",
                                      name=spec.name)
        def exec_module(self, module):
            raise AssertionError("unreachable: create_module raised")
    sys.meta_path.insert(0, Block())
    import bamba
    assert bamba.__file__.startswith(sys.argv[2]), bamba.__file__
    from bamba.cli import main
    sys.exit(main(["demo", *sys.argv[3:]]))
"""


def test_installed_wheel_runs_the_demo_with_the_demo_install_only(
        wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheel)], check=True, timeout=300,
                   capture_output=True)
    _, blocked = demo_install_modules()
    work = tmp_path / "elsewhere"  # not the source tree: no configs/ below the current directory
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(tmp_path / "home"),
           "BAMBA_CACHE": os.environ.get("BAMBA_CACHE", str(Path.home() / ".cache" / "bamba"))}
    quick = ["--dir", str(tmp_path / "demo"), "--max-files", "4", "--workers", "1",
             "--max-new-tokens", "4", "--set", "steps=2", "--set", "seq_len=64",
             "--set", "batch_size=2", "--set", "warmup_steps=1", "--set", "progress=false"]
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(BLOCKED_DEMO),
                          ",".join(sorted(blocked)), str(site), *quick],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss" in out.stdout and "checkpoint:" in out.stdout
    help_text = subprocess.run([sys.executable, "-m", "bamba.cli", "demo", "--help"], cwd=work,
                               env=env, capture_output=True, text=True, timeout=120).stdout
    assert "stdlib-demo.yaml" in help_text
