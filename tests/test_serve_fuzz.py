"""Property-based fuzzing of the HTTP API with schemathesis, driven by the server's own OpenAPI
schema, in process against a real tiny engine: no request may get a 5xx, and after every one
the server is healthy and every KV block and state slot is free again. The default run is
bounded for CI; the ``slow`` one tries many more cases."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

from bamba.engine import LLM  # noqa: E402
from bamba.serve.app import build_app  # noqa: E402
from bamba.serve.async_engine import AsyncEngine  # noqa: E402
from serve_helpers import save_tiny_checkpoint  # noqa: E402

NAME = "tiny"
QUICK, LONG = 25, 400  # examples per operation


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncEngine]:
    directory = save_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpt")
    # a short context keeps the worst generated case (n=128 samples to the end) cheap
    llm = LLM(str(directory), memory_gb=0.002, block_size=4, max_num_seqs=32,
              max_num_batched_tokens=128, max_model_len=48)
    engine = AsyncEngine(llm).start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def app(engine: AsyncEngine) -> Any:
    return build_app(engine, NAME, max_request_bytes=65536)


@pytest.fixture(scope="module")
def api_schema(app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def check_case(case: Any, engine: AsyncEngine) -> None:
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = NAME  # otherwise nearly every body stops at "unknown model"
    response = case.call()
    assert response.status_code < 500, (case.body, response.text)
    deadline = time.monotonic() + 30
    while engine.llm.has_unfinished_requests() or not _pools_free(engine):
        assert time.monotonic() < deadline, engine.llm.stats()
        time.sleep(0.02)
    assert engine.alive


def _pools_free(engine: AsyncEngine) -> bool:
    s = engine.llm.stats()
    return s.num_free_blocks == s.num_blocks and s.num_free_slots == s.num_slots


def fuzz(api_schema: Any, engine: AsyncEngine, examples: int) -> int:
    """Run ``examples`` cases that fit the schema and as many that do not against every
    operation; returns how many ran."""
    ran = 0
    operations = [result.ok() for result in api_schema.get_all_operations()]
    runs = [(op, mode) for op in operations  # a GET without parameters has no wrong inputs
            for mode in (GenerationMode if op.method.upper() == "POST"
                         else [GenerationMode.POSITIVE])]
    for operation, mode in runs:

        @given(case=operation.as_strategy(mode))
        @settings(deadline=None, derandomize=True, database=None, max_examples=examples,
                  suppress_health_check=list(HealthCheck))
        def one(case: Any) -> None:
            nonlocal ran
            check_case(case, engine)
            ran += 1

        one()
    return ran


def healthy(app: Any) -> bool:
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        return client.get("/health").json() == {"status": "ok"}


def test_fuzz_api_never_5xx_and_frees_everything(app: Any, api_schema: Any,
                                                 engine: AsyncEngine) -> None:
    assert fuzz(api_schema, engine, QUICK) >= QUICK * 4  # both generation routes, both modes
    assert healthy(app)


@pytest.mark.slow
def test_fuzz_api_long(app: Any, api_schema: Any, engine: AsyncEngine) -> None:
    fuzz(api_schema, engine, LONG)
    assert healthy(app)
