"""`llamacpu pull`, `list` and `rm`: the model cache from the command line
(model_cache.py keeps the conversions, hub.py fetches names from the Hugging Face Hub)."""

from __future__ import annotations

import os

from .progress import fmt_bytes

NAMES = ("MODEL: org/name (a Hugging Face repo of safetensors, converted at the default type), "
         "org/name:TAG (a GGUF repo and a quant tag such as Q4_K_M: the .gguf file whose name "
         "ends in it, case-insensitive), a .gguf file or a Hugging Face folder (models--org--name "
         "too). Names are looked up in the Hugging Face cache first, then downloaded (a gated "
         "repo needs `hf auth login` or HF_TOKEN); needs pip install 'llamacpu[hub]'")


def register_pull(sub) -> None:
    p = sub.add_parser("pull", help="fetch and convert a model without running it",
                       description="Fetch a model and convert it once into llamacpu's cache, "
                                   "so that later runs start at once. " + NAMES)
    p.add_argument("model", nargs="?", default=None,
                   help="model name or path (default: the default model, SmolLM2-135M-Instruct)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_pull)


def cmd_pull(args) -> int:
    from .model_cache import resolve_model

    path = resolve_model(args.model, quiet=args.quiet)
    if not args.quiet:
        print(path)
    return 0


def register_list(sub) -> None:
    p = sub.add_parser("list", help="show the models converted into the cache",
                       description="Show the models converted into llamacpu's cache "
                                   "($LLAMACPU_CACHE, else ~/.cache/llamacpu): the name to "
                                   "give `run` or `rm`, the converted file's size, and its "
                                   "source with the source's size (gone: deleted since).")
    p.set_defaults(func=cmd_list)


def cmd_list(args) -> int:
    from .model_cache import cache_dir, cached_models

    models = cached_models()
    if not models:
        print(f"no models in {cache_dir()} yet (`llamacpu pull NAME` adds one)")
        return 0
    w = max(len(m["name"]) for m in models)
    print(f"{'NAME':<{w}}  {'SIZE':>9}  SOURCE")
    for m in models:
        if m["source"] is None:
            src = "? (not recorded)"
        elif not os.path.isabs(m["source"]):
            src = m["source"]  # the default model's wheel
        else:
            size = m["source_size"]
            src = f"{m['source']} ({'gone' if size is None else fmt_bytes(size)})"
        print(f"{m['name']:<{w}}  {fmt_bytes(m['size']):>9}  {src}")
    return 0


def register_rm(sub) -> None:
    p = sub.add_parser("rm", help="remove a model from the cache",
                       description="Remove what the cache holds for MODEL: its conversions and, "
                                   "for a Hub name, its downloaded files in the Hugging Face cache "
                                   "(org/name: the whole repo; org/name:TAG: that quant's files). "
                                   "A path removes only the conversions, never the file itself. "
                                   "`default` names the default model. Asks nothing.")
    p.add_argument("model", help="a name as `llamacpu list` shows it, a Hub name or a path")
    p.set_defaults(func=cmd_rm)


def cmd_rm(args) -> int:
    from .model_cache import remove

    for path, size in remove(args.model):
        print(f"removed {path}" + (f" ({fmt_bytes(size)})" if size else ""))
    return 0
