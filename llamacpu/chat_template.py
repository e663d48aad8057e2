"""Chat templates: render a conversation to the prompt text the model was trained on.

A model's chat template is a Jinja template (``tokenizer_config.json``'s
``chat_template`` or GGUF ``tokenizer.chat_template``, stored in our model file's
metadata). :class:`ChatTemplate` renders it exactly as ``transformers``'
``apply_chat_template(..., tokenize=False)`` does, so prompts are string-identical:

* a ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with ``trim_blocks=True``,
  ``lstrip_blocks=True`` and the ``loopcontrols`` extension (``{% break %}``);
  ``{% generation %}...{% endgeneration %}`` blocks (assistant-mask markers) are
  accepted and render their body;
* the ``tojson`` filter is ``json.dumps(x, ensure_ascii=False, indent=None,
  separators=None, sort_keys=False)`` (Jinja's own escapes HTML and sorts keys);
* globals ``raise_exception(msg)`` (raises :class:`TemplateError`),
  ``strftime_now(fmt)`` (the current local time), ``dict`` and ``namespace``
  (restricted as in transformers);
* variables ``messages``, ``tools`` (None when not given), ``documents`` (None),
  ``add_generation_prompt``, ``bos_token``, ``eos_token`` and any ``**extra``
  (e.g. ``date_string``, ``tools_in_user_message``, ``enable_thinking``);
* messages are copied as plain JSON data, keys whose value is None are dropped
  (OpenAI-style ``content=None``), and a message's reasoning given as
  ``reasoning``/``thinking``/``reasoning_content`` is visible under
  ``thinking`` and ``reasoning_content``, as transformers does.

``date_string`` is not defined unless passed: like transformers, the Llama 3.2
template then calls ``strftime_now("%d %b %Y")`` and writes today's date
(``"26 Jul 2024"`` is its own fallback for renderers without ``strftime_now``).
Pass ``date_string="26 Jul 2024"`` for reproducible prompts.

A model without a template (``source`` None) gets :data:`FALLBACK_TEMPLATE`,
Llama 3 Instruct's header format::

    {bos_token}<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>...
    <|start_header_id|>assistant<|end_header_id|>\n\n      (with add_generation_prompt)

The template comes with the model file, so it is treated as untrusted code: it is
compiled on first use (a model whose template is broken or hostile still loads, and
``generate()`` works), and renders in template_sandbox.py's bounded sandbox (time,
characters created, integer sizes). Every failure of the template (syntax,
``raise_exception``, an undefined value used in an expression, a type error, a
limit, RecursionError, MemoryError) raises :class:`TemplateError` (a ValueError)
with the template's message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes

from . import template_sandbox

__all__ = ["ChatTemplate", "TemplateError", "FALLBACK_TEMPLATE"]

MAX_INPUT_DEPTH = 100
"""Nesting of the data a template sees (messages, tools, extra variables): JSON
schemas of tools nest ~10 levels; deeper input is refused before it is copied
(copying recurses, and so does tojson)."""
STRFTIME_FORMAT_CHARS = 256
"""Length of a ``strftime_now`` format: templates pass ``"%d %b %Y"``; strftime has
no hook inside and writes ~12 characters per 2 of ``%c``."""


class TemplateError(ValueError):
    """A chat template failed to compile or to render (the message says why)."""


FALLBACK_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role'])"
    " + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] | trim }}"
    "{%- elif message['content'] is defined %}"
    "{{- message['content'] | tojson }}"
    "{%- endif %}"
    "{%- for call in message['tool_calls'] | default([]) %}"
    "{{- '{\"name\": ' + call['function']['name'] | tojson + ', \"parameters\": '"
    " + call['function']['arguments'] | tojson + '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
"""The template used for a model without one: Llama 3 Instruct's header format.

    {bos_token}<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>...
    <|start_header_id|>assistant<|end_header_id|>\\n\\n        (with add_generation_prompt)

BOS first (``bos_token``, the model's BOS text), one block per message with its
role as given (``tool`` becomes ``ipython``, Llama 3.1+'s role for tool results) and its content trimmed (non-string content as JSON), an assistant
tool call as ``{"name": ..., "parameters": ...}`` (Llama 3.2's format), then the
assistant header when a generation prompt is wanted. No system block is added.
"""


class _GenerationExtension(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses
    it to find the assistant's tokens; we only need templates that use it to parse)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    if isinstance(fmt, str) and len(fmt) > STRFTIME_FORMAT_CHARS:
        raise TemplateError(f"chat template called strftime_now with a format of more than "
                            f"{STRFTIME_FORMAT_CHARS} characters")
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` in templates, without attribute access to the dict type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` refusing underscore-prefixed attributes (as transformers)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise TemplateError(f"chat templates cannot store underscore-prefixed attributes on a "
                                f"namespace, got {name!r}")


def _environment() -> template_sandbox.BoundedSandbox:
    env = template_sandbox.BoundedSandbox(filters={"tojson": _tojson}, trim_blocks=True, lstrip_blocks=True,
                                          extensions=[_GenerationExtension, jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    # looked up at call time so that tests can freeze the clock by patching _strftime_now
    env.globals["strftime_now"] = lambda fmt: _strftime_now(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV = None


def _plain(value, depth=0):
    """Plain JSON-like data for the sandbox (transformers' _plain_template_data)."""
    if depth > MAX_INPUT_DEPTH:
        raise ValueError(f"chat messages, tools or variables nest deeper than {MAX_INPUT_DEPTH} levels")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, depth + 1) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalar
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump(), depth + 1)
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise TypeError("messages must be a list of dicts")
    out = []
    for m in messages:
        if dataclasses.is_dataclass(m) and not isinstance(m, type):
            m = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
        elif callable(getattr(m, "model_dump", None)):
            m = m.model_dump()
        if not isinstance(m, Mapping):
            raise TypeError(f"chat messages must be dicts, got {m!r}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class ChatTemplate:
    """A chat template, compiled on first use.

    source: the Jinja template; None (or "") uses :data:`FALLBACK_TEMPLATE`
        (``is_fallback`` is then True).
    bos_token, eos_token: the texts the template sees as ``bos_token``/``eos_token``
        (the model's BOS/EOS token strings, e.g. ``"<|begin_of_text|>"``).
    A template that does not compile raises TemplateError from :meth:`render`.
    """

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        if source is not None and not isinstance(source, str):
            raise TypeError(f"chat template must be a string or None, got {type(source).__name__}")
        self.is_fallback: bool = not source
        self.source: str = FALLBACK_TEMPLATE if self.is_fallback else source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self._template = None
        self._error = None  # why it does not compile, once tried

    @classmethod
    def from_metadata(cls, meta: dict, tokenizer=None) -> "ChatTemplate":
        """From a model file's metadata; BOS/EOS texts from ``tokenizer`` (a
        llamacpu Tokenizer) or looked up in the metadata's tokenizer.json."""
        if tokenizer is None:
            from .tokenizer import Tokenizer
            tokenizer = Tokenizer.from_metadata(meta)
        return cls(meta.get("chat_template"), tokenizer.bos_token or "", tokenizer.eos_token or "")

    def _compiled(self) -> jinja2.Template:
        global _ENV
        if self._template is None and self._error is None:
            if _ENV is None:
                _ENV = _environment()
            try:
                self._template = _ENV.from_string(self.source)
            except jinja2.TemplateSyntaxError as e:
                self._error = f"chat template syntax error (line {e.lineno}): {e.message}"
            except Exception as e:  # RecursionError (deep nesting), MemoryError, ...
                self._error = f"chat template does not compile: {_describe(e)}"
        if self._error is not None:
            raise TemplateError(self._error)
        return self._template

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for ``messages`` (dicts with ``role`` and ``content``;
        ``tool_calls`` on assistant messages; role ``tool``/``ipython`` for results).

        tools: JSON function definitions (``{"type": "function", "function": {...}}``)
            or None. extra: further template variables (``date_string``, ...); they
            override ``bos_token``/``eos_token`` when given under those names.
        Raises TemplateError for any failure of the template, TypeError or ValueError
        for messages or tools that are not JSON-like data.
        """
        if tools is not None:
            tools = list(tools)
            for t in tools:
                if not isinstance(t, Mapping):
                    raise TypeError(f"tools must be JSON schemas (dicts), got {type(t).__name__}")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        variables.update(_plain(extra))
        variables.update(messages=_messages(messages), tools=_plain(tools),
                         documents=_plain(variables.pop("documents", None)),
                         add_generation_prompt=bool(add_generation_prompt))
        template = self._compiled()
        try:
            return template_sandbox.render(template, variables)
        except TemplateError:
            raise
        except template_sandbox.LimitError as e:
            raise TemplateError(f"chat template stopped: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template error: {e.message or e}") from None
        except Exception as e:  # TypeError, RecursionError, MemoryError, ...: all the template's doing
            raise TemplateError(f"chat template failed: {_describe(e)}") from None

    @property
    def renders_tool_calls(self) -> bool:
        """Whether the template can render an assistant message's tool_calls (it names them)."""
        return "tool_calls" in self.source

    def __repr__(self):
        return f"ChatTemplate({'fallback' if self.is_fallback else f'{len(self.source)} chars'})"


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
