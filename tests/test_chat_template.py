"""llamacpu.chat_template: string identity with transformers' apply_chat_template.

Templates: Llama 3.2 Instruct's (as tools/make_checkpoint.py writes it into
tokenizer_config.json; read back from a converted checkpoint's metadata) and
SmolLM2's ChatML template (from its GGUF). transformers renders them from the
checkpoint folder / the rebuilt tokenizer.json. The clock is frozen in both
renderers, since the Llama template writes today's date.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json

import pytest

import llamacpu.chat_template as ct_mod
from llamacpu.chat_template import FALLBACK_TEMPLATE, ChatTemplate, TemplateError
from llamacpu.tokenizer import Tokenizer
from llamacpu.format import tokenizer_dict  # noqa: E402

transformers = pytest.importorskip("transformers")
hf_ct = pytest.importorskip("transformers.utils.chat_template_utils")

FROZEN = _dt.datetime(2025, 3, 7, 9, 30, 0)
FROZEN_DATE = "07 Mar 2025"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location (\u00b0C or \u00b0F)",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city, e.g. S\u00e3o Paulo"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {"name": "search", "description": "Search the web for <query> & return results",
                 "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}
TOOL_CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
    "name": "get_current_weather", "arguments": {"location": "Z\u00fcrich", "unit": "celsius"}}}]}

CASES = {
    "system_user": dict(messages=[{"role": "system", "content": "  You are a pirate.  "},
                                  {"role": "user", "content": "Hello! \u00bfQu\u00e9 tal? \U0001F44B"}]),
    "no_system": dict(messages=[{"role": "user", "content": "What is 2+2?"}]),
    "multi_turn": dict(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?\n\n"},
        {"role": "assistant", "content": " Red. "},
        {"role": "user", "content": "Thanks"}]),
    "tools": dict(messages=[{"role": "system", "content": "You can call tools."},
                            {"role": "user", "content": "Weather in Z\u00fcrich?"}],
                  tools=[WEATHER_TOOL, SEARCH_TOOL]),
    "tool_call": dict(messages=[{"role": "user", "content": "Weather in Z\u00fcrich?"}, TOOL_CALL],
                      tools=[WEATHER_TOOL], add_generation_prompt=False),
    "tool_result": dict(messages=[{"role": "user", "content": "Weather in Z\u00fcrich?"}, TOOL_CALL,
                                  {"role": "tool", "content": '{"temperature": 21, "unit": "celsius"}'}],
                        tools=[WEATHER_TOOL]),
    "ipython_result_mapping": dict(messages=[
        {"role": "user", "content": "Weather?"}, TOOL_CALL,
        {"role": "ipython", "content": {"temperature": 21, "sky": "\u2600"}},
        {"role": "assistant", "content": "It is 21 \u00b0C and sunny."},
        {"role": "user", "content": "Thanks!"}], tools=[WEATHER_TOOL]),
    "no_generation_prompt": dict(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                           {"role": "assistant", "content": "A"}], add_generation_prompt=False),
    "none_values_dropped": dict(messages=[{"role": "user", "content": "Weather?", "name": None},
                                          {"role": "assistant", "content": None,
                                           "tool_calls": TOOL_CALL["tool_calls"]}],
                                tools=[WEATHER_TOOL], add_generation_prompt=False),
    "date_string": dict(messages=[{"role": "user", "content": "Hi"}], date_string="01 Jan 2030"),
    "tools_in_system": dict(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                            tools=[WEATHER_TOOL], tools_in_user_message=False),
}
# ChatML (SmolLM2) concatenates message['content'] of every message as a string:
# give the tool calls an empty content and the mapping tool result its JSON text
CHATML_CASES = copy.deepcopy(CASES)
for _case in CHATML_CASES.values():
    for _m in _case["messages"]:
        if _m.get("content") is None:
            _m["content"] = ""
        elif not isinstance(_m["content"], str):
            _m["content"] = json.dumps(_m["content"])


class _FrozenDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return FROZEN if tz is None else FROZEN.replace(tzinfo=tz)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr(ct_mod, "datetime", _FrozenDatetime)
    monkeypatch.setattr(hf_ct, "datetime", _FrozenDatetime)


@pytest.fixture(scope="module")
def llama_tok(llama_meta):
    return Tokenizer.from_metadata(llama_meta)


@pytest.fixture(scope="module")
def llama_tpl(llama_meta, llama_tok):
    return ChatTemplate.from_metadata(llama_meta, llama_tok)


@pytest.fixture(scope="module")
def smol_tpl(smol_meta):
    return ChatTemplate.from_metadata(smol_meta)


@pytest.fixture(scope="module")
def hf_smol(smol_meta, tmp_path_factory):
    path = tmp_path_factory.mktemp("smol-ct-hf") / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_dict(smol_meta)), encoding="utf-8")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|im_start|>",
                                                eos_token="<|im_end|>")


def _split(case):
    kw = copy.deepcopy(case)
    messages = kw.pop("messages")
    tools = kw.pop("tools", None)
    agp = kw.pop("add_generation_prompt", True)
    return messages, tools, agp, kw


def _hf_render(hf, case, template=None):
    messages, tools, agp, extra = _split(case)
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=agp,
                                  chat_template=template, **extra)


def _our_render(tpl, case):
    messages, tools, agp, extra = _split(case)
    return tpl.render(messages, tools=tools, add_generation_prompt=agp, **extra)


# ----------------------------------------------------------------------------- Llama 3.2

def test_llama_template_in_metadata(llama_meta, checkpoint):
    import make_checkpoint
    cfg = json.loads((checkpoint("tiny64") / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert llama_meta["chat_template"] == cfg["chat_template"] == make_checkpoint.LLAMA32_CHAT_TEMPLATE


@pytest.mark.parametrize("name", sorted(CASES))
def test_llama_matches_transformers(name, llama_tpl, hf_llama):
    tpl = llama_tpl
    assert not tpl.is_fallback
    assert (tpl.bos_token, tpl.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    ours = _our_render(tpl, CASES[name])
    assert ours == _hf_render(hf_llama, CASES[name])
    assert ours.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    if "date_string" not in CASES[name]:
        assert f"Today Date: {FROZEN_DATE}\n" in ours


def test_llama_reference_layout(llama_tpl):
    """The rendering REFERENCE.md documents, written out."""
    tpl = llama_tpl
    out = tpl.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert out == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                   f"Cutting Knowledge Date: December 2023\nToday Date: {FROZEN_DATE}\n\nS<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # tools: JSON with indent 4, non-ASCII kept, "Environment: ipython"
    out = _our_render(tpl, CASES["tool_result"])
    assert "Environment: ipython\n" in out
    assert json.dumps(WEATHER_TOOL, indent=4, ensure_ascii=False) in out
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_current_weather", '
            '"parameters": {"location": "Z\u00fcrich", "unit": "celsius"}}<|eot_id|>') in out
    # a string tool result is a JSON string too (the template tests `is iterable`, true of strings)
    assert ('<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temperature\\": 21, \\"unit\\": '
            '\\"celsius\\"}"<|eot_id|>') in out


def test_llama_raise_exception(llama_tpl, hf_llama):
    tpl = llama_tpl
    two_calls = {"role": "assistant", "tool_calls": TOOL_CALL["tool_calls"] * 2}
    with pytest.raises(TemplateError, match="only supports single tool-calls"):
        tpl.render([{"role": "user", "content": "x"}, two_calls])
    with pytest.raises(Exception, match="only supports single tool-calls"):
        hf_llama.apply_chat_template([{"role": "user", "content": "x"}, two_calls], tokenize=False)
    with pytest.raises(TemplateError, match="no first user message"):
        tpl.render([{"role": "system", "content": "S"}], tools=[WEATHER_TOOL])
    assert issubclass(TemplateError, ValueError)


# ----------------------------------------------------------------------------- SmolLM2 ChatML

@pytest.mark.parametrize("name", sorted(CHATML_CASES))
def test_chatml_matches_transformers(name, smol_tpl, smol_meta, hf_smol):
    tpl = smol_tpl
    assert "<|im_start|>" in tpl.source and not tpl.is_fallback
    case = CHATML_CASES[name]
    assert _our_render(tpl, case) == _hf_render(hf_smol, case, smol_meta["chat_template"])


def test_chatml_layout(smol_tpl):
    tpl = smol_tpl
    assert tpl.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_tool_call(smol_tpl, smol_meta, hf_smol):
    tpl = smol_tpl
    # a tool call without content: the template concatenates an undefined value
    case = CASES["tool_call"]
    with pytest.raises(TemplateError):
        _our_render(tpl, case)
    with pytest.raises(Exception):
        _hf_render(hf_smol, case, smol_meta["chat_template"])
    # with content it renders (ChatML ignores tool_calls), as in transformers
    case = copy.deepcopy(case)
    case["messages"][1]["content"] = ""
    assert _our_render(tpl, case) == _hf_render(hf_smol, case, smol_meta["chat_template"])


# ----------------------------------------------------------------------------- environment

ENV_TEMPLATES = [
    # tojson: no HTML escaping, no key sorting, ensure_ascii False, indent / separators / sort_keys
    "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(separators=(',', ':'), sort_keys=true) }}"
    "|{{ x | tojson(ensure_ascii=true) }}",
    # trim_blocks / lstrip_blocks
    "{% for m in messages %}\n    {% if m.role == 'user' %}\n  [{{ m.content }}]\n    {% endif %}\n{% endfor %}\n",
    # loop controls, namespace, dict, generation blocks
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}{{ ns.n }}"
    "{{ dict(a=1, b=2) | tojson }}{{ dict.fromkeys(['k']) | tojson }}",
    # strftime_now, bos/eos, add_generation_prompt, tools/documents defaults, extra variables
    "{{ strftime_now('%Y-%m-%d %H:%M') }} {{ bos_token }}{{ eos_token }} {{ add_generation_prompt }} "
    "{{ tools is none }} {{ documents is none }} {{ custom | default('none') }}",
    # thinking aliases
    "{% for m in messages %}{{ m.reasoning_content | default('-') }}/{{ m.thinking | default('-') }};{% endfor %}",
    # what the sandbox's limits watch, in ordinary amounts (template_sandbox.py)
    "{{ 'ab' * 3 }}{{ [1] * 2 }}{{ 2 ** 10 }}{{ [1] + [2] }}{{ '%05d|%-3s|%.2f' % (3, 'x', 2.5) }}"
    "{{ '{:>5}|{:.3f}|{!r}'.format('x', 1.5, 'q') }}{{ 'x' | center(5) }}{{ '7'.zfill(3) }}"
    "{{ 'a\\nb' | indent(2, true) }}{{ x.a | join(', ') }}{{ 'aXa' | replace('a', 'bb') }}"
    "{{ [1, 2, 3] | batch(2, 0) | list }}{{ [1, 2, 3] | slice(2) | list }}{{ [[1], [2]] | sum(start=[]) }}"
    "{{ x | pprint }}{{ 'b' ~ 1 ~ [2] }}{{ x.a }}{{ x.z | wordwrap(2) }}",
    "{% for m in messages recursive %}{{ loop.index }}/{{ loop.length }}{{ loop.cycle('a', 'b') }}"
    "{% endfor %}{% macro k(v) %}<{{ v }}{{ caller() }}>{% endmacro %}{% call k(1) %}c{% endcall %}"
    "{% set b %}[{{ messages | length }}]{% endset %}{{ b }}{% filter upper %}up{% endfilter %}",
]


@pytest.mark.parametrize("i", range(len(ENV_TEMPLATES)))
def test_environment_matches_transformers(i, hf_smol):
    src = ENV_TEMPLATES[i]
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": "r"}]
    x = {"z": "<\u00e9&>", "a": [1, 2.5, None, True]}
    ours = ChatTemplate(src, "<|im_start|>", "<|im_end|>").render(messages, add_generation_prompt=False, x=x,
                                                                   custom="c")
    theirs = hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                         chat_template=src, x=x, custom="c")
    assert ours == theirs


def test_tojson_exact():
    tpl = ChatTemplate("{{ x | tojson }}")
    assert tpl.render([], x={"b": "<\u00e9>", "a": 1}) == '{"b": "<\u00e9>", "a": 1}'
    assert ChatTemplate("{{ x | tojson(indent=4) }}").render([], x=[1]) == "[\n    1\n]"


def test_errors_are_template_errors():
    bad = ChatTemplate("{% if %}")  # compiled on first use: a model with a broken template loads
    with pytest.raises(TemplateError, match="syntax error"):
        bad.render([])
    with pytest.raises(TemplateError, match="syntax error"):  # the same error every time
        bad.render([])
    with pytest.raises(TemplateError, match="syntax error"):
        ChatTemplate("{% for m in messages %}").render([])
    with pytest.raises(TemplateError, match="boom 42"):
        ChatTemplate("{{ raise_exception('boom ' ~ 42) }}").render([])
    # the sandbox: no attribute escapes, no mutation of the inputs
    with pytest.raises(TemplateError):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(TemplateError):
        ChatTemplate("{% set _ = messages.append(1) %}").render(msgs)
    assert msgs == [{"role": "user", "content": "x"}]
    with pytest.raises(TemplateError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(msgs)
    with pytest.raises(TypeError):
        ChatTemplate("x").render(["not a dict"])
    with pytest.raises(TypeError):
        ChatTemplate("x").render([], tools=["not a schema"])


def test_render_does_not_touch_inputs(llama_tpl):
    tpl = llama_tpl
    case = copy.deepcopy(CASES["ipython_result_mapping"])
    before = copy.deepcopy(case)
    _our_render(tpl, case)
    assert case == before


# ----------------------------------------------------------------------------- fallback

def test_fallback_template():
    tpl = ChatTemplate(None, bos_token="<|begin_of_text|>")
    assert tpl.is_fallback and tpl.source == FALLBACK_TEMPLATE
    assert ChatTemplate("", "<s>").is_fallback
    out = tpl.render([{"role": "system", "content": " S "}, {"role": "user", "content": "U\n"}])
    assert out == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = tpl.render([{"role": "user", "content": "U"}, TOOL_CALL,
                      {"role": "tool", "content": {"t": 21}}], add_generation_prompt=False)
    assert out == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"
                   '{"name": "get_current_weather", "parameters": {"location": "Z\u00fcrich", "unit": "celsius"}}'
                   "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n{\"t\": 21}<|eot_id|>")
    assert tpl.render([]) == "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_fallback_for_template_less_model(llama_meta, llama_tok):
    meta = dict(llama_meta, chat_template=None)
    tpl = ChatTemplate.from_metadata(meta, llama_tok)
    assert tpl.is_fallback
    assert tpl.render([{"role": "user", "content": "Hi"}]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
