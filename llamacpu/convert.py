"""Convert a Hugging Face Llama folder or a GGUF file into a llamacpu model file.

    convert(src, out, type=None) -> Path

A source becomes a Plan (convert_source.py): convert_hf.py reads a Hugging Face
folder, convert_gguf.py a GGUF file. This module writes the Plan: the type policy
(`tensor_type`, which tensor gets which type; the reasons are in docs/FORMAT.md,
"Type policy"), the provenance (sha256 of the source files), and the output file.

The converter streams: one tensor at a time, big matrices in row chunks, straight
into a temporary file beside OUT (.OUT.tmp-PID-XXXXXXXX) that is renamed over OUT
only when everything succeeded: an interrupted conversion never leaves a partial OUT
(Ctrl-C deletes the temporary file; one left by a killed process is deleted by the
next conversion to the same OUT).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from . import format as fmt
from . import quant_mix
from .convert_gguf import plan_gguf
from .convert_hf import hf_rope_permute, plan_hf
from .convert_source import BF16, Plan, SourceTensor
from .format import F16, F32, Q4_0, Q4_1, Q6_0, Q8_0, TYPE_NAMES
from .progress import Progress, fmt_bytes

__all__ = ["convert", "tensor_type", "TARGET_TYPES", "MIX_TYPES", "HEAD_TYPES", "DEFAULT_HF_TYPE",
           "hf_rope_permute"]

TARGET_TYPES = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}
#: llama-quantize's K-quant mixtures (quant_mix.py): a type per tensor, as llama-quantize gives it
MIX_TYPES = tuple(quant_mix.FTYPES)
#: choices for the output head's type (convert(head_type=...), --head-type)
HEAD_TYPES = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q6_0": Q6_0}
DEFAULT_HF_TYPE = "q4_0"


# ----------------------------------------------------------------------------- policy

def tensor_type(name: str, src_type: int, target: str | None, config: fmt.ModelConfig,
                source_format: str, cols: int = 0, rows: int = 0, head_type: str | None = None,
                mix: dict | None = None) -> int:
    """The output type of one tensor (docs/FORMAT.md, "Type policy"). With a K-quant
    target, `mix` is quant_mix.mixture(config, target)."""
    if fmt.is_norm(name) or name == "rope_freqs.weight":
        return F32
    head = name == fmt.output_head_name(config)
    if head and head_type is not None:
        t = HEAD_TYPES[head_type]
    elif target in MIX_TYPES:
        t = mix[name]
    elif target is None and source_format == "gguf":
        t = F32 if src_type == BF16 else src_type  # carry blocks over untouched
    else:
        t = TARGET_TYPES[target or DEFAULT_HF_TYPE]
        if t in (Q4_0, Q4_1) and head:
            t = Q6_0  # the output head produces every logit: 6 bits, as llama.cpp's Q4 files
    if t in fmt.X8_ONLY_TYPES and rows % 8:
        t = Q8_0  # kernels for the x8 layout only (rows % 8 == 0: every real Llama matrix)
    if t in fmt.QUANTIZED_TYPES and cols % fmt.TYPES[t].block_elems:
        t = F16  # blocks need whole rows of blocks (never the case for real Llama shapes)
    return t


# ----------------------------------------------------------------------------- encoding

_POOL = None


def _quantize(x: np.ndarray, type: int) -> np.ndarray:
    """float32 [rows, cols] -> uint8 [rows, row_bytes] with ggml's reference quantizer, the
    rows split over the cores (rows are independent and _core.quantize releases the GIL;
    the K-quant quantizers search for their scales, ~1 us per 256 elements)."""
    global _POOL
    try:
        from . import _core
    except ImportError as e:  # pragma: no cover - depends on the build
        raise RuntimeError("quantizing needs the compiled core (llamacpu._core): "
                           "build it with `pip install -e .`") from e
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = min(os.cpu_count() or 1, max(1, x.shape[0] // 64))
    if n == 1:
        return _core.quantize(x, type)
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="llamacpu-quantize")
    bounds = [x.shape[0] * i // n for i in range(n + 1)]
    parts = _POOL.map(lambda i: _core.quantize(x[bounds[i]:bounds[i + 1]], type), range(n))
    return np.concatenate(list(parts))


def _encode(x: np.ndarray, type: int):
    """float32 rows -> the bytes of those rows in `type`."""
    if type == F32:
        return np.ascontiguousarray(x, dtype="<f4")
    if type == F16:
        return np.ascontiguousarray(x.astype("<f2"))
    return _quantize(x, type)


# ----------------------------------------------------------------------------- convert

CHUNK_ELEMENTS = 1 << 22  # rows per chunk ~ 4M elements: 16 MB of float32


def _hash_files(files: list, prog: Progress) -> tuple[str, list]:
    """sha256 of each file, and of the manifest ("<sha256>  <name>\\n" per file)."""
    total = sum(p.stat().st_size for p in files)
    prog.start("hashing", 0, total)
    done = 0
    entries = []
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
                done += n
                prog.update(0, done)
        entries.append({"name": p.name, "size": p.stat().st_size, "sha256": h.hexdigest()})
    prog.update(0, total)
    if len(entries) == 1:
        return entries[0]["sha256"], entries
    manifest = "".join(f"{e['sha256']}  {e['name']}\n" for e in sorted(entries,
                                                                       key=lambda e: e["name"]))
    return hashlib.sha256(manifest.encode()).hexdigest(), entries


def _tensor_chunks(s: SourceTensor, out_type: int, on_rows: Callable, x8: bool = False):
    """Yield the output bytes of one tensor in row chunks (x8: repacked into 8-row
    block groups, a byte permutation, so raw GGUF blocks stay bit-exact)."""
    rows, cols = s.rows, s.cols
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    unit = math.lcm(8 if x8 else 1, s.row_group)  # whole x8 groups, whole heads to reorder
    step = max(unit, step // unit * unit)
    copy_raw = out_type == s.type and s.reorder is None
    rb = fmt.row_bytes(out_type, cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if copy_raw:
            data = s.raw(r0, r1)  # bit-exact: never requantize a block of the target type
        else:
            data = _encode(s.f32_rows(r0, r1), out_type)
        if x8:
            data = fmt.x8_pack(np.frombuffer(data, dtype=np.uint8).reshape(r1 - r0, rb), out_type)
        yield data
        s.release(r0, r1)
        on_rows(r0, r1)


def _resolve_out(src: Path, out: Path, plan_files, overwrite: bool) -> None:
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; give the output file's path")
    real_out = out.resolve()
    for f in plan_files:
        if f.resolve() == real_out or (out.exists() and os.path.samefile(f, out)):
            raise ValueError(f"refusing to write {out}: it is the source file {f}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --force / overwrite=True to replace it)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")


def convert(src, out, type: str | None = None, progress=True, overwrite: bool = False,
            quiet: bool = False, head_type: str | None = None) -> Path:
    """Convert SRC (an HF Llama folder or a .gguf file) to a llamacpu model file OUT.

    type: None (HF: q4_0; GGUF: keep each tensor's type), "f32", "f16", "q8_0",
    "q4_0" or "q4_1" (with q4_0 / q4_1 the output head is q6_0), or a K-quant mixture
    "q4_k_m", "q4_k_s", "q5_k_m", "q6_k" (a type per tensor, as llama-quantize gives it
    without an importance matrix, with its quantizers: the same bytes). head_type: the
    output head's type instead ("q6_0", "q8_0", "f16", "f32"). progress: True (a bar on stderr when it is a TTY), False, or
    a callable(phase, done_tensors, total_tensors, done_bytes, total_bytes).
    quiet: print nothing at all (not even the final summary line).
    Returns the Path of OUT.
    """
    src, out = Path(src), Path(out)
    if type is not None:
        type = type.lower()
        if type not in TARGET_TYPES and type not in MIX_TYPES:
            raise ValueError(f"unknown type {type!r}; choose from {', '.join((*TARGET_TYPES, *MIX_TYPES))}")
    if head_type is not None:
        head_type = head_type.lower()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head type {head_type!r}; choose from {', '.join(HEAD_TYPES)}")
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    # refuse before parsing anything big when OUT is SRC itself
    if out.exists() and not src.is_dir() and os.path.samefile(src, out):
        raise ValueError(f"refusing to write {out}: it is the source file")

    t_start = time.monotonic()
    plan = plan_hf(src) if src.is_dir() else plan_gguf(src)
    try:
        _resolve_out(src, out, plan.files, overwrite)
        prog = Progress(progress, quiet)
        sha, file_entries = _hash_files(plan.files, prog)
        mix = quant_mix.mixture(plan.config, type) if type in MIX_TYPES else None
        out_types = {s.name: tensor_type(s.name, s.type, type, plan.config, plan.source_format,
                                         s.cols, s.rows, head_type, mix)
                     for s in plan.tensors}
        meta = {
            "format_version": fmt.FORMAT_VERSION,
            "config": plan.config.to_dict(),
            # as text: JSON-parsing a 9 MB object costs 0.12 s at every load, a string 0.04 s
            "tokenizer": json.dumps(plan.tokenizer, ensure_ascii=False, separators=(",", ":")),
            "chat_template": plan.chat_template,
            "generation": plan.generation,
            "special_tokens": plan.special_tokens,
            "provenance": {
                "source_format": plan.source_format,
                "source": Path(os.path.abspath(src)).name,  # a symlink's name, not its blob's
                "source_sha256": sha,
                "files": file_entries,
                "converter": f"llamacpu {__version__}",
                "type": type or (DEFAULT_HF_TYPE if plan.source_format == "hf" else "source"),
                "tensor_types": {n: TYPE_NAMES[t] for n, t in out_types.items()},
            },
        }
        fmt.validate_meta(meta)
        _remove_stale_temps(out, prog)
        # OUT appears only complete: ModelWriter writes .OUT.tmp-PID-XXXXXXXX beside it and
        # renames it over OUT. Ctrl-C (KeyboardInterrupt) deletes the temporary file; after
        # SIGKILL it stays, and the next conversion to OUT removes it.
        _write(out, meta, plan, out_types, prog)
    finally:
        plan.close()

    size = out.stat().st_size
    counts = {}
    for t in out_types.values():
        counts[TYPE_NAMES[t]] = counts.get(TYPE_NAMES[t], 0) + 1
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    prog.message(f"converted {src} -> {out}: {len(out_types)} tensors ({by_type}), "
                 f"{fmt_bytes(size)} in {time.monotonic() - t_start:.1f} s")
    return out


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _remove_stale_temps(out: Path, prog: Progress) -> None:
    """Delete the temporary files that killed conversions to OUT left behind: those whose
    process (the PID in the name) no longer exists. A live conversion's file is kept."""
    prefix = _temp_prefix(out)
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            os.unlink(out.parent / name)
            prog.message(f"removed {out.parent / name}, left by an interrupted conversion")
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process of its own: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists, someone else's
        return True
    return True


def _write(path, meta: dict, plan: Plan, out_types: dict, prog: Progress) -> None:
    total_b = sum(s.nbytes for s in plan.tensors)
    prog.start("converting", len(plan.tensors), total_b)
    done_b = 0
    with fmt.ModelWriter(path, meta, n_tensors=len(plan.tensors)) as w:
        for i, s in enumerate(plan.tensors):
            base = done_b
            row_b = s.nbytes // s.rows

            def on_rows(r0, r1, base=base, row_b=row_b, i=i):
                prog.update(i, base + r1 * row_b)

            t = out_types[s.name]
            x8 = fmt.x8_allowed(t, s.shape)  # every quantized matrix of a real Llama
            w.add_tensor(s.name, t, s.shape, _tensor_chunks(s, t, on_rows, x8),
                         layout=fmt.LAYOUT_X8 if x8 else fmt.LAYOUT_ROW_MAJOR)
            done_b += s.nbytes
            prog.update(i + 1, done_b)
