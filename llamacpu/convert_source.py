"""What every conversion source hands the writer: a Plan of SourceTensors.

convert_hf.py (a Hugging Face folder) and convert_gguf.py (a GGUF file) each build
a Plan: the config, tokenizer and special tokens, and one SourceTensor per tensor,
which reads raw rows from the source's mmap and decodes them to float32 on demand.
The pieces both sources share sit here: the decoders (BF16, GGUF blocks), the name
map lookup, the tensor-set check, the mmap page release.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import format as fmt
from .errors import ModelFormatError
from .format import F16, F32

BF16 = 30  # GGUF's id; accepted only as an input type


@dataclass
class SourceTensor:
    """One tensor to read: where it lives and how to decode rows of it."""
    name: str  # internal name
    src_name: str
    type: int  # source type id (F32, F16, BF16 or a GGUF block type: format.TYPES)
    shape: tuple
    raw: Callable  # (r0, r1) -> uint8 array of the raw rows (a view)
    release: Callable  # (r0, r1) -> None, the rows are no longer needed
    nbytes: int = 0
    # float32 rows -> the same rows in our order (HF q/k: hf_rope_permute), applied to
    # whole groups of `row_group` rows (one head) at a time; None: rows are kept as they are
    reorder: Callable | None = None
    row_group: int = 1

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def cols(self) -> int:
        return self.shape[-1]

    def f32_rows(self, r0: int, r1: int) -> np.ndarray:
        raw = self.raw(r0, r1)
        n = r1 - r0
        if self.type == F32:
            x = raw.view("<f4").reshape(n, self.cols).astype(np.float32)
        elif self.type == F16:
            x = raw.view("<f2").reshape(n, self.cols).astype(np.float32)
        elif self.type == BF16:
            x = bf16_to_f32(raw.view("<u2").reshape(n, self.cols))
        else:
            x = dequantize_blocks(raw.reshape(n, -1), self.type, self.cols)
        if self.reorder is not None:
            x = self.reorder(x)
        return x


@dataclass
class Plan:
    """Everything known before the first byte is written."""
    source_format: str  # "hf" | "gguf"
    src: Path
    files: list  # source files read, in hashing order
    config: fmt.ModelConfig | None  # None only while plan_gguf fills the plan in
    tokenizer: dict
    chat_template: object
    generation: dict
    special_tokens: dict
    tensors: list  # SourceTensor in output order
    closers: list = field(default_factory=list)

    def close(self):
        for c in self.closers:
            c()


# ----------------------------------------------------------------------------- decoders

def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def dequantize_blocks(raw: np.ndarray, type: int, cols: int) -> np.ndarray:
    """GGUF/ggml blocks -> float32 with the scalar reference dequantizer of the C core
    (ggml's dequantize_row_* formulas; tested bit-exact against the `gguf` package).

    raw: uint8 [rows, row_bytes] -> float32 [rows, cols].
    """
    try:
        from . import _core
    except ImportError as e:  # pragma: no cover - depends on the build
        raise RuntimeError("dequantizing needs the compiled core (llamacpu._core): "
                           "build it with `pip install -e .`") from e
    return _core.dequantize(np.ascontiguousarray(raw), type, cols, "scalar")


# ----------------------------------------------------------------------------- mmap pages

def drop_pages(mm: mmap.mmap, start: int, end: int) -> None:
    """Tell the kernel we are done with [start, end) of a read-only file mapping,
    so pages already read stop counting in our RSS (they stay in the page cache)."""
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start -= start % mmap.PAGESIZE
    end = min(end, len(mm))
    if end > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


# ----------------------------------------------------------------------------- checks

def map_name(name: str, names: dict, layer_names: dict, layer_re, n_layers: int):
    """Internal name for a source name, or None when it is not in the map.

    names: whole names; layer_names: per-layer keys, matched by layer_re's groups
    (layer index, key)."""
    if name in names:
        return names[name]
    m = layer_re.match(name)
    if m and int(m.group(1)) < n_layers and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.weight"
    return None


def checked_config(config: dict, where: str) -> fmt.ModelConfig:
    """A source's config, mapped to our key names, typed; ModelFormatError naming `where`."""
    try:
        return fmt.ModelConfig.from_dict(config)
    except ModelFormatError as e:
        raise ModelFormatError(f"{where}: {e}") from None


def tokenizer_within_vocab(tok: dict, vocab_size: int, where: str) -> dict:
    """A tokenizer.json object without the added tokens that have no embedding row."""
    if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
        raise ModelFormatError(f"{where}: tokenizer.json is not a tokenizer object")
    added = tok.get("added_tokens")
    if isinstance(added, list):
        # e.g. Llama 3.2's <|image|> (128256) has no row in the 128256-row embedding.
        tok = dict(tok)
        tok["added_tokens"] = [t for t in added
                               if not (isinstance(t, dict) and isinstance(t.get("id"), int)
                                       and t["id"] >= vocab_size)]
    return tok


def ordered_tensors(sources: dict, config: fmt.ModelConfig, where: str) -> list:
    """Check the tensor set against the config; return the tensors in file order."""
    try:
        fmt.check_tensor_set(config, {n: (F32 if fmt.is_norm(n) or n == "rope_freqs.weight"
                                          else F16, s.shape) for n, s in sources.items()})
    except ModelFormatError as e:
        src_of = {n: s.src_name for n, s in sources.items()}
        msg = str(e)
        for n, s in src_of.items():
            msg = msg.replace(f"'{n}'", f"'{n}' ({s})")
        raise ModelFormatError(f"{where}: {msg}") from None
    order = list(fmt.expected_tensors(config)) + ["rope_freqs.weight"]
    return [sources[n] for n in order if n in sources]
