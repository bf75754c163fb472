"""Property-based fuzzing of the HTTP API with schemathesis, driven by the server's own OpenAPI
schema, in process against a real tiny engine: no request may get a 5xx, and after every one
the server is healthy and every KV block and state slot is free again. The default run is
bounded for CI; the ``slow`` one tries many more cases."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
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
    _wait_free(engine)


def _wait_free(engine: AsyncEngine) -> None:
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


# magnitudes spread evenly over float64's exponents (float32 overflows above 3.4e38 and rounds
# to 0 below 1.4e-45), plus whatever hypothesis's own floats try (NaN, infinities, edges)
ANY_MAGNITUDE = st.builds(lambda m, e: m * 10.0 ** e, st.floats(-10, 10),
                          st.integers(-320, 307)) | st.floats()
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty")


def test_sampling_values_of_any_magnitude_never_5xx(app: Any, engine: AsyncEngine) -> None:
    """Schema-driven cases rarely pair one extreme number with an otherwise valid body; this
    does: every float field, any magnitude, NaN and infinities (Python's JSON carries them)."""
    from starlette.testclient import TestClient

    with TestClient(app) as client:

        @given(values=st.dictionaries(st.sampled_from(FLOAT_FIELDS), ANY_MAGNITUDE, min_size=1,
                                      max_size=2),
               chat=st.booleans(), stream=st.booleans())
        @settings(deadline=None, derandomize=True, database=None, max_examples=QUICK * 4,
                  suppress_health_check=list(HealthCheck))
        def one(values: dict[str, float], chat: bool, stream: bool) -> None:
            body: dict[str, Any] = {"model": NAME, "max_tokens": 3, "stream": stream, **values}
            if chat:
                body["messages"] = [{"role": "user", "content": "hi"}]
            else:
                body["prompt"] = "State space"
            r = client.post("/v1/chat/completions" if chat else "/v1/completions",
                            content=json.dumps(body),  # NaN and Infinity as Python writes them
                            headers={"Content-Type": "application/json"})
            assert r.status_code in (200, 400), (body, r.text)
            assert "error" not in r.text or r.status_code == 400, (body, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["param"] in values
            _wait_free(engine)

        one()


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
