"""The `llamacpu` command line.

    llamacpu run [MODEL] [-p PROMPT] [--system TEXT] [sampling flags]  (MODEL: ours or a GGUF)
    llamacpu convert SRC OUT [--type q4_0|q4_1|q8_0|f16|f32] [--force] [--quiet]
    llamacpu info MODEL [--json]
    llamacpu bench MODEL [-p N] [-n N] [-t 1,2] [-r N]        (bench.py)
    llamacpu serve [MODEL] [--host H] [--port P] [--api-key K] (server/)
    llamacpu perplexity MODEL TEXTFILE [-c N]                 (perplexity.py)
    llamacpu batch IN.jsonl OUT.jsonl [--model M] [--ray [ADDR]] (batch.py, batch_ray.py)
    llamacpu pull [MODEL] | list | rm MODEL                   (cli_models.py)

MODEL, wherever a model is taken, is a llamacpu file, a GGUF file, a Hugging Face folder,
or a Hub name org/name[:TAG] (model_cache.resolve_model).

Each subcommand is a `register_<name>(subparsers)` function that adds its parser
and sets `func`; add a new one to COMMANDS. `func(args)` returns the exit status.
Errors that are the user's (a malformed model, a missing file) are printed as one
line on stderr without a traceback: ModelFormatError exits 2, other user errors 1; in a
command with -c/--ctx-size, the API's "n_ctx" is told as the flag (cli_flags.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .cli_flags import ctx_flag_message
from .errors import ModelFormatError
from .progress import end_open_line


# ----------------------------------------------------------------------------- convert

def register_convert(sub) -> None:
    from .convert import HEAD_TYPES, MIX_TYPES, TARGET_TYPES

    p = sub.add_parser(
        "convert", help="convert a Hugging Face Llama folder or a GGUF file",
        description="Convert a Hugging Face Llama folder (safetensors) or a .gguf file into a "
                    "llamacpu model file. Default type: q4_0 for Hugging Face sources (output "
                    "head q6_0); a GGUF keeps each tensor's type, blocks copied bit-exact.")
    p.add_argument("src", help="Hugging Face model folder or .gguf file")
    p.add_argument("out", help="output model file")
    p.add_argument("--type", choices=sorted(TARGET_TYPES) + list(MIX_TYPES), default=None,
                   help="weight type (norms stay f32; with q4_0/q4_1 the output head is q6_0), or "
                        "a K-quant mixture: q4_k_m, q4_k_s, q5_k_m, q6_k give each tensor the type "
                        "llama-quantize gives it (no importance matrix), with the same bytes. "
                        "Default: q4_0 for a Hugging Face folder, each tensor's own type for a GGUF")
    p.add_argument("--head-type", choices=sorted(HEAD_TYPES), default=None,
                   help="type of the output head (the embedding table when tied) instead of the "
                        "default: q6_0 with q4_0/q4_1, else the --type. Every token reads the "
                        "whole head: q8_0 is 34/26 = 1.31x the bytes of q6_0, for slightly "
                        "closer logits")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .convert import convert

    convert(args.src, args.out, type=args.type, progress=not args.quiet,
            overwrite=args.force, quiet=args.quiet, head_type=args.head_type)
    return 0


# ----------------------------------------------------------------------------- info

def register_info(sub) -> None:
    p = sub.add_parser("info", help="describe a llamacpu model file",
                       description="Validate a llamacpu model file and describe it.")
    p.add_argument("model", help="llamacpu model file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--top", type=int, default=5, help="how many of the largest tensors to list")
    p.set_defaults(func=cmd_info)


def model_summary(m, top: int = 5) -> dict:
    """What `info` shows, as a plain dict (the --json output)."""
    from .format import TYPE_NAMES

    by_type = {}
    for t in m.tensors.values():
        e = by_type.setdefault(TYPE_NAMES[t.type], {"tensors": 0, "bytes": 0})
        e["tensors"] += 1
        e["bytes"] += t.nbytes
    largest = sorted(m.tensors.values(), key=lambda t: (-t.nbytes, t.name))[:max(top, 0)]
    n_params = sum(_prod(t.shape) for t in m.tensors.values())
    prov = dict(m.meta["provenance"])
    prov.pop("tensor_types", None)  # the same as the tensor list; too long to print
    from .format import tokenizer_dict
    tok = tokenizer_dict(m.meta)
    return {
        "path": str(m.path),
        "file_size": m.file_size,
        "parameters": n_params,
        "config": m.config.to_dict(),
        "tensors": len(m.tensors),
        "types": by_type,
        "largest": [{"name": t.name, "type": TYPE_NAMES[t.type], "shape": list(t.shape),
                     "bytes": t.nbytes} for t in largest],
        "special_tokens": m.meta["special_tokens"],
        "chat_template": m.meta["chat_template"] is not None,
        "generation": m.meta["generation"],
        "tokenizer": {"model": tok.get("model", {}).get("type"),
                      "added_tokens": len(tok.get("added_tokens") or [])},
        "provenance": prov,
    }


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def cmd_info(args) -> int:
    from .format import read_model

    with read_model(args.model) as m:
        s = model_summary(m, args.top)
    if args.json:
        print(json.dumps(s, indent=2, ensure_ascii=False))
        return 0
    c = s["config"]
    out = [f"{s['path']}: llamacpu model, {_mb(s['file_size'])}, "
           f"{s['parameters'] / 1e6:,.1f} M parameters, {s['tensors']} tensors",
           "config:"]
    out += [f"  {k:<26} {json.dumps(v)}" for k, v in c.items()]
    out.append("tensor types:")
    for name, e in sorted(s["types"].items()):
        out.append(f"  {name:<6} {e['tensors']:>5} tensors  {_mb(e['bytes']):>12}")
    out.append("largest tensors:")
    for t in s["largest"]:
        out.append(f"  {t['name']:<40} {t['type']:<5} {str(t['shape']):<16} {_mb(t['bytes']):>12}")
    st = s["special_tokens"]
    out.append("special tokens: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in st.items()))
    out.append(f"tokenizer: {s['tokenizer']['model']}, {s['tokenizer']['added_tokens']} added "
               "tokens")
    out.append(f"chat template: {'yes' if s['chat_template'] else 'no'}")
    if s["generation"]:
        out.append("generation defaults: " + ", ".join(f"{k}={json.dumps(v)}"
                                                        for k, v in s["generation"].items()))
    out.append("provenance:")
    for k, v in s["provenance"].items():
        if k == "files" and isinstance(v, list):
            out.append(f"  {'files':<14} " + ", ".join(
                str(f.get("name")) if isinstance(f, dict) else str(f) for f in v))
        else:
            out.append(f"  {k:<14} {v if isinstance(v, str) else json.dumps(v)}")
    print("\n".join(out))
    return 0


# ----------------------------------------------------------------------------- main

def register_run(sub) -> None:
    from .cli_run import register_run as reg
    reg(sub)


COMMANDS = [register_run, register_convert, register_info]
from .bench import register_bench; COMMANDS.append(register_bench)  # noqa: E402,E702
from .server import register_serve; COMMANDS.append(register_serve)  # noqa: E402,E702
from .perplexity import register_perplexity; COMMANDS.append(register_perplexity)  # noqa: E402,E702
from .batch import register_batch; COMMANDS.append(register_batch)  # noqa: E402,E702
from .cli_models import register_pull, register_list, register_rm  # noqa: E402
COMMANDS += [register_pull, register_list, register_rm]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llamacpu",
                                 description="Llama 3.2 on ordinary CPUs.")
    ap.add_argument("--version", action="version", version=f"llamacpu {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in COMMANDS:
        register(sub)
    ap.commands = sub.choices  # name -> its parser, for parse()
    return ap


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """ap.parse_args, except that arguments a subcommand does not know are reported by that
    subcommand's parser (its usage, not the top-level one's), with the closest flag it has."""
    import difflib

    args, extra = ap.parse_known_args(argv)
    if extra:
        p = ap.commands[args.command]
        msg = f"unrecognized arguments: {' '.join(extra)}"
        flag = next((a.split("=", 1)[0] for a in extra if a.startswith("-")), None)
        close = difflib.get_close_matches(flag, list(p._option_string_actions), n=1) if flag else []
        p.error(msg + (f" (did you mean {close[0]}?)" if close else ""))
    return args


def main(argv=None) -> int:
    args = parse(build_parser(), argv)
    try:
        return args.func(args)
    except ModelFormatError as e:
        print(f"llamacpu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `llamacpu info M | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, ValueError) as e:
        msg = str(e)
        if hasattr(args, "ctx_size"):  # the API says n_ctx; this command's user typed -c
            msg = ctx_flag_message(msg)
        print(f"llamacpu {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        end_open_line()
        print(f"llamacpu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
