"""The OpenAI-compatible HTTP API over real HTTP: a tiny random model, the real engine, uvicorn in a thread,
the official `openai` client for what clients do and raw httpx for malformed input.

One model, engine and server serve the whole file (module fixtures); requests ask for a few tokens only.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx2 as httpx
import openai
import pytest
import uvicorn

import longcat_jax as lj
from longcat_jax.serving.api import build_app
from longcat_jax.serving.engine import Engine, EngineSettings
from longcat_jax.serving.text import TextTokenizer
from longcat_jax.training import data

MODEL = "longcat-test"
MAX_MODEL_LEN = 256  # the tiny preset's max_position_embeddings
MAX_BODY = 64 << 10
SETTINGS = EngineSettings(max_num_seqs=4, max_model_len=MAX_MODEL_LEN, page_size=16, prefill_chunk=16,
                          max_waiting=8)
ERROR_FIELDS = {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------------------------- fixtures
def tiny_tokenizer() -> TextTokenizer:
    """A 300-token byte-level BPE of a few standard-library files (deterministic, well under a second)."""
    texts = data.read_text_files(sorted(data.stdlib_files())[:12])
    return TextTokenizer.from_tokenizer(data.train_bpe(texts, 300))


def tiny_model(tokenizer: TextTokenizer):
    cfg = lj.Config.tiny(vocab_size=384, eos_token_id=tokenizer.eos_token_ids[0])
    return lj.build_model(cfg, seed=0)


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """uvicorn serving `app` in a thread on a free port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def stop_engine(engine: Engine) -> None:
    threading.Thread(target=engine.drain, kwargs={"timeout": 1}, daemon=True).start()


@pytest.fixture(scope="module")
def stack():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    engine = Engine(model, SETTINGS, tokenizer=tokenizer)
    engine.start()
    app = build_app(engine, tokenizer, model_name=MODEL, max_body_bytes=MAX_BODY, max_n=16)
    with serving(app) as url:
        yield {"url": url, "engine": engine, "tokenizer": tokenizer, "model": model, "app": app}
    stop_engine(engine)


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def http(stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack["url"], timeout=180) as c:
        yield c


def wait_idle(engine: Engine, timeout: float = 120.0) -> None:
    """Until no request runs or waits and every KV page is back in the pool. Generous: on a cold compilation
    cache the engine may be compiling a new step shape for a minute before it takes an abort."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.kv_pages_used == 0 and s.running == 0 and s.waiting == 0:
            return
        assert time.monotonic() < deadline, f"engine still busy: {s}"
        time.sleep(0.05)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent-events body, parsed; "[DONE]" stays a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---------------------------------------------------------------------------------------------- happy paths
def test_models_health_and_metrics(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").status_code == 200
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("longcat_kv_pages_used", "longcat_kv_pages_total", "longcat_requests_running",
                 "longcat_requests_waiting", "longcat_prefix_cache_hits_total", "longcat_prompt_tokens_total",
                 "longcat_generation_tokens_total", "longcat_time_to_first_token_seconds_bucket",
                 "longcat_time_per_output_token_seconds_bucket"):
        assert f"\n{name}" in metrics.text, name
    assert f"longcat_kv_pages_total {SETTINGS.pool_pages}.0" in metrics.text


def test_completion_text_usage_and_finish_reason(client, stack):
    prompt = "def fibonacci(n):"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and isinstance(choice.text, str)
    n_prompt = len(stack["tokenizer"].encode(prompt))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        n_prompt, 5, n_prompt + 5)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_prompt_forms(client, stack):
    """A string, token ids, a list of strings and a list of id lists: one choice per prompt (x n)."""
    ids = stack["tokenizer"].encode("import os")
    greedy = dict(model=MODEL, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    by_text = client.completions.create(prompt="import os", **greedy).choices[0].text
    assert client.completions.create(prompt=ids, **greedy).choices[0].text == by_text
    batch = client.completions.create(prompt=["import os", "x = 1"], **greedy)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == by_text
    assert batch.usage.prompt_tokens == len(ids) + len(stack["tokenizer"].encode("x = 1"))
    batch_ids = client.completions.create(prompt=[ids, [5, 6, 7]], n=2, seed=1, model=MODEL, max_tokens=2)
    assert [c.index for c in batch_ids.choices] == [0, 1, 2, 3] and batch_ids.usage.completion_tokens <= 8


def test_chat_completion(client, stack):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(stack["tokenizer"].encode_chat(messages))
    # max_completion_tokens wins over max_tokens; "developer" is accepted (as a system turn); content parts
    out = client.chat.completions.create(
        model=MODEL, max_tokens=9, max_completion_tokens=2, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                               {"type": "text", "text": "!"}]}])
    assert out.usage.completion_tokens == 2 and out.choices[0].finish_reason == "length"


def test_seed_and_n(client, stack):
    """The same seed gives the same text; choice i of n samples with seed + i, as a request with that seed."""
    kw = dict(model=MODEL, prompt="class Foo:", max_tokens=6, temperature=1.0,
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == a
    three = client.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].text == a
    assert three.choices[2].text == client.completions.create(seed=9, **kw).choices[0].text
    assert three.usage.completion_tokens == 18
    assert three.usage.prompt_tokens == len(stack["tokenizer"].encode("class Foo:"))  # once, not per choice
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          seed=3, max_tokens=3, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 6


def test_stop_strings_and_stop_token_ids(client, stack):
    kw = dict(model=MODEL, prompt="def main():", temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(max_tokens=12, **kw).choices[0].text
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if full[i:i + 2].strip() and "\ufffd" not in
                full[i:i + 2])
    cut = client.completions.create(max_tokens=12, stop=[stop, "never-generated"], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    # every id is a stop token: the first token ends it, and is not part of the text
    every = list(range(stack["engine"].cfg.vocab_size))
    out = client.completions.create(max_tokens=5, **{**kw, "extra_body": {"stop_token_ids": every}})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == ""
    assert out.usage.completion_tokens == 1


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="x =", max_tokens=4, logprobs=2, temperature=0,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        # top_logprobs is keyed by text, so byte tokens that each decode to U+FFFD collapse into one entry
        # (the later one wins); greedy picks the most likely token, so no entry beats the chosen one
        assert value <= 0 and 1 <= len(top) <= 3 and max(top.values()) <= value + 1e-6
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes == list(t.token.encode())
               for t in content)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_streaming_completion_matches_non_streaming(client):
    kw = dict(model=MODEL, prompt="for i in range(", max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1
    # without include_usage no chunk has usage
    assert all(c.usage is None for c in client.completions.create(stream=True, **kw))


def test_streaming_chat_with_n(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, seed=5, n=2,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[i].message.content
        assert mine[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_raw_sse_framing(http):
    with http.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert all(block.startswith("data: ") for block in raw.split("\n\n") if block)


def test_default_max_tokens_fills_the_context(client):
    """No max_tokens: generate until the context is full (vLLM's default)."""
    prompt = list(range(3, 3 + MAX_MODEL_LEN - 5))
    out = client.completions.create(model=MODEL, prompt=prompt, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_unknown_fields_are_accepted(http):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 1, "logit_bias": {"5": 1}, "best_of": 1,
            "suffix": None, "some_future_field": {"x": [1]}, "user": "me"}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_concurrent_requests(client, stack):
    """More clients than batch slots: all answered, the engine batches them, pages come back."""
    results: list = [None] * 6

    def one(i):
        results[i] = client.completions.create(model=MODEL, prompt=f"item_{i} =", max_tokens=3, seed=i,
                                               extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r.usage.completion_tokens == 3 for r in results)
    wait_idle(stack["engine"])


# ------------------------------------------------------------------------------------------------- errors
BAD_REQUESTS = [  # (name, path, raw body or JSON, status, param)
    ("invalid json", "/v1/completions", b'{"prompt": "a",', 400, None),
    ("empty body", "/v1/completions", b"", 400, None),
    ("array body", "/v1/completions", [1, 2], 400, None),
    ("string body", "/v1/chat/completions", "hello", 400, None),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("wrong type", "/v1/completions", {"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ("float token id", "/v1/completions", {"prompt": [1, 2.5]}, 400, None),
    ("nan temperature", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("unknown model chat", "/v1/chat/completions",
     {"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]}, 404, "model"),
    ("n zero", "/v1/completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("n too large", "/v1/completions", {"prompt": "a", "n": 17}, 400, "n"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "a"}]}, 400, "messages"),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     None),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("empty token ids", "/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("prompt too long", "/v1/completions", {"prompt": [5] * MAX_MODEL_LEN}, 400, "prompt"),
    ("max_tokens beyond context", "/v1/completions", {"prompt": "a", "max_tokens": MAX_MODEL_LEN}, 400,
     "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", "/v1/completions", {"prompt": "a", "max_tokens": 10**30}, 400, "max_tokens"),
    ("id outside vocab", "/v1/completions", {"prompt": [1, 384]}, 400, "prompt"),
    ("negative id", "/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("huge id", "/v1/completions", {"prompt": [2**70]}, 400, "prompt"),
    ("negative temperature", "/v1/completions", {"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top_p above one", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "top_p": 1.5}, 400, "top_p"),
    ("logprobs too many", "/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("empty stop string", "/v1/completions", {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("stop token outside vocab", "/v1/completions", {"prompt": "a", "stop_token_ids": [10**6]}, 400,
     "stop_token_ids"),
    ("seed out of range", "/v1/completions", {"prompt": "a", "seed": 2**64}, 400, "seed"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_error(http, stack, name, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    error = assert_openai_error(r, status)
    if param is not None:
        assert error["param"] == param, error
    assert stack["engine"].stats().running == 0


def test_typed_client_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="a", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])


def test_body_too_large_unknown_route_and_method(http):
    assert_openai_error(http.post("/v1/completions", json={"prompt": "a" * MAX_BODY}), 413)
    assert_openai_error(http.get("/v1/nope"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_queue_full_is_429_and_aborts_the_rest(http, stack):
    """n=16 on 4 batch slots and 8 waiting places: refused with Retry-After, and nothing stays queued."""
    r = http.post("/v1/completions", json={"prompt": "a", "n": 16, "max_tokens": 50,
                                           "ignore_eos": True})
    assert_openai_error(r, 429)
    assert r.headers["retry-after"] == "1"
    wait_idle(stack["engine"])
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_unexpected_exception_is_500_and_server_survives(http, stack, monkeypatch):
    def boom(text):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(stack["app"].state.server, "encode", boom)
    error = assert_openai_error(http.post("/v1/completions", json={"prompt": "a"}), 500)
    assert error["type"] == "server_error" and "exploded" not in error["message"]
    monkeypatch.undo()
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_draining_is_503(stack):
    """A drained engine refuses with 503 (EngineStopped); /health says 503 while draining."""
    engine = Engine(stack["model"], SETTINGS, tokenizer=stack["tokenizer"])  # never started: drains at once
    engine.drain()
    app = build_app(engine, stack["tokenizer"], model_name=MODEL)
    with serving(app) as url, httpx.Client(base_url=url) as http:
        assert_openai_error(http.post("/v1/completions", json={"prompt": "a"}), 503)
        assert http.get("/health").status_code == 200
        app.state.server.draining = True
        assert_openai_error(http.get("/health"), 503)


def test_api_key(stack):
    app = build_app(stack["engine"], stack["tokenizer"], model_name=MODEL, api_key="s3cret")
    with serving(app) as url, httpx.Client(base_url=url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = http.post("/v1/completions", json={"prompt": "a"}, headers=headers)
            error = assert_openai_error(r, 401)
            assert error["code"] == "invalid_api_key"
        assert_openai_error(http.get("/v1/models"), 401)
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="a", max_tokens=1).usage.completion_tokens == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------- disconnects
def aborted(url: str) -> float:
    """How many engine requests the API has aborted so far (its finish-reason counter)."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('longcat_requests_finished_total{finish_reason="abort"}'):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def held_until_aborted(engine: Engine, monkeypatch, n: int) -> Iterator[None]:
    """Hold the engine's thread after its first step that generates a token until the API has asked it to
    abort `n` requests, so a tiny model cannot finish them before the test's client has gone away."""
    asked, let_go = [], threading.Event()
    step, abort, generated = engine.step, engine.abort, engine.stats().generation_tokens

    def held_step():
        step()
        if engine.stats().generation_tokens > generated:
            let_go.wait(60)

    def counted_abort(request_id: str):
        abort(request_id)
        asked.append(request_id)
        if len(asked) >= n:
            let_go.set()

    monkeypatch.setattr(engine, "step", held_step)
    monkeypatch.setattr(engine, "abort", counted_abort)
    try:
        yield
        assert let_go.wait(60), f"the API asked for {len(asked)} of {n} aborts"
    finally:
        let_go.set()


def test_stream_disconnect_aborts_and_frees_pages(stack, monkeypatch):
    """Closing a stream after its first chunk aborts its 4 choices and returns their pages."""
    engine, before = stack["engine"], aborted(stack["url"])
    body = {"prompt": "while True:", "max_tokens": 240, "ignore_eos": True, "stream": True, "n": 4}
    with held_until_aborted(engine, monkeypatch, 4), httpx.Client(base_url=stack["url"], timeout=180) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # held: a dropped line iterator closes the connection as it is collected
            assert next(line for line in lines if line.startswith("data: "))
            assert engine.stats().kv_pages_used > 0
    wait_idle(engine)
    assert aborted(stack["url"]) == before + 4


def test_non_stream_disconnect_aborts_at_once(stack, monkeypatch):
    """A client that closes its connection while waiting for a whole answer: its 4 choices are aborted (not
    run to their 240 tokens) and their pages freed."""
    engine, before = stack["engine"], aborted(stack["url"])
    body = json.dumps({"prompt": "while True:", "max_tokens": 240, "ignore_eos": True, "n": 4}).encode()
    host, port = stack["url"].removeprefix("http://").split(":")
    with held_until_aborted(engine, monkeypatch, 4), socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 120
        while engine.stats().running + engine.stats().waiting == 0:  # submitted, not finished
            assert time.monotonic() < deadline
            time.sleep(0.001)
    wait_idle(engine)
    assert aborted(stack["url"]) == before + 4


def test_readme_client_example_runs(stack, capsys):
    """The README's OpenAI-client example, as written, against this server."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from openai import" in b)
    exec(compile(block.replace("http://127.0.0.1:8000", stack["url"]), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # the completion and the streamed chat printed text
