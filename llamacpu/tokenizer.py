"""Text <-> token ids for byte-level BPE tokenizers (Llama 3.x, SmolLM2, GPT-2 style).

Encoding is done by the Hugging Face ``tokenizers`` library from the model file's
``tokenizer.json`` (so ids are exactly what ``transformers`` produces); decoding is
done here, on bytes: every id maps to the raw bytes it stands for
(:meth:`Tokenizer.token_bytes`), a sequence decodes to the concatenation of those
bytes read as UTF-8 with invalid bytes replaced by U+FFFD. :class:`StreamDecoder`
emits the same text incrementally, holding back a multi-byte character that is
split across tokens until it is complete.

    tok = Tokenizer.from_metadata(model.metadata)
    ids = tok.encode("<|begin_of_text|>Hello", special=True)   # [128000, 9906]
    tok.decode(ids, skip_special=True)                         # "Hello"
    dec = tok.stream_decoder()
    text = "".join(dec.push(i) for i in ids) + dec.flush()     # == tok.decode(ids)

Differences from ``transformers``' decode, on purpose:

* no ``clean_up_tokenization_spaces`` (transformers >= 5 ignores it for BPE too;
  older versions applied it for Llama 3 and turned ``"a , b"`` into ``"a, b"``);
* an added token decodes to its UTF-8 text. ``tokenizers`` passes added tokens
  through the byte-level decoder as well, which only differs for added tokens
  made of characters of the byte-level alphabet outside ASCII (for example
  ``"<|ü|>"``); no Llama or SmolLM token is such a token.
"""

from __future__ import annotations

import codecs
import json
import operator
import os
import re
import threading
from typing import Iterable

from .errors import ModelFormatError

__all__ = ["Tokenizer", "StreamDecoder", "bytes_to_unicode", "MAX_TOKENIZER_JSON_CHARS",
           "MAX_TOKENIZER_TOKENS", "MAX_TOKENIZER_MERGES"]

# Bounds on a tokenizer.json, which model files carry (a hostile one of 3 million merges took
# 2.8 GB before it failed). Llama 3's has 128,256 tokens and 280,147 merges in 8.7 MiB; the
# bounds leave room for a vocabulary twice as large and refuse anything near that cost.
MAX_TOKENIZER_JSON_CHARS = 24 << 20
MAX_TOKENIZER_TOKENS = 1 << 19   # vocabulary entries, and added tokens
MAX_TOKENIZER_MERGES = 1 << 20

# Token texts that end a generation (used when no special_tokens are given).
_EOG_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>",
              "<end_of_turn>", "</s>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> printable character."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_B2U = bytes_to_unicode()
# translate table: alphabet character -> the latin-1 character of its byte
_U2B_TABLE = {ord(c): chr(b) for b, c in _B2U.items()}
_NOT_ALPHABET = re.compile("[^" + "".join(re.escape(c) for c in sorted(_B2U.values())) + "]")


def _byte_level_bytes(token: str) -> bytes:
    """Bytes of a byte-level BPE token (as tokenizers' ByteLevel decoder: a token with a
    character outside the alphabet stands for its own UTF-8 text)."""
    if _NOT_ALPHABET.search(token):
        return token.encode("utf-8")
    return token.translate(_U2B_TABLE).encode("latin-1")


def _is_byte_level(decoder) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(d) for d in decoder.get("decoders") or [])
    return False


def _opt_id(v, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError(f"special_tokens[{what!r}] must be an integer or None, got a bool")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"special_tokens[{what!r}] must be an integer or None, "
                         f"got {type(v).__name__}") from None


def _too_big(what: str, n: int, unit: str, limit: int):
    raise ValueError(f"{what} has {n:,} {unit}, more than the {limit:,} allowed")


class Tokenizer:
    """A byte-level BPE tokenizer built from a Hugging Face ``tokenizer.json``.

    tokenizer_json: the tokenizer.json as a dict, as JSON text, or a path to the file.
    special_tokens: ``{bos_token_id, eos_token_id, eog_token_ids, pad_token_id,
        add_bos_token}`` (the model file's ``special_tokens``); keys may be missing.
        When None, they are inferred from the tokenizer.json: BOS (and add_bos) from a
        post-processor that puts a special token first, the end-of-generation ids from
        the well-known texts (``<|eot_id|>``, ``<|im_end|>``, ...).
    vocab_size: the number of rows of the model's embedding; ids at or above it are
        never returned by :meth:`encode` and refused by :meth:`decode`. Default: one
        more than the largest id of the tokenizer.

    Attributes: ``bos_id``, ``eos_id``, ``pad_id`` (int or None), ``eog_ids``
    (frozenset: every id that ends a generation, EOS included), ``vocab_size``,
    ``add_bos`` (bool: prompts should start with BOS), ``bos_token`` and
    ``eos_token`` (their texts, or None).

    Thread safety: encode/decode may be called from several threads.
    """

    def __init__(self, tokenizer_json: dict | str | os.PathLike, special_tokens: dict | None = None,
                 vocab_size: int | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        tj = None
        if isinstance(tokenizer_json, os.PathLike) or (
                isinstance(tokenizer_json, str) and not tokenizer_json.lstrip().startswith("{")):
            if os.path.getsize(tokenizer_json) > 4 * MAX_TOKENIZER_JSON_CHARS:  # 4: UTF-8's longest
                _too_big("tokenizer.json", os.path.getsize(tokenizer_json), "bytes", MAX_TOKENIZER_JSON_CHARS)
            with open(tokenizer_json, encoding="utf-8") as f:
                text = f.read()
        elif isinstance(tokenizer_json, str):
            text = tokenizer_json
        elif isinstance(tokenizer_json, dict):
            tj = tokenizer_json
            try:
                text = json.dumps(tj, ensure_ascii=False)
            except RecursionError:
                raise ValueError("tokenizer.json is nested too deeply") from None
        else:
            raise TypeError(f"tokenizer_json must be a dict, JSON text or a path, "
                            f"got {type(tokenizer_json).__name__}")
        if len(text) > MAX_TOKENIZER_JSON_CHARS:
            _too_big("tokenizer.json", len(text), "characters", MAX_TOKENIZER_JSON_CHARS)
        try:
            tj = json.loads(text) if tj is None else tj
        except RecursionError:
            raise ValueError("tokenizer.json is nested too deeply") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer.json is not valid JSON ({e})") from None
        model = tj.get("model") if isinstance(tj, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" \
                or not isinstance(model.get("vocab"), dict):
            raise ValueError("only BPE tokenizers (tokenizer.json model.type 'BPE') are supported")
        for what, items, limit in (("vocabulary entries", model["vocab"], MAX_TOKENIZER_TOKENS),
                                   ("added tokens", tj.get("added_tokens") or [], MAX_TOKENIZER_TOKENS),
                                   ("merges", model.get("merges") or [], MAX_TOKENIZER_MERGES)):
            if isinstance(items, (list, dict)) and len(items) > limit:
                _too_big("tokenizer.json", len(items), what, limit)
        if not _is_byte_level(tj.get("decoder")):
            raise ValueError("only byte-level BPE tokenizers (a ByteLevel decoder, as Llama 3 and "
                             f"GPT-2 have) are supported; this one has decoder {tj.get('decoder')!r}")

        try:
            self._hf = _HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"invalid tokenizer.json: {e}") from None
        self._hf.no_truncation()
        self._hf.no_padding()
        self._lock = threading.Lock()

        # id -> token string (vocab, then added tokens, which take precedence)
        strings: dict[int, str] = {}
        for s, i in model["vocab"].items():
            strings[int(i)] = s
        added: dict[int, str] = {}
        special: set[int] = set()
        for t in tj.get("added_tokens") or []:
            i, content = int(t["id"]), t["content"]
            added[i] = content
            strings[i] = content
            if t.get("special"):
                special.add(i)
        largest = max(strings) if strings else -1
        if vocab_size is None:
            vocab_size = largest + 1
        else:
            if isinstance(vocab_size, bool):
                raise ValueError("vocab_size must be an integer")
            vocab_size = operator.index(vocab_size)
            if vocab_size < 1:
                raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size: int = vocab_size
        self._strings = strings
        self._added = added
        self._special = frozenset(i for i in special if i < vocab_size)
        #: the special (control) tokens' texts: encode(special=False) reads them as text
        self.special_texts: tuple[str, ...] = tuple(sorted({added[i] for i in special}))
        self._bytes: list[bytes] | None = None  # built on first use
        self._text_to_id = {s: i for i, s in strings.items() if i < vocab_size}
        for i, s in added.items():  # an added token's text wins over a vocab entry
            if i < vocab_size:
                self._text_to_id[s] = i

        st = dict(special_tokens) if special_tokens is not None else self._infer_special(tj)
        self.bos_id: int | None = self._checked(_opt_id(st.get("bos_token_id"), "bos_token_id"), "bos_token_id")
        self.eos_id: int | None = self._checked(_opt_id(st.get("eos_token_id"), "eos_token_id"), "eos_token_id")
        self.pad_id: int | None = self._checked(_opt_id(st.get("pad_token_id"), "pad_token_id"), "pad_token_id")
        eog = {self._checked(_opt_id(i, "eog_token_ids"), "eog_token_ids")
               for i in (st.get("eog_token_ids") or [])}
        if self.eos_id is not None:
            eog.add(self.eos_id)
        self.eog_ids: frozenset[int] = frozenset(eog)
        add_bos = st.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise ValueError("special_tokens['add_bos_token'] must be a bool")
        self.add_bos: bool = add_bos and self.bos_id is not None
        self.bos_token: str | None = strings.get(self.bos_id) if self.bos_id is not None else None
        self.eos_token: str | None = strings.get(self.eos_id) if self.eos_id is not None else None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_metadata(cls, meta: dict) -> "Tokenizer":
        """From a model file's metadata (``Model.metadata`` / ``read_model(p).meta``).
        A tokenizer it cannot use is the file's defect: ModelFormatError."""
        cfg = meta.get("config") or {}
        try:
            return cls(meta["tokenizer"], meta.get("special_tokens"), cfg.get("vocab_size"))
        except ValueError as e:
            raise ModelFormatError(f"the model file's tokenizer: {e}") from None

    def _checked(self, i: int | None, what: str) -> int | None:
        if i is not None and not 0 <= i < self.vocab_size:
            raise ValueError(f"special_tokens[{what!r}] = {i} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        return i

    def _infer_special(self, tj: dict) -> dict:
        bos = None
        pp = tj.get("post_processor")
        procs = pp.get("processors", []) if isinstance(pp, dict) and pp.get("type") == "Sequence" else [pp]
        for p in procs:
            if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
                single = p.get("single") or []
                if single and isinstance(single[0], dict) and "SpecialToken" in single[0]:
                    name = single[0]["SpecialToken"].get("id")
                    ids = ((p.get("special_tokens") or {}).get(name) or {}).get("ids") or []
                    bos = ids[0] if ids else self._text_to_id.get(name)
        eog = [self._text_to_id[t] for t in _EOG_TEXTS if t in self._text_to_id]
        return {"bos_token_id": bos if bos is not None and bos < self.vocab_size else None,
                "eos_token_id": None, "pad_token_id": None,
                "eog_token_ids": eog, "add_bos_token": bos is not None}

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, special: bool = True, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``.

        special: True parses special tokens written in the text (``"<|eot_id|>"``
            becomes 128009); False tokenizes them as ordinary text (use it for
            untrusted user input).
        add_bos: put ``bos_id`` first, unless the ids already start with it (text
            beginning with the BOS text and special=True). ValueError when the
            tokenizer has no BOS token.
        Raises ValueError if an id would be >= vocab_size (a token of the tokenizer
        without an embedding row, such as Llama 3.2's ``<|image|>``), or for text
        with lone surrogates. As in transformers, bytes for which the vocabulary has
        no token are dropped (SmolLM2 has none for 21 byte values, e.g. ``"\\x04"``).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no BOS token")
        try:
            # encode_special_tokens is a flag of the shared tokenizers object: every
            # encode holds the lock, so one thread's special=False never leaks into
            # another thread's special=True call. encode_batch, unlike encode, releases
            # the GIL: a long text no longer stalls every other Python thread (a server's
            # event loop) while it is tokenized.
            with self._lock:
                self._hf.encode_special_tokens = not special
                try:
                    ids = self._hf.encode_batch([text], add_special_tokens=False)[0].ids
                finally:
                    self._hf.encode_special_tokens = False
        except TypeError:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"text is not valid Unicode: {e.reason} at index {e.start} "
                                 f"({text[e.start]!r})") from None
            raise
        if ids and max(ids) >= self.vocab_size:
            bad = next(i for i in ids if i >= self.vocab_size)
            raise ValueError(f"the text contains token {self._strings.get(bad, '?')!r} (id {bad}), "
                             f"which is outside the model's vocabulary of {self.vocab_size} ids")
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    # ------------------------------------------------------------------ decode

    def _table(self) -> list[bytes]:
        tab = self._bytes
        if tab is None:
            tab = [b""] * self.vocab_size  # ids without a token decode to nothing
            added = self._added
            for i, s in self._strings.items():
                if i < self.vocab_size:
                    tab[i] = s.encode("utf-8") if i in added else _byte_level_bytes(s)
            self._bytes = tab
        return tab

    def _check_id(self, i) -> int:
        if isinstance(i, bool):
            raise TypeError("token ids must be integers, got a bool")
        try:
            j = operator.index(i)
        except TypeError:
            raise TypeError(f"token ids must be integers, got {type(i).__name__}") from None
        if not 0 <= j < self.vocab_size:
            raise ValueError(f"token id {j} is out of range: the vocabulary has ids 0 .. {self.vocab_size - 1}")
        return j

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes token ``id`` stands for (a special/added token: its UTF-8 text)."""
        return self._table()[self._check_id(id)]

    def is_special(self, id) -> bool:
        """Is ``id`` a special (control) token? False for any other int, in range or not."""
        try:
            return operator.index(id) in self._special
        except TypeError:
            return False

    def id_to_token(self, id: int) -> str | None:
        """The token's string as the tokenizer stores it (byte-level alphabet), or None."""
        return self._strings.get(self._check_id(id))

    def token_to_id(self, token: str) -> int | None:
        """Id of a token given as its stored string (e.g. ``"<|eot_id|>"``), or None."""
        return self._text_to_id.get(token)

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        tab = self._table()
        special = self._special
        check = self._check_id
        if skip_special:
            return b"".join(tab[j] for j in map(check, ids) if j not in special)
        return b"".join(tab[check(i)] for i in ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. skip_special drops special tokens.
        ValueError for an id outside [0, vocab_size)."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"eog_ids={sorted(self.eog_ids)}, add_bos={self.add_bos})")


class StreamDecoder:
    """Incremental decode: ``"".join(push(i) for i in ids) + flush() == decode(ids)``.

    Works on bytes with an incremental UTF-8 decoder: each push costs O(len(token)),
    a character split across tokens is returned by the push that completes it, and
    invalid bytes become U+FFFD as soon as they are known to be invalid (exactly as
    :meth:`Tokenizer.decode` replaces them). After :meth:`flush` the decoder can be
    reused for a new sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tab = tokenizer._table()
        self._check = tokenizer._check_id
        self._special = tokenizer._special
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        j = self._check(id)
        if self.skip_special and j in self._special:
            return ""
        return self._dec.decode(self._tab[j])

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    @property
    def pending(self) -> bytes:
        """The bytes held back (the start of an incomplete character)."""
        return self._dec.getstate()[0]
