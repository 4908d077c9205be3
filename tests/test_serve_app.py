"""The HTTP app in-process (FastAPI's TestClient) on a real engine: API key, body limit, full queue,
metrics text."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

import jambalab  # noqa: E402
from jambalab.serve.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from jambalab.serve.http import ServerConfig, create_app  # noqa: E402
from jambalab.tokenizer import ByteTokenizer  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def model():
    return jambalab.from_preset("tiny-hybrid", seed=0).eval()


def _app(engine, **kw):
    cfg = ServerConfig(model_name="tiny", max_model_len=64, vocab_size=512, **kw)
    return create_app(engine, ByteTokenizer(eos_token_id=2), cfg)


def test_api_key_guards_everything_but_health(model):
    with Engine(model, EngineConfig(max_batch=2, max_seq_len=64)) as engine:
        client = TestClient(_app(engine, api_key=KEY))
        assert client.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/v1/nothing"):
            r = client.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        body = {"prompt": "hi", "max_tokens": 2}
        assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/completions", json=body, headers={"Authorization": KEY}).status_code == 401
        ok = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_body_over_the_limit_is_413(model):
    with Engine(model, EngineConfig(max_batch=2, max_seq_len=64)) as engine:
        client = TestClient(_app(engine, max_body_bytes=1000))
        r = client.post("/v1/completions", json={"prompt": "x" * 2000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'
        r = client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_full_queue_is_503_with_retry_after(model):
    engine = Engine(model, EngineConfig(max_batch=1, max_seq_len=64, max_waiting=1))  # not started: nothing runs
    engine.submit([1, 2, 3], SamplingParams(max_tokens=2))  # fills the waiting queue
    client = TestClient(_app(engine, retry_after_s=3))
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "queue_full"
    text = client.get("/metrics").text
    assert 'jambalab_http_requests_total{path="/v1/completions",status="503"} 1.0' in text
    assert "jambalab_engine_waiting 1.0" in text
    engine.stop(drain=False)


def test_metrics_count_requests_tokens_and_latency(model):
    with Engine(model, EngineConfig(max_batch=2, max_seq_len=64)) as engine:
        client = TestClient(_app(engine))
        r = client.post("/v1/completions", json={"prompt": "abcd", "max_tokens": 5, "temperature": 0})
        n = r.json()["usage"]["completion_tokens"]
        client.post("/v1/completions", json={"prompt": "x", "temperature": -1})
        text = client.get("/metrics").text
        assert 'jambalab_http_requests_total{path="/v1/completions",status="200"} 1.0' in text
        assert 'jambalab_http_requests_total{path="/v1/completions",status="400"} 1.0' in text
        assert "jambalab_prompt_tokens_total 4.0" in text and f"jambalab_generation_tokens_total {n}.0" in text
        assert "jambalab_time_to_first_token_seconds_count 1.0" in text
        assert f"jambalab_time_per_output_token_seconds_count {n - 1}.0" in text
        assert "jambalab_engine_prefix_lookups_total 1.0" in text
