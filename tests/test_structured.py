"""Structured output through Llama (SmolLM2): response_format, regex, grammar, forced tool
calls, several constraints in one batch, logprobs of the constrained distribution, and the
validity suite (tests/data/structured_schemas.json: every completion that ends with
"stop" validates with jsonschema; every forced tool call parses, with valid arguments)."""
from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import jsonschema
import pytest

from llamacpu.llama import Llama

# JSON Schema 2020-12's format checks (jsonschema.FormatChecker() mixes in draft 3's "time")
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER
SUITE = json.loads((Path(__file__).parent / "data" / "structured_schemas.json").read_text())
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 30},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "send_email", "description": "Send an email",
                                      "parameters": {"type": "object", "properties": {
                                          "to": {"type": "string", "format": "email", "maxLength": 40},
                                          "subject": {"type": "string", "maxLength": 40},
                                          "urgent": {"type": "boolean"}},
                                          "required": ["to", "subject", "urgent"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add numbers",
                                      "parameters": {"type": "object", "properties": {
                                          "xs": {"type": "array", "items": {"type": "integer"}, "minItems": 2,
                                                 "maxItems": 4}}, "required": ["xs"]}}},
]
TOOL_PROMPTS = ["What's the weather in Paris?", "Email bob@example.com that the build is broken.",
                "What is 2 plus 3 plus 4?", "Hello!"]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


@pytest.fixture(scope="module")
def llm(smollm_model, chunk_invariant_kernels):
    """Chunk-invariant kernels: greedy answers are compared across prompt-cache hits."""
    with Llama(smollm_model, n_ctx=512, n_threads=1, n_parallel=4, kernels=chunk_invariant_kernels) as m:
        yield m


def user(text):
    return [{"role": "user", "content": text}]


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def test_chat_json_schema_and_object(llm):
    r = llm.chat(user("Describe a person."), response_format=schema_format(PERSON), max_tokens=40, temperature=0)
    ch = r["choices"][0]
    assert ch["finish_reason"] == "stop"
    jsonschema.validate(json.loads(ch["message"]["content"]), PERSON)
    r = llm.chat(user("List two fruits."), response_format={"type": "json_object"}, max_tokens=40, seed=1)
    if r["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(r["choices"][0]["message"]["content"]), dict)
    # streamed: the same text as the whole call (greedy)
    chunks = list(llm.chat(user("Describe a person."), response_format=schema_format(PERSON), max_tokens=40,
                           temperature=0, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ch["message"]["content"]


def test_generate_regex_and_grammars(llm):
    out = llm.generate("Today's date is", regex=r" 20[0-9]{2}-[01][0-9]-[0-3][0-9]", stream=False, max_tokens=20,
                       temperature=0)
    assert re.fullmatch(r" 20[0-9]{2}-[01][0-9]-[0-3][0-9]", out)
    for g in ('start: " yes" | " no"', 'root ::= " yes" | " no"'):
        out = llm.generate("Is water wet? Answer:", grammar=g, stream=False, max_tokens=5, seed=3)
        assert out in (" yes", " no")
    first = llm.generate_batch(["A", "B"], regex="[xy]{3}", max_tokens=6, seed=0)   # each prompt its own matcher
    assert all(re.fullmatch("[xy]{3}", t) for t in first)
    assert llm.generate_batch(["A", "B"], regex="[xy]{3}", max_tokens=6, seed=0) == first


def test_constrained_logprobs(llm):
    r = llm.chat(user("Pick a color."), response_format=schema_format(
        {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
         "additionalProperties": False}), max_tokens=20, temperature=0, logprobs=True, top_logprobs=5)
    content = r["choices"][0]["logprobs"]["content"]
    text = r["choices"][0]["message"]["content"]
    assert json.loads(text)["color"] in ("red", "green", "blue")
    first = content[0]   # '{"' is forced: probability 1 in the constrained distribution
    assert first["logprob"] == 0.0 and len(first["top_logprobs"]) == 1
    for c in content:    # alternatives are only tokens the schema allows; probabilities sum to <= 1
        assert math.fsum(math.exp(t["logprob"]) for t in c["top_logprobs"]) <= 1 + 1e-6
        assert all(math.isfinite(t["logprob"]) for t in c["top_logprobs"])


@pytest.mark.slow
def test_forced_tool_calls(llm):
    r = llm.chat(user("Hello there!"), tools=TOOLS, tool_choice="required", max_tokens=96, temperature=0)
    ch = r["choices"][0]
    assert ch["finish_reason"] == "tool_calls"
    call = ch["message"]["tool_calls"][0]["function"]
    fn = next(t["function"] for t in TOOLS if t["function"]["name"] == call["name"])
    jsonschema.validate(json.loads(call["arguments"]), fn["parameters"])
    r = llm.chat(user("Hello there!"), tools=TOOLS, max_tokens=60, temperature=0,
                 tool_choice={"type": "function", "function": {"name": "add"}})
    call = r["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "add"
    jsonschema.validate(json.loads(call["arguments"]), TOOLS[2]["function"]["parameters"])
    # strict: no keys beyond the schema's
    assert set(json.loads(call["arguments"])) <= {"xs"}
    # "none": no tools in the prompt, plain text
    r = llm.chat(user("Hello there!"), tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    assert "tool_calls" not in r["choices"][0]["message"]
    # streamed: one tool_calls delta
    chunks = list(llm.chat(user("Weather in Rome?"), tools=TOOLS, tool_choice="required", max_tokens=96,
                           temperature=0, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert any("tool_calls" in d for d in deltas) and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_each_sequence_its_own_constraint(llm):
    """Different constraints (and none) decode in one batch, from threads and chat_batch."""
    fmts = [schema_format(PERSON), {"type": "json_object"}, None, schema_format({"type": "array", "items": {
        "type": "integer"}, "minItems": 2, "maxItems": 3})]
    out = [None] * len(fmts)

    def run(i):
        out[i] = llm.chat(user("Give me some data."), response_format=fmts[i], max_tokens=40, seed=i)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(fmts))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i, fmt in enumerate(fmts):
        ch = out[i]["choices"][0]
        if fmt is not None and ch["finish_reason"] == "stop":
            v = json.loads(ch["message"]["content"])
            if fmt["type"] == "json_schema":
                jsonschema.validate(v, fmt["json_schema"]["schema"])
    res = llm.chat_batch([user("Describe a person."), user("Describe someone else.")],
                         response_format=schema_format(PERSON), max_tokens=40, temperature=0)
    for r in res:
        assert r["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), PERSON)


def test_errors_name_the_part(llm):
    with pytest.raises(ValueError, match=r"response_format.json_schema.schema: Invalid type: nope"):
        llm.chat(user("hi"), response_format=schema_format({"type": "nope"}))
    with pytest.raises(ValueError, match=r"tools\[1\].function.parameters"):
        llm.chat(user("hi"), tool_choice="required", tools=[TOOLS[0], {"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}])
    with pytest.raises(ValueError, match="no tool is named 'zap'"):
        llm.chat(user("hi"), tools=TOOLS, tool_choice={"type": "function", "function": {"name": "zap"}})
    with pytest.raises(ValueError, match="needs tools"):
        llm.chat(user("hi"), tool_choice="required")
    with pytest.raises(ValueError, match="one output constraint"):
        llm.generate("x", regex="a", grammar='start: "a"')
    with pytest.raises(ValueError, match="regex"):
        llm.generate("x", regex="a(")
    with pytest.raises(ValueError, match="response_format.type"):
        llm.chat(user("hi"), response_format={"type": "yaml"})


@pytest.mark.slow
def test_schema_suite_validity(llm):
    """The suite: every schema with every prompt; 100% of the "stop" completions validate."""
    names, convs, fmts = [], [], []
    for name, item in SUITE["schemas"].items():
        for p in SUITE["prompts"]:
            names.append(name)
            convs.append([{"role": "system", "content": p}, {"role": "user", "content": item["prompt"]}])
            fmts.append(item["schema"])
    results = [None] * len(convs)
    # chat_batch takes one response_format; the suite's calls run from threads, batched together
    sem = threading.Semaphore(llm.n_parallel)

    def run(i):
        with sem:
            results[i] = llm.chat(convs[i], response_format=schema_format(fmts[i]), max_tokens=48, seed=i)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(convs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stopped, bad = 0, []
    for name, schema, r in zip(names, fmts, results):
        ch = r["choices"][0]
        if ch["finish_reason"] != "stop":
            continue
        stopped += 1
        try:
            jsonschema.validate(json.loads(ch["message"]["content"]), schema,
                                format_checker=FORMATS)
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append((name, ch["message"]["content"], str(e)[:200]))
    print(f"\nschema suite: {len(SUITE['schemas'])} schemas x {len(SUITE['prompts'])} prompts = {len(results)} "
          f"completions, {stopped} ended with stop, {stopped - len(bad)} valid")
    assert not bad, bad
    assert stopped >= len(results) // 2   # the suite measures something


@pytest.mark.slow
def test_forced_tool_call_suite(llm):
    convs = [user(p) for p in TOOL_PROMPTS for _ in range(2)]
    res = llm.chat_batch(convs, tools=TOOLS, tool_choice="required", max_tokens=96, seed=5)
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for r in res:
        ch = r["choices"][0]
        assert ch["finish_reason"] == "tool_calls", ch
        for c in ch["message"]["tool_calls"]:
            jsonschema.validate(json.loads(c["function"]["arguments"]), by_name[c["function"]["name"]],
                                format_checker=FORMATS)


def test_mask_on_worker_thread_and_free_regex_changes_nothing(llm, monkeypatch):
    """The mask is computed off the batcher's thread; a constraint that allows any text
    leaves greedy decoding as it was."""
    from llamacpu import constrained
    names = []
    mask = constrained.Constraint.mask

    def recording(self):
        names.append(threading.current_thread().name)
        return mask(self)

    monkeypatch.setattr(constrained.Constraint, "mask", recording)
    msgs = user("Write one sentence about the sea.")
    free = llm.chat(msgs, temperature=0, max_tokens=24)
    anything = llm.chat(msgs, regex=r"(?s:.*)", temperature=0, max_tokens=24)
    assert anything["choices"][0]["message"]["content"] == free["choices"][0]["message"]["content"]
    assert anything["choices"][0]["finish_reason"] == free["choices"][0]["finish_reason"]
    assert len(names) == anything["usage"]["completion_tokens"]
    assert all(n.startswith("llamacpu-mask") for n in names)


@pytest.mark.slow
def test_llama32_tokenizer_and_template(converted):
    """A random-weight model with Llama 3.2's real tokenizer and chat template: whatever the
    weights say, a forced call is the template's tool-call JSON with valid arguments, and a
    schema's output validates."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}}]
    with Llama(converted("tiny64", "q4_0"), n_ctx=512, n_threads=1, n_parallel=2) as m:
        assert m.tokenizer.vocab_size > 128000
        res = m.chat_batch([user("Weather in Oslo?"), user("Hi")], tools=tools, tool_choice="required",
                           max_tokens=64, seed=2)
        for r in res:
            ch = r["choices"][0]
            assert ch["finish_reason"] == "tool_calls", ch
            call = ch["message"]["tool_calls"][0]["function"]
            assert call["name"] == "get_weather"
            jsonschema.validate(json.loads(call["arguments"]), tools[0]["function"]["parameters"])
        r = m.chat(user("Describe a person."), response_format=schema_format(PERSON), max_tokens=64, seed=3)
        ch = r["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        jsonschema.validate(json.loads(ch["message"]["content"]), PERSON)


@pytest.mark.slow
def test_bench_tool_runs(smollm_model, capsys):
    import bench_structured   # tools/ is on sys.path (conftest)
    bench_structured.main([str(smollm_model), "-t", "1", "--tokens", "8", "--repeat", "1"])
    out = capsys.readouterr().out
    assert re.search(r"threads 1: unconstrained [\d.]+ t/s, constrained [\d.]+ t/s, ratio [\d.]+", out), out
    assert re.search(r"engine per token: mask [\d.]+ ms, advance [\d.]+ ms \(\d+ tokens", out), out
    assert re.search(rf"compile \({len(SUITE['schemas'])} suite schemas.*median [\d.]+ ms", out), out
