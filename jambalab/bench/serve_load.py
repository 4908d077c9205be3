"""Load and fault test of `jambalab serve`: many concurrent clients for a bounded time, then checks.

    report = asyncio.run(run_load(url, model_name, LoadConfig(clients=32, duration_s=30)))
    problems = check(report)          # [] when everything held

Each client loops until the deadline, picking (seeded) one of:
    short      greedy completion of a short prompt, one JSON answer
    long       greedy completion of a long prompt, streamed
    chat       greedy chat completion, streamed
    cancel     a long streamed completion the client hangs up on after a few chunks
    malformed  a bad request (broken JSON, wrong types, out-of-range values, unknown model, ...)
Greedy answers are compared with the same request run alone on the idle server before the load
(its "solo" answer): batching must not change a single token. Afterwards the server must be back
to its idle baseline (no running or waiting request, every slot free, no KV token in use), the
prefix cache within its byte budget, the HTTP counts in /metrics equal to what the clients got,
and (when this process started the server) its peak RSS within the configured budgets plus
MEMORY_OVERHEAD.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

MEMORY_OVERHEAD = 512 * 2**20  # activations of a step, allocator slack, Python objects, HTTP buffers
KINDS = ("short", "long", "chat", "cancel", "malformed")
IDLE_KEYS = ("running", "waiting", "free_slots", "kv_tokens_used", "kv_tokens_reserved")


@dataclass
class LoadConfig:
    clients: int = 32
    duration_s: float = 30.0
    seed: int = 0
    weights: tuple[float, ...] = (0.35, 0.2, 0.2, 0.1, 0.15)  # of KINDS
    short_tokens: int = 12
    long_tokens: int = 24
    cancel_tokens: int = 400
    cancel_after_chunks: int = 3
    n_prompts: int = 6  # distinct prompts of each kind
    request_timeout_s: float = 300.0


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------
def _words(rng: random.Random, n: int) -> str:
    vocab = "state space model hybrid attention mamba layer token cache prefix batch stream é ü € 😀".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_requests(cfg: LoadConfig, model: str) -> dict[str, list[tuple[str, dict]]]:
    """Per kind, the (path, body) pool the clients draw from."""
    rng = random.Random(cfg.seed)
    short = [("/v1/completions", dict(model=model, prompt=_words(rng, rng.randint(2, 8)),
                                      max_tokens=cfg.short_tokens, temperature=0)) for _ in range(cfg.n_prompts)]
    long = [("/v1/completions", dict(model=model, prompt=_words(rng, rng.randint(40, 120)),
                                     max_tokens=cfg.long_tokens, temperature=0, stream=True))
            for _ in range(cfg.n_prompts)]
    chat = [("/v1/chat/completions", dict(model=model, max_tokens=cfg.short_tokens, temperature=0, stream=True,
                                          messages=[{"role": "system", "content": "Answer briefly."},
                                                    {"role": "user", "content": _words(rng, rng.randint(3, 30))}]))
            for _ in range(cfg.n_prompts)]
    cancel = [("/v1/completions", dict(model=model, prompt=_words(rng, 20), max_tokens=cfg.cancel_tokens,
                                       temperature=0, stream=True))]
    malformed = [
        ("/v1/completions", b'{"prompt": "broken'),
        ("/v1/completions", dict(model=model, prompt="x", temperature=-1)),
        ("/v1/completions", dict(model=model, prompt="x", max_tokens="many")),
        ("/v1/completions", dict(model=model, prompt=[1, 2, 10**9])),
        ("/v1/completions", dict(model=model, prompt="")),
        ("/v1/completions", dict(model="no-such-model", prompt="x")),
        ("/v1/completions", dict(model=model, prompt="x", n=3)),
        ("/v1/chat/completions", dict(model=model, messages=[])),
        ("/v1/chat/completions", dict(model=model, messages=[{"role": "user", "content": "x"}], top_p=2)),
    ]
    return dict(short=short, long=long, chat=chat, cancel=cancel, malformed=malformed)


def _content(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


async def _send(http, path: str, body, cancel_after: int | None = None) -> tuple[int, str | None, dict | None]:
    """(status, text or None, error object or None); streamed bodies are joined; cancel_after hangs up."""
    streamed = isinstance(body, dict) and body.get("stream")
    async with http.stream("POST", path, content=_content(body), headers={"content-type": "application/json"}) as r:
        if r.status_code != 200:
            data = json.loads(await r.aread())
            return r.status_code, None, data.get("error")
        if not streamed:
            data = json.loads(await r.aread())
            choice = data["choices"][0]
            return 200, choice.get("text", choice.get("message", {}).get("content")), None
        parts, n = [], 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 200, None, chunk["error"]
            for c in chunk["choices"]:
                parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
            n += 1
            if cancel_after is not None and n >= cancel_after:
                return 200, None, None  # leaving the block closes the connection mid-stream
        return 200, "".join(parts), None


# ---------------------------------------------------------------------------------------
# Observing the server
# ---------------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """/metrics as {'name{label="v",...}': value} (labels sorted)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def rss_bytes(pid: int) -> dict[str, int]:
    """Resident memory now and at its peak (Linux /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    kib = {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, flags=re.MULTILINE)}
    return {"rss": kib["VmRSS"] * 1024, "peak_rss": kib["VmHWM"] * 1024}


def wait_idle(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(url)
        if (m.get("jambalab_engine_running", 0) == 0 and m.get("jambalab_engine_waiting", 0) == 0) \
                or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------------------
@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome)
    statuses: Counter = field(default_factory=Counter)  # (path, status)
    latency: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    mismatches: list[dict] = field(default_factory=list)


async def _client(http, rng: random.Random, cfg: LoadConfig, pool, solo, deadline: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        kind = rng.choices(KINDS, cfg.weights)[0]
        i = rng.randrange(len(pool[kind]))
        path, body = pool[kind][i]
        t0 = time.perf_counter()
        try:
            status, text, error = await _send(http, path, body, cfg.cancel_after_chunks if kind == "cancel" else None)
        except Exception as e:  # a dropped connection, a timeout, a body that is not JSON
            tally.outcomes[kind, f"exception {type(e).__name__}"] += 1
            continue
        tally.latency[kind].append(time.perf_counter() - t0)
        tally.statuses[path, status] += 1
        if kind == "malformed":
            ok = status in (400, 404) and error is not None and {"message", "type", "param", "code"} <= set(error)
            tally.outcomes[kind, "rejected" if ok else f"not rejected ({status})"] += 1
        elif kind == "cancel":
            tally.outcomes[kind, "hung up" if status == 200 and error is None else f"failed ({status})"] += 1
        elif status != 200 or error is not None:
            tally.outcomes[kind, f"failed ({status})"] += 1
        elif text == solo[kind][i]:
            tally.outcomes[kind, "correct"] += 1
        else:
            tally.outcomes[kind, "WRONG"] += 1
            tally.mismatches.append(dict(kind=kind, index=i, expected=solo[kind][i], got=text))


async def _solo(http, path: str, body: dict) -> str:
    status, text, error = await _send(http, path, body)
    if status != 200 or text is None:
        raise RuntimeError(f"the reference request failed alone ({status}: {error}): {body}")
    return text


async def run_load(url: str, model: str, cfg: LoadConfig, pid: int | None = None) -> dict:
    import httpx

    pool = make_requests(cfg, model)
    limits = httpx.Limits(max_connections=cfg.clients + 4, max_keepalive_connections=cfg.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=cfg.request_timeout_s, limits=limits) as http:
        solo = {k: [await _solo(http, p, b) for p, b in pool[k]] for k in ("short", "long", "chat")}
        idle_before = wait_idle(url)
        mem_before = rss_bytes(pid) if pid else None
        tally, t0 = Tally(), time.perf_counter()
        deadline = time.monotonic() + cfg.duration_s
        rngs = [random.Random(cfg.seed * 1000 + c) for c in range(cfg.clients)]
        await asyncio.gather(*(_client(http, rng, cfg, pool, solo, deadline, tally) for rng in rngs))
        wall = time.perf_counter() - t0
    idle_after = wait_idle(url)
    mem_after = rss_bytes(pid) if pid else None
    return _report(cfg, tally, wall, idle_before, idle_after, mem_before, mem_after)


def _report(cfg, tally: Tally, wall, before, after, mem_before, mem_after) -> dict:
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    http_counts = {f"{path} {status}": dict(client=n, server=delta(
        f'jambalab_http_requests_total{{path="{path}",status="{status}"}}')) for (path, status), n in
        sorted(tally.statuses.items())}
    cancelled = sum(delta(k) for k in after if k.startswith("jambalab_requests_total") and "cancelled" in k)
    lat = {k: dict(n=len(v), median_s=statistics.median(v), max_s=max(v)) for k, v in tally.latency.items() if v}
    return dict(
        config=asdict(cfg), wall_s=wall, requests=sum(tally.statuses.values()),
        outcomes={f"{k} {o}": n for (k, o), n in sorted(tally.outcomes.items())},
        mismatches=tally.mismatches[:5], http_counts=http_counts, server_cancelled=cancelled,
        generated_tokens=delta("jambalab_generation_tokens_total"),
        idle_before={k: before.get(f"jambalab_engine_{k}") for k in IDLE_KEYS},
        idle_after={k: after.get(f"jambalab_engine_{k}") for k in IDLE_KEYS},
        prefix_bytes=after.get("jambalab_engine_prefix_bytes"), prefix_hits=delta("jambalab_engine_prefix_hits_total"),
        memory=None if mem_before is None else dict(baseline_rss=mem_before["rss"], peak_rss=mem_after["peak_rss"]),
        latency=lat,
    )


def check(report: dict, prefix_budget: int | None = None, memory_budget: int | None = None) -> list[str]:
    """What went wrong, as sentences; [] when the server held."""
    problems = []
    bad = {k: n for k, n in report["outcomes"].items() if not k.endswith(("correct", "rejected", "hung up"))}
    if bad:
        problems.append(f"requests that did not get a correct answer: {bad}")
    for kind in KINDS:
        if not any(k.startswith(kind + " ") for k in report["outcomes"]):
            problems.append(f"no {kind} request was sent (run longer or with more clients)")
    if report["idle_after"] != report["idle_before"]:
        problems.append(f"the engine did not return to idle: {report['idle_before']} -> {report['idle_after']}")
    mismatched = {k: v for k, v in report["http_counts"].items() if v["client"] != v["server"]}
    if mismatched:
        problems.append(f"/metrics HTTP counts differ from what the clients got: {mismatched}")
    hung_up = report["outcomes"].get("cancel hung up", 0)
    if report["server_cancelled"] > hung_up:
        problems.append(f"the server counted {report['server_cancelled']} cancelled requests, clients hung up {hung_up}")
    if prefix_budget is not None and (report["prefix_bytes"] or 0) > prefix_budget:
        problems.append(f"prefix cache holds {report['prefix_bytes']} bytes, over its budget {prefix_budget}")
    mem = report["memory"]
    if mem is not None and memory_budget is not None and mem["peak_rss"] - mem["baseline_rss"] > memory_budget:
        problems.append(f"peak RSS grew {(mem['peak_rss'] - mem['baseline_rss']) / 2**20:.0f} MiB over the baseline, "
                        f"more than the budgets + overhead ({memory_budget / 2**20:.0f} MiB)")
    return problems


# ---------------------------------------------------------------------------------------
# A server subprocess
# ---------------------------------------------------------------------------------------
class ServerProcess:
    """`python -m jambalab serve ARGS --port 0` from the checkout at `root`; .url once it listens."""

    def __init__(self, args: list[str], root: Path, start_timeout_s: float = 120.0, threads: int = 1):
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "jambalab", "serve", "--port", "0", "--threads", str(threads), *args]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = self._wait_for_address(start_timeout_s)

    def _wait_for_address(self, timeout_s: float) -> str:
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        line = found[0] if found else ""
        m = re.search(r"(http://[^\s/]+)/v1", line)
        if not m:
            self.close()
            raise RuntimeError(f"jambalab serve did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        return m.group(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()
