"""A request fuzzer for `llamacpu serve` (issue 14): hypothesis-made requests for every
endpoint (wrong types, huge and deeply nested values, odd unicode, lone surrogates,
special-token text, raw bytes) never get a 500, and the server answers a normal
request after each of them.

Valid requests generate at most MAX_FUZZ_TOKENS tokens, so the whole run stays within a
CI budget of about a minute. The examples are derandomized: CI runs the same ones every
time; LLAMACPU_SERVER_FUZZ_EXAMPLES=5000 runs more, by hand.
"""
import json
import os
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import N_CTX, Server

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = int(os.environ.get("LLAMACPU_SERVER_FUZZ_EXAMPLES", "500"))
MAX_FUZZ_TOKENS = 2      # a valid max_tokens above this is lowered to it: generation is not under test
MUTATED_FIELDS = 3       # fields of a valid body changed at once
DEEP_JSON = 500          # deepest nested value json.dumps can write into a body (Python's recursion limit)

# ----------------------------------------------------------------------------- strategies

ODD_TEXT = st.sampled_from([
    "", " ", "<|eot_id|><|start_header_id|>system<|end_header_id|>", "<|begin_of_text|>", "<|im_end|>",
    "{{ 7 * 7 }}{% for x in range(10) %}x{% endfor %}", "\x00\x01\x04\x7f", "\u202e\u200b\ufeff", "\ud800",
    "a\udfffb", "😀" * 50, "é" * 3000, "x" * 100_000, "\n" * 5000, "null", "[]", "{}", "\\u0000"])
TEXT = st.text(st.characters(exclude_categories=()), max_size=40) | ODD_TEXT   # surrogates included
NUMBERS = (st.integers() | st.integers(min_value=-(10 ** 400), max_value=10 ** 400) | st.floats()
           | st.sampled_from([0, -1, 1, 2, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63), 1e-320, 5e-324, 1e308,
                              -0.0, 0.5, N_CTX, N_CTX + 1]))
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT


def _nest(depth: int, leaf):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
                      max_leaves=12) | st.integers(1, DEEP_JSON).map(lambda n: _nest(n, "x"))

ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "ipython"]) | VALUES
TOOL_CALL = st.fixed_dictionaries({"type": st.just("function") | VALUES, "function": st.fixed_dictionaries(
    {"name": st.just("get_weather") | VALUES, "arguments": st.just('{"city": "Paris"}') | VALUES})}) | VALUES
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES, "content": TEXT | VALUES | st.lists(st.fixed_dictionaries({"type": st.just("text") | VALUES,
                                                                               "text": TEXT | VALUES}))},
    optional={"name": TEXT | VALUES, "tool_calls": st.lists(TOOL_CALL, max_size=2) | VALUES,
              "tool_call_id": TEXT | VALUES, "extra": VALUES})
TOOL = st.fixed_dictionaries({"type": st.just("function") | VALUES, "function": st.fixed_dictionaries(
    {"name": st.just("get_weather") | TEXT}, optional={"description": TEXT | VALUES, "parameters": VALUES})}) | VALUES

COMMON = {"model": TEXT | VALUES, "max_tokens": NUMBERS | VALUES, "max_completion_tokens": NUMBERS | VALUES,
          "temperature": NUMBERS | VALUES, "top_p": NUMBERS, "top_k": NUMBERS | VALUES, "min_p": NUMBERS,
          "repeat_penalty": NUMBERS | VALUES, "seed": NUMBERS | VALUES, "stop": st.lists(TEXT, max_size=5) | VALUES,
          "stream": st.booleans() | VALUES, "stream_options": st.fixed_dictionaries(
              {"include_usage": st.booleans() | VALUES}) | VALUES, "n": NUMBERS | VALUES,
          "presence_penalty": NUMBERS | VALUES, "frequency_penalty": NUMBERS, "logit_bias": VALUES,
          "user": VALUES}
CHAT = {"messages": st.lists(MESSAGE, max_size=4) | VALUES, "tools": st.lists(TOOL, max_size=2) | VALUES,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | VALUES, "logprobs": st.booleans() | VALUES,
        "top_logprobs": NUMBERS | VALUES, "response_format": VALUES}
COMPLETION = {"prompt": TEXT | st.lists(st.integers(-3, 60_000), max_size=8) | VALUES, "echo": st.booleans() | VALUES,
              "suffix": VALUES, "logprobs": VALUES, "best_of": NUMBERS}


def _mutated(base: dict, fields: dict):
    """base with up to MUTATED_FIELDS of `fields` set to generated values, and up to two odd
    keys (changing every field at once would make nearly every body a 400 for its first one)."""
    return st.lists(st.sampled_from(sorted(fields)), max_size=MUTATED_FIELDS, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: fields[n] for n in names})).flatmap(
        lambda changes: st.dictionaries(TEXT, VALUES, max_size=2).map(lambda odd: {**base, **odd, **changes}))


CHAT_BODY = _mutated({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, {**COMMON, **CHAT})
COMPLETION_BODY = _mutated({"prompt": "1, 2, 3,", "max_tokens": 1}, {**COMMON, **COMPLETION})
RAW = (st.binary(max_size=64) | st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)
       | st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)
       | st.sampled_from([b"", b"\xff\xfe", b'{"messages": "\xff"}', b"NaN", b'{"a": Infinity}', b"1" * 5000]))

PATHS = TEXT.map(lambda t: urllib.parse.quote(t[:200], errors="surrogatepass"))   # (httpx caps URLs at 64 KiB)

REQUESTS = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), CHAT_BODY),
    st.tuples(st.just("POST"), st.just("/v1/completions"), COMPLETION_BODY),
    st.tuples(st.just("POST"), st.sampled_from(["/v1/chat/completions", "/v1/completions"]), RAW),
    st.tuples(st.just("GET"), st.sampled_from(["/", "/health", "/v1/models"]), st.none()),
    st.tuples(st.just("GET"), PATHS.map(lambda p: "/v1/models/" + p), st.none()),
    st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS"]), PATHS.map(lambda p: "/" + p), st.none()))


def _cheap(body: dict) -> dict:
    """Keep generation short: a valid max_tokens above MAX_FUZZ_TOKENS, or none, becomes it."""
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and MAX_FUZZ_TOKENS < v <= N_CTX:
            body[key] = MAX_FUZZ_TOKENS
    if body.get("max_tokens") is None:
        body["max_tokens"] = MAX_FUZZ_TOKENS
    return body


# ----------------------------------------------------------------------------- the test

@pytest.fixture(scope="module")
def server(smollm_model, tmp_path_factory):
    s = Server(smollm_model, tmp_path_factory.mktemp("serve-fuzz") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(req=REQUESTS)
def test_fuzzed_requests_never_get_a_500(server, http, req):
    method, path, body = req
    if isinstance(body, dict):
        body = json.dumps(_cheap(body)).encode()   # (lone surrogates travel as \ud800 escapes)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    r = http.request(method, path, content=body, headers=headers)
    assert r.status_code < 500, (method, path, body[:300] if body else None, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:500]
    assert "internal error" not in r.text, r.text[:500]   # (a stream reports errors as events)
    assert http.get("/health").json()["status"] == "ok"


def test_still_serving_after_the_fuzz(server, http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    h = server.health()
    assert h["status"] == "ok" and h["requests"]["failed"] == 0, h
    assert "Traceback" not in server.output()
