"""llama.cpp's binaries (llama-server, llama-bench, llama-quantize) as peers, on the same weights.

``find_or_build(tool=)`` returns a llama.cpp binary (``llama-server`` by default; $LLAMA_SERVER
if set), else the one built before in ``~/.cache/bamba/llama.cpp/<version>/build/bin``, else it
builds that target there: the
``llama-cpp-python`` sdist from PyPI (``pip download --no-binary :all:``) carries llama.cpp's
source in vendor/llama.cpp; cmake, Release, CPU only, ``-DGGML_NATIVE=ON`` (the first target
about 20-40 minutes on 2 cores, a further one a few; the log is build.log next to it).

``convert(checkpoint, out)`` writes a GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` from
the same sdist (its ``gguf-py`` on the path). The converter knows a BPE tokenizer's
pre-tokenizer only by the hash of its output on a test text, so it refuses any tokenizer trained
for a benchmark ("BPE pre-tokenizer was not recognized"); ours splits text as GPT-2 does
(byte-level, GPT-2's regex), so it is told "gpt-2". Prompts are sent as token ids anyway.
For a ``llama`` checkpoint (the all-attention twin) the converter tries SentencePiece first and
fails on the missing ``sentencepiece`` module before looking for a ``tokenizer.model``; told
that there is none, it takes its BPE path as for the hybrid.

Every failure raises ``PeerMissing`` with one line saying why, so the benchmark can record it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

VERSION = "0.3.36"  # llama-cpp-python sdist whose vendor/llama.cpp is built
CACHE = Path(os.environ.get("BAMBA_LLAMA_CPP_CACHE",
                            Path.home() / ".cache" / "bamba" / "llama.cpp")) / VERSION
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF",
                 "-DGGML_METAL=OFF")
CONVERT = """import runpy, sys
sys.path.insert(0, sys.argv[1])
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sentencepiece = TextModel._set_vocab_sentencepiece
def no_sentencepiece_model(self, *args, **kwargs):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")
    return sentencepiece(self, *args, **kwargs)
TextModel._set_vocab_sentencepiece = no_sentencepiece_model
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class PeerMissing(RuntimeError):
    """llama-server cannot be found, built, or made to serve the model."""


def source_dir(cache: Path | None = None) -> Path:
    """llama.cpp's source from the sdist (downloaded and unpacked once)."""
    cache = cache or CACHE
    source = cache / "sdist" / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    cache.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={VERSION}", "-d", str(cache)], cache / "download.log", 900)
    archive = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.is_file():
        raise PeerMissing(f"pip download left no {archive.name} in {cache}")
    unpacked = cache / "unpack.tmp"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    os.replace(unpacked / f"llama_cpp_python-{VERSION}", cache / "sdist")
    shutil.rmtree(unpacked, ignore_errors=True)
    if not source.is_dir():
        raise PeerMissing(f"the sdist has no vendor/llama.cpp ({cache / 'sdist'})")
    return source


def find_or_build(cache: Path | None = None, build: bool = True,
                  tool: str = "llama-server") -> Path:
    """The binary of a llama.cpp ``tool`` (llama-server, llama-bench, llama-quantize, ...):
    $LLAMA_SERVER for the server if set, the cached build, or a new build of that target."""
    cache = cache or CACHE
    if tool == "llama-server" and os.environ.get("LLAMA_SERVER"):
        binary = Path(os.environ["LLAMA_SERVER"])
        if not os.access(binary, os.X_OK):
            raise PeerMissing(f"$LLAMA_SERVER={binary} is not an executable file")
        return binary
    binary = cache / "build" / "bin" / tool
    if os.access(binary, os.X_OK):
        return binary
    if not build:
        raise PeerMissing(f"no {tool} in {binary.parent} and building is off")
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        raise PeerMissing(f"building {tool} needs cmake and a C++ compiler")
    source, log = source_dir(cache), cache / "build.log"
    if not (cache / "build" / "CMakeCache.txt").is_file():
        _run(["cmake", "-S", str(source), "-B", str(cache / "build"), *CMAKE_OPTIONS], log, 600)
    _run(["cmake", "--build", str(cache / "build"), "--config", "Release", "--target",
          tool, "-j", str(os.cpu_count() or 1)], log, 4 * 3600)
    if not os.access(binary, os.X_OK):
        raise PeerMissing(f"the build finished without {binary} (see {log})")
    return binary


def convert(checkpoint: Path, out: Path, outtype: str, cache: Path | None = None) -> Path:
    """A GGUF of ``checkpoint`` (``outtype``: bf16, f16, f32, q8_0) by llama.cpp's converter."""
    source = source_dir(cache)
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    log = out.with_suffix(".log")
    _run([sys.executable, "-c", CONVERT, str(source), str(checkpoint), "--outfile", str(out),
          "--outtype", outtype], log, 1800, env)
    if not out.is_file():
        raise PeerMissing(f"the converter wrote no {out.name} (see {log})")
    return out


def start(binary: Path, gguf: Path, port: int, threads: int, slots: int, slot_tokens: int
          ) -> subprocess.Popen:
    """``llama-server`` on 127.0.0.1:port with ``slots`` parallel sequences of
    ``slot_tokens`` context each (and as many HTTP threads); returns once /health answers 200."""
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(slots),
           "-c", str(slots * slot_tokens), "--no-webui",
           # one HTTP thread per client at least: with its default (one per core) a streaming
           # client beyond the first few had its connection closed without a response
           "--threads-http", str(slots + 8)]
    log = open(gguf.with_suffix(".server.log"), "w")  # noqa: SIM115 (kept open for the child)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    why = wait_healthy(proc, port)
    if why is not None:
        tail = gguf.with_suffix(".server.log").read_text(errors="replace").strip()
        raise PeerMissing(f"llama-server {why}: {tail.splitlines()[-1] if tail else 'no output'}")
    return proc


def wait_healthy(proc: subprocess.Popen, port: int, seconds: float = 300) -> str | None:
    """None once http://127.0.0.1:port/health answers 200, else why not (the server exited,
    or is killed after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return None
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    return f"did not answer /health within {seconds:g} s"


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> None:
    with open(log, "a") as out:
        try:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=env, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerMissing(f"{Path(cmd[0]).name} failed: {exc}") from None
    if done.returncode != 0:
        last = log.read_text(errors="replace").strip().splitlines()
        raise PeerMissing(f"{' '.join(cmd[:3])} ... exited with {done.returncode}: "
                          f"{last[-1] if last else 'no output'} (see {log})")
