"""What a call asks its output to be, as a constrained.Constraint: OpenAI's
``response_format`` (json_schema / json_object / text), ``regex=``, ``grammar=``, and
``tools`` with ``tool_choice`` ("none", "auto", "required" or one named function).

A forced tool call is Llama 3.2's JSON tool-call format, ``{"name": ..., "parameters":
{...}}``, with the parameters valid against the tool's schema, read with OpenAI's strict
semantics (an object schema with properties and no additionalProperties takes no other
keys) (openai_format's
parse_tool_calls reads it back into message.tool_calls). Every error is a ValueError
naming the field (``response_format.json_schema.schema: ...``, ``tools[1].function.parameters:
...``), which the server turns into a 400.
"""
from __future__ import annotations

from .constrained import Constraint, compile_grammar

__all__ = ["OutputSpec", "output_spec", "tools_for_prompt"]


class OutputSpec:
    """A compiled output constraint; constraint() gives each generation its own matcher."""

    def __init__(self, grammar: str, what: str, tokenizer):
        self.grammar, self.what, self.tokenizer = grammar, what, tokenizer

    def constraint(self) -> Constraint:
        return Constraint(self.grammar, self.tokenizer, self.what)


def _tool_function(t, i: int) -> dict:
    fn = t.get("function", t) if isinstance(t, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
    return fn


def _strict(schema):
    """OpenAI's strict tools: an object schema without additionalProperties allows no
    other keys (in its subschemas too)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const", "default", "examples") else _strict(v)) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _call_schema(fn: dict) -> dict:
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    params = _strict(params)
    return {"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
            "properties": {"name": {"const": fn["name"]}, "parameters": params}}


def tools_for_prompt(tools, tool_choice):
    """The tools the prompt shows the model: none for tool_choice "none"."""
    return None if tool_choice == "none" else tools


def _tool_spec(tools, tool_choice, tokenizer) -> OutputSpec | None:
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if not tools:
        raise ValueError("tool_choice: 'required' or a named function needs tools")
    fns = [_tool_function(t, i) for i, t in enumerate(tools)]
    if tool_choice == "required":
        chosen = list(enumerate(fns))
    elif isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type", "function") == "function" \
            else None
        if not isinstance(name, str):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        chosen = [(i, f) for i, f in enumerate(fns) if f["name"] == name]
        if not chosen:
            raise ValueError(f"tool_choice: no tool is named {name!r} (tools: {', '.join(f['name'] for f in fns)})")
    else:
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or an object, got {tool_choice!r}")
    for i, f in chosen:   # each tool's schema on its own, so that an error names the tool
        compile_grammar("json_schema", _call_schema(f), f"tools[{i}].function.parameters")
    schemas = [_call_schema(f) for _, f in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return OutputSpec(compile_grammar("json_schema", schema, "tools"), "tool call", tokenizer)


def _format_spec(rf, tokenizer) -> OutputSpec | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ValueError("response_format must be {'type': 'text' | 'json_object' | 'json_schema', ...}")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputSpec(compile_grammar("json_object", None, "response_format"), "response_format", tokenizer)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise ValueError("response_format.json_schema must be an object {'name', 'schema', 'strict'}")
        schema = js.get("schema", {})
        what = "response_format.json_schema.schema"
        return OutputSpec(compile_grammar("json_schema", schema, what), what, tokenizer)
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def output_spec(tokenizer, *, response_format=None, regex=None, grammar=None, tools=None,
                tool_choice=None) -> OutputSpec | None:
    """The constraint a call asks for, compiled (None: free text). At most one of
    response_format (not 'text'), regex, grammar and a forcing tool_choice."""
    specs = [(name, s) for name, s in (
        ("response_format", _format_spec(response_format, tokenizer)),
        ("regex", OutputSpec(compile_grammar("regex", regex), "regex", tokenizer) if regex is not None else None),
        ("grammar", OutputSpec(compile_grammar("grammar", grammar), "grammar", tokenizer)
         if grammar is not None else None),
        ("tool_choice", _tool_spec(tools, tool_choice, tokenizer))) if s is not None]
    if len(specs) > 1:
        raise ValueError(f"give one output constraint, not {' and '.join(n for n, _ in specs)}")
    return specs[0][1] if specs else None
