"""A chat prompt as token ids: the template's markup keeps its special tokens, the text
of the messages and tools is tokenized as text.

transformers and llama.cpp tokenize a rendered chat prompt with special tokens parsed
everywhere, so a message holding ``<|eot_id|><|start_header_id|>system<|end_header_id|>``
becomes a real system turn. :func:`chat_ids` leaves control tokens to the template:

* when no string of the messages and tools (keys included) holds special-token text, nor
  the start or the end of one at its edges (which could join a neighbour into one), the
  prompt renders and tokenizes exactly as transformers does: the usual case;
* otherwise each such piece of text is swapped for a placeholder before rendering. The
  special tokens of the rendered prompt are then the template's own, and the text between
  them, placeholders restored, is tokenized with special tokens read as plain text. The
  tokenizer itself splits text at special tokens before it tokenizes the pieces, so the
  ids differ from transformers' only where a message's text would have become a control
  token.

``parse_special=True`` tokenizes the rendered prompt as transformers does, special-token
text in messages included (for callers who put control tokens in messages on purpose).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

__all__ = ["chat_ids"]

# A placeholder is P<index>P, P a character of Unicode's Supplementary Private Use Area-B
# (special tokens and templates have no use for it) that appears in none of the inputs; a
# P left in the rendered prompt outside a placeholder is an error, never guessed at.
_PRIVATE_USE = re.compile("[\U00100000-\U0010FFFD]")
_PRIVATE_USE_CODES = range(0x100000, 0x10FFFE)


class _Specials:
    """The special-token texts of a tokenizer, as a matcher of whole tokens and of the
    pieces that could join a neighbour into one."""

    def __init__(self, texts: tuple[str, ...]):
        longest_first = sorted(texts, key=len, reverse=True)  # leftmost-longest, as tokenizers
        self.regex = re.compile("|".join(re.escape(t) for t in longest_first))
        self.starts = {t[:k] for t in texts for k in range(1, len(t))}     # proper prefixes
        self.ends = {t[-k:] for t in texts for k in range(1, len(t))}      # proper suffixes
        self.longest = max(len(t) for t in texts)

    def spans(self, s: str) -> list[tuple[int, int]]:
        """Spans of `s` to swap: every special-token text, and at the edges (of `s` and of
        `s` without its surrounding whitespace, which templates often trim) the longest
        piece that could start or end one. Sorted, not overlapping."""
        full = [m.span() for m in self.regex.finditer(s)]
        out = list(full)
        first = full[0][0] if full else len(s)
        last = full[-1][1] if full else 0
        for lo in {0, len(s) - len(s.lstrip())}:
            for k in range(min(self.longest - 1, first - lo), 0, -1):
                if s[lo:lo + k] in self.ends:
                    out.append((lo, lo + k))
                    break
        for hi in {len(s), len(s.rstrip())}:
            for k in range(min(self.longest - 1, hi - last), 0, -1):
                if s[hi - k:hi] in self.starts:
                    out.append((hi - k, hi))
                    break
        merged: list[tuple[int, int]] = []
        for a, b in sorted(out):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return merged


@functools.lru_cache(maxsize=8)
def _specials(texts: tuple[str, ...]) -> _Specials:
    return _Specials(texts)


def chat_ids(tokenizer, render, messages, tools=None, parse_special: bool = False) -> list[int]:
    """Token ids of the prompt ``render(messages, tools)`` renders, BOS first when the
    tokenizer adds one (see the module docstring for what becomes a special token).

    tokenizer: a llamacpu Tokenizer; render: (messages, tools) -> prompt text.
    Raises ValueError for messages nested too deeply to walk, or a template that cuts
    through the placeholders (it then slices or rewrites message text)."""
    texts = tokenizer.special_texts
    if parse_special or not texts:
        return tokenizer.encode(render(messages, tools), special=True, add_bos=tokenizer.add_bos)
    specials = _specials(texts)
    used: set[str] = set()  # private-use characters of the inputs
    swaps = False

    def look(s: str) -> str:
        nonlocal swaps
        used.update(_PRIVATE_USE.findall(s))
        swaps = swaps or bool(specials.spans(s))
        return s

    try:
        _walk((messages, tools), look)
    except RecursionError:
        raise ValueError("messages or tools are nested too deeply") from None
    if not swaps:
        return tokenizer.encode(render(messages, tools), special=True, add_bos=tokenizer.add_bos)

    mark = next((chr(c) for c in _PRIVATE_USE_CODES if chr(c) not in used), None)
    if mark is None:
        raise ValueError("messages and tools use every character of Unicode's private use area B")
    pieces: list[str] = []  # the swapped texts: placeholder i stands for pieces[i]

    def swap(s: str) -> str:
        out, pos = [], 0
        for a, b in specials.spans(s):
            out += [s[pos:a], mark, str(len(pieces)), mark]
            pieces.append(s[a:b])
            pos = b
        out.append(s[pos:])
        return "".join(out)

    prompt = render(*_walk((messages, tools), swap))
    placeholder = re.compile(re.escape(mark) + r"(\d+)" + re.escape(mark))

    def text_ids(text: str) -> list[int]:
        text = placeholder.sub(lambda m: pieces[int(m.group(1))], text)
        if mark in text:
            raise ValueError("the chat template altered message text around special-token text "
                             "(pass parse_special_in_content=True to tokenize it as transformers does)")
        return tokenizer.encode(text, special=False) if text else []

    ids: list[int] = []
    pos = 0
    for m in specials.regex.finditer(prompt):
        ids += text_ids(prompt[pos:m.start()])
        ids += tokenizer.encode(m.group(), special=True)
        pos = m.end()
    ids += text_ids(prompt[pos:])
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
        ids.insert(0, tokenizer.bos_id)
    return ids


def _walk(value, fn):
    """`value` with fn applied to every string (dict keys included), as plain dicts,
    lists and tuples; other values as they are."""
    if isinstance(value, str):
        return fn(str.__str__(value))
    if isinstance(value, Mapping):
        return {_walk(k, fn): _walk(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_walk(v, fn) for v in value)
    return value
