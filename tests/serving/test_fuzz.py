"""Fuzzing the HTTP API over real HTTP: schemathesis cases from the app's own OpenAPI document (bodies that
fit the schema and bodies that break it) and hypothesis bodies of arbitrary JSON, bytes and wild sampling
values.

Whatever arrives: never a 5xx, every 4xx in OpenAI's error shape, and the server still answers a normal
request afterwards with every KV page back in the pool. Bounded (a few dozen examples each, short contexts) so
the file takes well under a minute.
"""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from longcat_jax.serving.api import build_app
from longcat_jax.serving.engine import Engine, EngineSettings
from tests.serving.test_api import (
    ERROR_FIELDS,
    MODEL,
    serving,
    stop_engine,
    tiny_model,
    tiny_tokenizer,
    wait_idle,
)

SETTINGS = EngineSettings(max_num_seqs=4, max_model_len=48, page_size=16, prefill_chunk=16, max_waiting=64)
PATHS = ("/v1/completions", "/v1/chat/completions")
FUZZ = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live():
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_model(tokenizer), SETTINGS, tokenizer=tokenizer)
    engine.start()
    app = build_app(engine, tokenizer, model_name=MODEL, max_body_bytes=16 << 10)
    with serving(app) as url, httpx.Client(base_url=url, timeout=180) as http:
        yield {"url": url, "http": http, "engine": engine, "app": app}
    stop_engine(engine)


def check(response) -> None:
    """The fuzzing oracle: no 5xx; a 4xx carries exactly OpenAI's error fields; a 200 is an answer."""
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
        assert isinstance(body["error"]["message"], str)
    elif "text/event-stream" in str(response.headers.get("content-type")):  # a list in schemathesis
        # schemathesis stops reading after 20 events (then the server aborts the rest), so no [DONE] check
        events = [e for e in response.text.split("\n\n") if e]
        assert events and all(e.startswith("data: ") for e in events), response.text[:300]
        assert all(e == "data: [DONE]" or "choices" in json.loads(e[6:]) for e in events)
    else:
        assert response.json()["choices"], response.text[:500]


def still_serving(live) -> None:
    wait_idle(live["engine"])
    r = live["http"].post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis(live, mode):
    schema = schemathesis.openapi.from_dict(live["app"].openapi())
    strategy = st.one_of(*[schema[path]["POST"].as_strategy(generation_mode=mode) for path in PATHS])

    @FUZZ
    @given(case=strategy)
    def run(case):
        check(case.call(base_url=live["url"], timeout=180))

    run()
    still_serving(live)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4),
                    max_leaves=12)
WILD = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 70), st.floats(allow_nan=True),
                 st.floats(-3, 3), st.text(max_size=6), st.lists(st.integers(-2, 400), max_size=4),
                 st.lists(st.text(max_size=4), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers()))
FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
          "stop_token_ids", "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "stream", "stream_options", "ignore_eos", "user", "model", "echo")


@FUZZ
@given(path=st.sampled_from(PATHS), body=JSON)
def test_arbitrary_json_bodies(live, path, body):
    check(live["http"].post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}))


@FUZZ
@given(path=st.sampled_from(PATHS), raw=st.binary(max_size=64))
def test_arbitrary_bytes(live, path, raw):
    check(live["http"].post(path, content=raw, headers={"Content-Type": "application/json"}))


@FUZZ
@given(path=st.sampled_from(PATHS), fields=st.dictionaries(st.sampled_from(FIELDS), WILD, max_size=5),
       prompt=st.one_of(st.text(max_size=12), st.lists(st.integers(-1, 400), max_size=6),
                        st.lists(st.text(max_size=6), max_size=2)))
def test_wild_sampling_values(live, path, fields, prompt):
    """A well-formed request around values that are wrong in every way the schema allows and more."""
    chat = {"messages": [{"role": "user", "content": str(prompt)}]}
    head = {"prompt": prompt} if path == PATHS[0] else chat
    body = json.dumps({**head, **fields}, allow_nan=True)
    check(live["http"].post(path, content=body, headers={"Content-Type": "application/json"}))


def test_serving_after_fuzzing(live):
    still_serving(live)
