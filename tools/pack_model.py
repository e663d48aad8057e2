"""A model file in a few megabytes, for speed runs on a machine the whole file cannot reach.

    python tools/pack_model.py pack MODEL PACKED     # MODEL: a GGUF or a llamacpu .bin
    python tools/pack_model.py unpack PACKED MODEL   # writes a file of MODEL's size and layout

`pack` keeps every byte of the file outside its tensors' data (header, metadata, tensor
directory, padding), the file's mtime, and the first 16 rows of each matrix; `unpack`
writes the file back with each matrix's rows repeating those 16 (vectors and matrices
whose row count is not a multiple of 16 are kept whole). Types, shapes, offsets and the
size are the original's, so an engine reads as many bytes per token and runs the same
kernels on it: what a speed run needs. The values are not the model's, so measure
nothing but speed on an unpacked file. 16 rows: a multiple of every row group llamacpu's
layouts interleave (x8, docs/FORMAT.md), so the repeated bytes are whole groups of whole
blocks. The 16-core thread-scaling runs in BENCHMARKS.md moved their files this way.
"""
import argparse
import gzip
import json
import mmap
import os
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = 16
MAGIC = b"llamacpu-packed-model 1\n"


def tensor_spans(path: Path) -> list:
    """[(absolute offset, nbytes, shape)] of the file's tensors."""
    sys.path.insert(0, str(REPO / "tools"))
    from bench_vs_llamacpp import file_tensors  # pack only
    return [(off, nb, shape) for _name, _type, shape, nb, off in file_tensors(path)[0]]


def period(nbytes: int, shape: tuple) -> int:
    """Bytes of the first ROWS rows, or the whole tensor when it cannot be cut so."""
    if len(shape) == 2 and shape[0] > ROWS and shape[0] % ROWS == 0 and nbytes % shape[0] == 0:
        return nbytes // shape[0] * ROWS
    return nbytes


def pack(src: Path, dst: Path) -> None:
    spans = sorted((off, nb, period(nb, shape)) for off, nb, shape in tensor_spans(src) if nb)
    size = src.stat().st_size
    meta = {"size": size, "mtime_ns": src.stat().st_mtime_ns, "name": src.name, "spans": spans}
    head = json.dumps(meta).encode()
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, \
            gzip.open(dst, "wb", compresslevel=6) as out:
        out.write(MAGIC + struct.pack("<Q", len(head)) + head)
        pos = 0
        for off, nb, per in spans:
            out.write(mm[pos:off])          # what lies between tensors, as it is
            out.write(mm[off:off + per])    # the rows that unpack repeats
            pos = off + nb
        out.write(mm[pos:size])
    print(f"{src} ({size / 1e6:.0f} MB, {len(spans)} tensors) -> {dst} ({dst.stat().st_size / 1e6:.1f} MB)")


def unpack(src: Path, dst: Path) -> None:
    with gzip.open(src, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise SystemExit(f"{src}: not a file written by `pack_model.py pack`")
        meta = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        tmp = dst.with_name(dst.name + ".tmp")
        with open(tmp, "wb") as out:
            pos = 0
            for off, nb, per in meta["spans"]:
                out.write(f.read(off - pos))
                seed = f.read(per)
                reps = max(1, (64 << 20) // per)  # write about 64 MB at a time
                for i in range(0, nb // per, reps):
                    out.write(seed * min(reps, nb // per - i))
                pos = off + nb
            out.write(f.read())
        if tmp.stat().st_size != meta["size"]:
            tmp.unlink()
            raise SystemExit(f"{src}: unpacked {tmp.stat().st_size} bytes, expected {meta['size']}")
    os.utime(tmp, ns=(meta["mtime_ns"], meta["mtime_ns"]))
    tmp.rename(dst)
    print(f"{src} -> {dst} ({meta['size'] / 1e6:.0f} MB, {len(meta['spans'])} tensors, rows repeating)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("verb", choices=["pack", "unpack"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args(argv)
    (pack if args.verb == "pack" else unpack)(args.src, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
