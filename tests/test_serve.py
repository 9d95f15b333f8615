"""`qwen15 serve` over loopback, with the official openai client as the oracle of the wire format: streamed =
whole replies at temperature 0, one finish_reason per choice, usage, n, stop strings, logprobs; 32 concurrent
requests each get exactly what `generate` gives that prompt alone (and join the running batch, per the server's
step log); 64 concurrent streams; disconnects free their slots; every bad request gets its 4xx, OpenAI-shaped."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import SHARED_TOKENIZER, needs_shared

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

pytestmark = needs_shared

KEY = "test-key-123"
NAME = "tiny-chat"
MAX_LEN = 512
SLOTS = 8


def make_model_dir(folder: Path) -> Path:
    """A tiny tied model with the real tokenizer; sharpened weights, so that greedy picks have clear margins."""
    from qwen15 import Qwen, Tokenizer, get_preset

    model = Qwen.from_config(get_preset("tiny"), seed=11)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.mul_(5.0)
    model.save_pretrained(
        folder,
        tokenizer=Tokenizer.from_pretrained(SHARED_TOKENIZER),
        generation_config={"eos_token_id": [151645, 151643], "do_sample": False},
    )
    return folder


def start_server(args: list[str], env: dict | None = None, timeout: float = 180):
    """A `qwen15 serve` process and its base URL (read from its "serving ... on http://..." line)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen15.cli", "serve", "--port", "0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    found = threading.Event()
    url = []

    def read():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"on (http://\S+) ", line)
            if m and not url:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        proc.kill()
        raise AssertionError("the server did not start:\n" + "".join(lines))
    return proc, url[0], lines


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve") / NAME)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "steps.jsonl"
    args = ["--model", str(model_dir), "--served-model-name", NAME, "--max-num-seqs", str(SLOTS)]
    args += ["--max-model-len", str(MAX_LEN), "--kv-cache-memory", "64MiB", "--prefill-chunk", "64"]
    args += ["--max-request-bytes", "1MiB", "--step-log", str(log)]
    proc, url, lines = start_server(args, env={"QWEN15_API_KEY": KEY})
    yield {"url": url, "log": log, "lines": lines, "proc": proc}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The model as `qwen15 generate` loads it (prepared for inference), for answers of a prompt alone."""
    from qwen15 import Qwen, Tokenizer, prepare_for_inference

    return prepare_for_inference(Qwen.from_pretrained(str(model_dir))), Tokenizer.from_pretrained(
        str(model_dir)
    )


def request(url: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    h = {k: v for k, v in h.items() if v is not None}
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def metrics(url: str) -> dict[str, float]:
    from qwen15.serve.metrics import parse

    status, text = request(url, "GET", "/metrics")
    assert status == 200
    return parse(text)


def wait_idle(url: str, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (
            m["qwen15_requests_running"] == 0
            and m["qwen15_requests_waiting"] == 0
            and m["qwen15_kv_slots_used"] == 0
        ):
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def steps_since(log: Path, offset: int) -> list[dict]:
    with open(log, encoding="utf-8") as f:
        f.seek(offset)
        return [json.loads(line) for line in f if line.strip()]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]


def finishes_in_last_chunks(chunks) -> dict[int, str]:
    """Each choice's finish_reason, checked to come once, in that choice's last chunk."""
    per_choice: dict[int, list] = {}
    for chunk in chunks:
        for c in chunk.choices:
            per_choice.setdefault(c.index, []).append(c.finish_reason)
    out = {}
    for index, reasons in per_choice.items():
        assert [r for r in reasons if r is not None] == [reasons[-1]], reasons
        out[index] = reasons[-1]
    return out


# ---------------------------------------------------------------------------------------------- the openai client


def test_openai_client_stream_equals_whole_usage_n_stop_logprobs(client, server):
    whole = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=24)
    text = whole.choices[0].message.content
    assert len(text) > 4 and whole.choices[0].finish_reason in ("stop", "length")
    u = whole.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=CHAT,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert finishes_in_last_chunks(chunks) == {0: whole.choices[0].finish_reason}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == u.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"

    three = client.chat.completions.create(
        model=NAME, messages=CHAT, n=3, temperature=1.0, seed=3, max_tokens=8
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.message.content for c in three.choices}) > 1  # seeded apart
    assert three.usage.completion_tokens <= 24 and three.usage.prompt_tokens == u.prompt_tokens
    streamed = list(
        client.chat.completions.create(
            model=NAME, messages=CHAT, n=3, temperature=1.0, seed=3, max_tokens=8, stream=True
        )
    )
    assert sorted(finishes_in_last_chunks(streamed)) == [0, 1, 2]
    for i in range(3):
        joined = "".join(c.delta.content or "" for chunk in streamed for c in chunk.choices if c.index == i)
        assert joined == three.choices[i].message.content  # same seeds, same samples

    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=24, stop=[stop])
    assert (
        cut.choices[0].message.content == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    )
    cut_stream = list(
        client.chat.completions.create(
            model=NAME, messages=CHAT, temperature=0, max_tokens=24, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in cut_stream) == text[: text.find(stop)]
    assert finishes_in_last_chunks(cut_stream) == {0: "stop"}

    lp = client.chat.completions.create(
        model=NAME, messages=CHAT, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert all(
        len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content
    )

    done = client.completions.create(model=NAME, prompt="The sea is", temperature=0, max_tokens=12)
    parts = list(
        client.completions.create(model=NAME, prompt="The sea is", temperature=0, max_tokens=12, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text
    assert [p.choices[0].finish_reason for p in parts][-1] == done.choices[0].finish_reason
    assert [m.id for m in client.models.list().data] == [NAME]


def test_async_openai_client_concurrent_streams_equal_whole(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
        questions = [
            [{"role": "user", "content": q}] for q in ("Hi", "What is 2+2?", "Name a colour.", "你好")
        ]

        async def both(messages):
            whole = await client.chat.completions.create(
                model=NAME, messages=messages, temperature=0, max_tokens=16
            )
            stream = await client.chat.completions.create(
                model=NAME, messages=messages, temperature=0, max_tokens=16, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            return whole.choices[0].message.content, text

        results = await asyncio.gather(*(both(m) for m in questions))
        await client.close()
        return results

    for whole, streamed in asyncio.run(main()):
        assert streamed == whole and whole


# ---------------------------------------------------------------------------------------------- batching


def test_32_concurrent_requests_equal_generate_alone_and_join_the_batch(server, client, reference):
    from qwen15.generation import generate

    model, tok = reference
    g = torch.Generator().manual_seed(21)
    lengths = torch.randint(1, 70, (32,), generator=g).tolist()
    new = torch.randint(2, 9, (32,), generator=g).tolist()
    prompts = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in lengths]
    offset = server["log"].stat().st_size

    def one(i):
        time.sleep(0.01 * i)  # arrivals spread over the first steps
        r = client.completions.create(model=NAME, prompt=prompts[i], temperature=0, max_tokens=new[i])
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    alone = [generate(model, tok, p, max_new_tokens=n, temperature=0) for p, n in zip(prompts, new)]
    assert [g[0] for g in got] == [a.text for a in alone]
    assert [(g[1], g[2]) for g in got] == [(a.finish_reason, len(a.token_ids)) for a in alone]

    steps = steps_since(server["log"], offset)
    admitted = {a[0]: s["step"] for s in steps for a in s.get("admitted", [])}
    assert len(admitted) == 32
    decode_steps: dict[int, list[int]] = {}
    for s in steps:
        for sid in s.get("decode", []):
            decode_steps.setdefault(sid, []).append(s["step"])
        assert len(s.get("decode", [])) <= SLOTS
    # a request admitted while another was decoding, which went on decoding after: it joined, did not wait
    joined = [
        (b, a)
        for b, start in admitted.items()
        for a in decode_steps
        if a != b and min(decode_steps[a]) < start < max(decode_steps[a])
    ]
    assert len({b for b, _ in joined}) >= 8, "requests waited for the batch to finish instead of joining it"
    assert max(admitted.values()) > min(admitted.values())  # more requests than slots: some queued


def read_stream(url: str, body: dict, close_after: int | None = None):
    """Raw SSE lines of one streamed request (close_after: hang up after that many data lines)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps({**body, "stream": True}),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    lines = []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.decode().strip()
        if line.startswith("data: "):
            lines.append(line[6:])
            if close_after is not None and len(lines) >= close_after:
                conn.sock.shutdown(socket.SHUT_RDWR)
                conn.close()
                return lines
    conn.close()
    return lines


def test_64_concurrent_streams_end_with_done_and_memory_returns_to_idle(server):
    url = server["url"]

    def one(i):
        body = {"model": NAME, "messages": [{"role": "user", "content": f"Question {i}"}], "temperature": 0}
        lines = read_stream(url, {**body, "max_tokens": 2 + i % 6})
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(x) for x in lines[:-1]]
        assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1
        return len(chunks)

    def round_of_64():
        with ThreadPoolExecutor(64) as pool:
            return list(pool.map(one, range(64)))

    round_of_64()  # warm: whatever the first round allocates for good
    idle = wait_idle(url)["process_resident_memory_bytes"]
    counts = round_of_64()
    after = wait_idle(url)
    assert len(counts) == 64 and min(counts) >= 2
    assert after["process_resident_memory_bytes"] <= idle + 32 * 2**20, (idle, after)
    assert after["qwen15_kv_slots_used"] == 0 and after["qwen15_requests_running"] == 0


def test_disconnects_cancel_their_requests_and_free_their_slots(server):
    url = server["url"]
    before = wait_idle(url)
    offset = server["log"].stat().st_size
    body = {"model": NAME, "messages": CHAT, "temperature": 0, "max_tokens": MAX_LEN - 40}
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: read_stream(url, body, close_after=2), range(4)))
    # a client waiting for a whole reply hangs up too
    sock = socket.create_connection(url.removeprefix("http://").split(":"))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    time.sleep(0.3)
    sock.close()
    after = wait_idle(url)
    cancelled = [sid for s in steps_since(server["log"], offset) for sid in s.get("cancelled", [])]
    assert len(cancelled) == 5
    assert after["qwen15_sequences_cancelled_total"] - before["qwen15_sequences_cancelled_total"] == 5
    generated = after["qwen15_generation_tokens_total"] - before["qwen15_generation_tokens_total"]
    assert generated < 5 * (MAX_LEN - 40) / 2  # they stopped long before max_tokens


def test_multi_turn_chat_reuses_the_earlier_turns_and_metrics_say_so(server, client):
    started = time.monotonic()
    before = metrics(server["url"])
    first = [{"role": "user", "content": "Write one line about rivers."}]
    a = client.chat.completions.create(model=NAME, messages=first, temperature=0, max_tokens=20)
    second = first + [
        {"role": "assistant", "content": a.choices[0].message.content},
        {"role": "user", "content": "And about lakes?"},
    ]
    b = client.chat.completions.create(model=NAME, messages=second, temperature=0, max_tokens=8)
    after = metrics(server["url"])
    elapsed = time.monotonic() - started
    hits = after["qwen15_prefix_cache_hit_tokens_total"] - before["qwen15_prefix_cache_hit_tokens_total"]
    assert hits >= a.usage.prompt_tokens  # the whole first prompt (and part of the reply) came from the cache
    assert b.usage.prompt_tokens > hits
    assert 0 < after["qwen15_prefix_cache_hit_rate"] <= 1
    for name in (
        "qwen15_tokens_per_second",
        "qwen15_kv_cache_usage_ratio",
        "qwen15_time_to_first_token_seconds_count",
    ):
        assert name in after
    assert (
        after["qwen15_time_to_first_token_seconds_count"] > before["qwen15_time_to_first_token_seconds_count"]
    )
    # the engine worked for these requests: its busy time grew, by less than the time they took
    busy = after["qwen15_engine_busy_seconds_total"] - before["qwen15_engine_busy_seconds_total"]
    assert 0 < busy < elapsed


# ---------------------------------------------------------------------------------------------- bad requests

LONG = "word " * 600  # more tokens than the server's context of 512
GOOD = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
C = "/v1/chat/completions"
BAD_REQUESTS = [
    # name, method, path, body (dict, or bytes sent raw), extra headers, status, error code
    ("malformed JSON", "POST", C, b'{"messages": [', {}, 400, "invalid_json"),
    ("body not an object", "POST", C, b"[1, 2]", {}, 400, "invalid_json"),
    ("missing messages", "POST", C, {"model": NAME}, {}, 422, "missing_required_parameter"),
    ("messages not a list", "POST", C, {**GOOD, "messages": "hi"}, {}, 422, "invalid_type"),
    ("empty messages", "POST", C, {**GOOD, "messages": []}, {}, 400, "invalid_value"),
    (
        "unknown role",
        "POST",
        C,
        {**GOOD, "messages": [{"role": "wizard", "content": "x"}]},
        {},
        400,
        "invalid_value",
    ),
    (
        "missing content",
        "POST",
        C,
        {**GOOD, "messages": [{"role": "user"}]},
        {},
        422,
        "missing_required_parameter",
    ),
    ("max_tokens 0", "POST", C, {**GOOD, "max_tokens": 0}, {}, 400, "invalid_value"),
    (
        "max_tokens beyond the context",
        "POST",
        C,
        {**GOOD, "max_tokens": MAX_LEN},
        {},
        400,
        "context_length_exceeded",
    ),
    ("temperature < 0", "POST", C, {**GOOD, "temperature": -0.5}, {}, 400, "invalid_value"),
    ("top_p > 1", "POST", C, {**GOOD, "top_p": 1.5}, {}, 400, "invalid_value"),
    ("top_logprobs 50", "POST", C, {**GOOD, "logprobs": True, "top_logprobs": 50}, {}, 400, "invalid_value"),
    ("chat logprobs 50", "POST", C, {**GOOD, "logprobs": 50}, {}, 422, "invalid_type"),
    (
        "completions logprobs 50",
        "POST",
        "/v1/completions",
        {"prompt": "x", "logprobs": 50},
        {},
        400,
        "invalid_value",
    ),
    (
        "prompt longer than the context",
        "POST",
        C,
        {**GOOD, "messages": [{"role": "user", "content": LONG}]},
        {},
        400,
        "context_length_exceeded",
    ),
    ("unknown model", "POST", C, {**GOOD, "model": "gpt-9"}, {}, 404, "model_not_found"),
    ("unknown model card", "GET", "/v1/models/gpt-9", None, {}, 404, "model_not_found"),
    ("unknown route", "GET", "/v1/nothing", None, {}, 404, "not_found"),
    ("wrong method", "GET", C, None, {}, 405, "method_not_allowed"),
    ("10 MB body", "POST", C, b"{" + b" " * 10_000_000 + b"}", {}, 413, "body_too_large"),
    ("missing API key", "POST", C, GOOD, {"Authorization": None}, 401, "invalid_api_key"),
    ("wrong API key", "POST", C, GOOD, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    (
        "wrong key on /metrics",
        "GET",
        "/metrics",
        None,
        {"Authorization": "Bearer nope"},
        401,
        "invalid_api_key",
    ),
    ("n 0", "POST", C, {**GOOD, "n": 0}, {}, 400, "invalid_value"),
    ("stop not a string", "POST", C, {**GOOD, "stop": [1]}, {}, 422, "invalid_type"),
    (
        "stream_options without stream",
        "POST",
        C,
        {**GOOD, "stream_options": {"include_usage": True}},
        {},
        400,
        "invalid_value",
    ),
    ("tools", "POST", C, {**GOOD, "tools": [{"type": "function"}]}, {}, 400, "invalid_value"),
    ("missing prompt", "POST", "/v1/completions", {"model": NAME}, {}, 422, "missing_required_parameter"),
    (
        "token id outside the vocabulary",
        "POST",
        "/v1/completions",
        {"prompt": [10**7]},
        {},
        400,
        "invalid_value",
    ),
    ("temperature a string", "POST", C, {**GOOD, "temperature": "hot"}, {}, 422, "invalid_type"),
]


def test_bad_requests_get_their_4xx_openai_shaped_and_the_server_stays_healthy(server):
    url = server["url"]
    passed = []
    for name, method, path, body, headers, status, code in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else None
        got, answer = request(url, method, path, None if raw is not None else body, headers, raw=raw)
        assert got == status, (name, got, answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), name
        assert error["code"] == code, (name, error)
        passed.append(name)
    print(f"\n{len(passed)} of {len(BAD_REQUESTS)} bad requests answered as expected")
    assert len(passed) == len(BAD_REQUESTS) == 30
    assert request(url, "GET", "/health", headers={"Authorization": None}) == (200, {"status": "ok"})
    status, good = request(url, "POST", C, GOOD)
    assert status == 200 and good["choices"][0]["finish_reason"] in ("stop", "length")
    assert wait_idle(url)['qwen15_http_errors_total{status="400"}'] >= 15


def test_auth_and_the_chat_page(server):
    url = server["url"]
    assert request(url, "GET", "/health", headers={"Authorization": None})[0] == 200
    assert request(url, "GET", "/v1/models", headers={"Authorization": None})[0] == 401
    status, models = request(url, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == NAME and models["data"][0]["max_model_len"] == MAX_LEN
    status, page = request(url, "GET", "/", headers={"Authorization": None})
    assert status == 200 and "<title>qwen15 chat</title>" in page
    assert "cdn" not in page.lower() and "src=" not in page  # one file, nothing fetched from elsewhere
    assert url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
    assert any("API key required" in line for line in server["lines"])


# ---------------------------------------------------------------------------------------------- in-process


def test_a_full_queue_answers_503_and_the_server_recovers(model_dir):
    """One slot, a queue of one: the third concurrent request is refused at once, later ones are served."""
    import uvicorn

    from qwen15 import Qwen, Tokenizer
    from qwen15.engine.engine import Engine
    from qwen15.generation import chat_sampling_defaults, sampling_defaults
    from qwen15.serve.app import create_app
    from qwen15.serve.protocol import ServedModel
    from qwen15.serve.runner import Runner

    model, tok = Qwen.from_pretrained(str(model_dir)), Tokenizer.from_pretrained(str(model_dir))
    engine = Engine(model, num_slots=1, max_len=256, max_queue=1, valid_vocab=len(tok))
    served = ServedModel(
        NAME, tok, 256, chat_sampling_defaults(None), sampling_defaults(None), frozenset(), frozenset()
    )
    runner = Runner(engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(runner, served), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(request, url, "POST", C, long)
            while engine.running() == 0:
                time.sleep(0.01)
            second = pool.submit(request, url, "POST", C, long)
            while engine.waiting() == 0:
                time.sleep(0.01)
            status, answer = request(url, "POST", C, long)
            assert status == 503 and answer["error"]["code"] == "queue_full"
            assert first.result()[0] == 200 and second.result()[0] == 200
        assert request(url, "GET", "/health")[0] == 200
        assert request(url, "POST", C, {**long, "max_tokens": 3})[0] == 200
    finally:
        server.should_exit = True
        thread.join(30)


# ---------------------------------------------------------------------------------------------- tensor parallel


@pytest.mark.slow
def test_tensor_parallel_server_answers_like_the_single_process_one(model_dir, client):
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.Popen(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "qwen15.cli", "serve", "--port", "0"]
        + ["--model", str(model_dir), "--served-model-name", NAME, "--device", "cpu"]
        + ["--max-model-len", str(MAX_LEN), "--kv-cache-memory", "32MiB", "--max-num-seqs", "4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    found, lines = [], []

    def read():
        for line in proc.stderr:
            lines.append(line)
            if (m := re.search(r"on (http://\S+) ", line)) and not found:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while not found:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        split = openai.OpenAI(base_url=found[0] + "/v1", api_key="none", max_retries=0)
        for messages in (CHAT, [{"role": "user", "content": "你好"}]):
            ours = split.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=16)
            single = client.chat.completions.create(
                model=NAME, messages=messages, temperature=0, max_tokens=16
            )
            assert ours.choices[0].message.content == single.choices[0].message.content
        assert any("tensor parallel over 2 processes" in line for line in lines)
    finally:
        stop_server(proc)


def test_serve_with_a_lora_adapter_answers_like_the_library(model_dir, tmp_path):
    """--adapter: the server's greedy answer is the library's with the adapter applied (and not the base's)."""
    from qwen15 import Qwen, Tokenizer, lora, prepare_for_inference
    from qwen15.generation import generate

    model = Qwen.from_pretrained(str(model_dir))
    modules = lora.add_adapters(
        model, lora.LoRASpec(r=4, alpha=8), generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        for m in modules.values():
            m.lora_B.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(6))
    lora.save_adapter(model, tmp_path / "adapter")
    tok = Tokenizer.from_pretrained(str(model_dir))
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    base = prepare_for_inference(Qwen.from_pretrained(str(model_dir)))
    adapted = prepare_for_inference(
        lora.load_adapter(Qwen.from_pretrained(str(model_dir)), tmp_path / "adapter")
    )
    want = generate(adapted, tok, ids, max_new_tokens=12, temperature=0).text
    assert want != generate(base, tok, ids, max_new_tokens=12, temperature=0).text
    proc, url, _ = start_server(
        ["--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--served-model-name", NAME]
        + ["--max-model-len", "256", "--kv-cache-memory", "16MiB", "--max-num-seqs", "2"]
    )
    try:
        status, answer = request(url, "POST", C, {"messages": CHAT, "temperature": 0, "max_tokens": 12})
        assert status == 200 and answer["choices"][0]["message"]["content"] == want
    finally:
        stop_server(proc)
