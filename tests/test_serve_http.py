"""`jambalab serve` end to end: a server subprocess on 127.0.0.1, driven by the real `openai` client
(and httpx for raw HTTP), checked against model.generate; plus in-process checks of auth, body
limits and a full queue with FastAPI's TestClient."""

import json
import asyncio
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import jambalab  # noqa: E402
from jambalab.bench.serve_load import MEMORY_OVERHEAD, LoadConfig, ServerProcess, check, run_load  # noqa: E402
from jambalab.generate import generate  # noqa: E402
from jambalab.serve.chat import ChatFormatter  # noqa: E402
from jambalab.tokenizer import ByteTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET, EOS = "tiny-hybrid", 2  # the preset's eos_token_id
MAX_SEQ_LEN = 1024


def start_server(*args: str) -> ServerProcess:
    s = ServerProcess(["--preset", PRESET, "--max-seq-len", str(MAX_SEQ_LEN), *args], ROOT)
    s.client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
    return s


@pytest.fixture(scope="module")
def server():
    s = start_server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def cold_server():
    """A second server: cold for the prefix cache; the last test stops it with SIGTERM."""
    s = start_server("--drain-timeout", "60")
    yield s
    s.close()


@pytest.fixture(scope="module")
def model():
    return jambalab.from_preset(PRESET, seed=0).eval()


def reference(model, ids: list[int], n: int) -> str:
    """What the server must answer greedily: model.generate's new tokens, as text, EOS dropped."""
    new = generate(model, torch.tensor([ids]), n, eos_token_id=EOS)[0, len(ids):].tolist()
    return ByteTokenizer().decode(new[:-1] if new and new[-1] == EOS else new)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, flags=re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def stream_text(client, **kw) -> tuple[str, str | None]:
    text, finish = [], None
    for chunk in client.completions.create(model=PRESET, stream=True, **kw):
        text.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


# ---------------------------------------------------------------------------------------
# The OpenAI client
# ---------------------------------------------------------------------------------------
def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [PRESET]
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}


def test_greedy_completion_equals_generate(server, model):
    r = server.client.completions.create(model=PRESET, prompt="Hello there", max_tokens=16, temperature=0)
    ids = list(b"Hello there")
    assert r.choices[0].text == reference(model, ids, 16)
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    by_ids = server.client.completions.create(model=PRESET, prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_stream_equals_non_stream(server):
    kw = dict(prompt="Streams and", max_tokens=20, temperature=0)
    whole = server.client.completions.create(model=PRESET, **kw).choices[0]
    assert stream_text(server.client, **kw) == (whole.text, whole.finish_reason)
    msgs = [{"role": "user", "content": "Stream?"}]
    chat = server.client.chat.completions.create(model=PRESET, messages=msgs, max_tokens=12, temperature=0)
    parts = list(server.client.chat.completions.create(model=PRESET, messages=msgs, max_tokens=12, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens and parts[-1].choices == []


def test_stop_strings_cut_the_text(server):
    full = server.client.completions.create(model=PRESET, prompt="Stop here", max_tokens=40, temperature=0)
    text = full.choices[0].text
    # a 2-character stop string that first occurs at position p >= 2 of the greedy text
    p = next(p for p in range(2, len(text) - 2) if text.find(text[p:p + 2]) == p)
    stop = text[p:p + 2]
    r = server.client.completions.create(model=PRESET, prompt="Stop here", max_tokens=40, temperature=0,
                                         stop=["never-seen", stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text[:p], "stop")
    assert r.usage.completion_tokens < full.usage.completion_tokens
    assert stream_text(server.client, prompt="Stop here", max_tokens=40, temperature=0, stop=stop) == (text[:p], "stop")


def test_seeded_sampling_is_reproducible(server):
    def sample(seed):
        return server.client.completions.create(model=PRESET, prompt="Dice", max_tokens=16, temperature=1.0,
                                                top_p=0.95, seed=seed, extra_body={"top_k": 50}).choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_chat_uses_the_template(server, model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = server.client.chat.completions.create(model=PRESET, messages=msgs, max_tokens=10, temperature=0)
    ids = ChatFormatter.for_tokenizer(ByteTokenizer()).encode(msgs)
    assert r.choices[0].message.content == reference(model, ids, 10)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.role == "assistant"


def test_logprobs(server):
    r = server.client.completions.create(model=PRESET, prompt="abc", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(abs(v - max(top.values())) < 1e-5 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
    c = server.client.chat.completions.create(model=PRESET, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    assert len(c.choices[0].logprobs.content) == 3
    assert all(len(t.top_logprobs) == 2 for t in c.choices[0].logprobs.content)


def test_eight_concurrent_streams_each_get_their_solo_output(server):
    prompts = [f"Request number {i} says" + " more" * i for i in range(8)]
    solo = [server.client.completions.create(model=PRESET, prompt=p, max_tokens=24, temperature=0).choices[0].text
            for p in prompts]
    out: dict[int, tuple[str, str | None]] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, stream_text(
        server.client, prompt=prompts[i], max_tokens=24, temperature=0))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out[i][0] for i in range(8)] == solo


def test_second_chat_turn_reuses_the_prefix_cache(server, cold_server):
    turn1 = [{"role": "user", "content": "Tell me about hybrid models."}]
    reply = server.client.chat.completions.create(model=PRESET, messages=turn1, max_tokens=8, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    warm = server.client.chat.completions.create(model=PRESET, messages=turn2, max_tokens=8, temperature=0)
    cold = cold_server.client.chat.completions.create(model=PRESET, messages=turn2, max_tokens=8, temperature=0)
    assert warm.usage.prompt_tokens_details.cached_tokens > 0
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.choices[0].message.content == cold.choices[0].message.content


def test_disconnect_mid_stream_frees_the_slot(server, model):
    cancelled = 'jambalab_requests_total{endpoint="completions",finish_reason="cancelled"}'
    before = metric(server.url, cancelled)
    body = dict(model=PRESET, prompt="Long one", max_tokens=MAX_SEQ_LEN - 16, temperature=0, stream=True)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as leaving:
            lines = leaving.iter_lines()
            got = [next(lines) for _ in range(3)]  # a few chunks, then hang up
        other = server.client.completions.create(model=PRESET, prompt="Other", max_tokens=12, temperature=0)
    assert any(line.startswith("data: {") for line in got)
    assert other.choices[0].text == reference(model, list(b"Other"), 12)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (metric(server.url, "jambalab_engine_running") > 0
                                           or metric(server.url, cancelled) == before):
        time.sleep(0.1)
    assert metric(server.url, cancelled) == before + 1
    assert metric(server.url, "jambalab_engine_running") == 0
    assert metric(server.url, "jambalab_engine_free_slots") == 8


# ---------------------------------------------------------------------------------------
# Bad input: 400 (404 for the model) with OpenAI's error object naming the field
# ---------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b'{"prompt": "x", ', 400, None),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.01}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 512]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * (MAX_SEQ_LEN + 1)}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "model": "other"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * MAX_SEQ_LEN}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
]


def test_bad_input_answers_an_error_object_naming_the_field(server, model):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, status, param in BAD:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (body, err)
            assert "Traceback" not in r.text
        assert http.get("/v1/nope").status_code == 404 and "error" in http.get("/v1/nope").json()
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=PRESET, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    # nothing above disturbed the server
    r = server.client.completions.create(model=PRESET, prompt="Still fine", max_tokens=6, temperature=0)
    assert r.choices[0].text == reference(model, list(b"Still fine"), 6)


def test_short_load_with_cancels_and_malformed_requests(server):
    """benchmarks/serve_load.py in short: 12 clients for 3 s; greedy answers equal their solo runs,
    the engine returns to idle, /metrics counts equal the clients', memory stays bounded."""
    cfg = LoadConfig(clients=12, duration_s=3.0, cancel_tokens=300, weights=(0.3, 0.15, 0.2, 0.15, 0.2))
    report = asyncio.run(run_load(server.url, PRESET, cfg, pid=server.proc.pid))
    assert check(report, prefix_budget=256 * 2**20, memory_budget=256 * 2**20 + MEMORY_OVERHEAD) == []
    assert report["outcomes"].get("cancel hung up", 0) >= 1 and report["idle_after"]["free_slots"] == 8


# ---------------------------------------------------------------------------------------
# Shutdown (last: it stops cold_server)
# ---------------------------------------------------------------------------------------
def test_sigterm_drains_running_streams_then_exits_0(cold_server):
    chunks, first = [], threading.Event()

    def consume():
        body = dict(model=PRESET, prompt="Drain me", max_tokens=60, temperature=0, stream=True)
        with httpx.stream("POST", f"{cold_server.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                chunks.append(line)
                first.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(60)
    cold_server.proc.send_signal(signal.SIGTERM)
    reader.join(60)
    assert cold_server.proc.wait(60) == 0
    data = [c.removeprefix("data: ") for c in chunks if c.startswith("data: ")]
    assert data[-1] == "[DONE]"
    finish = [json.loads(d)["choices"][0].get("finish_reason") for d in data[:-1]]
    assert finish[-1] in ("stop", "length") and "jambalab serve: stopped" in cold_server.proc.stdout.read()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{cold_server.url}/health", timeout=5)
