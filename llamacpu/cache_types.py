"""KV cache types (llama.cpp's --cache-type-k / --cache-type-v names): the names, their
format type ids, and the two CLI flags, shared by run, serve, bench and perplexity."""

# name -> format type id (format.F16, Q8_0, Q4_0; model.py checks they agree). Per
# position and kv head of head_dim 64: f16 128 bytes, q8_0 68 (about half), q4_0 36
# (about a quarter). q8_0/q4_0 are ggml's blocks of 32 with one f16 scale.
CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}

HELP = ("KV cache type for {what}: f16 (default), q8_0 (about half the memory of f16, logits "
        "close to f16's) or q4_0 (about a quarter, a little less accurate)")


def cache_type(name, what: str = "cache_type_k") -> int:
    """The type id of a cache type name; ValueError naming the allowed ones."""
    if not isinstance(name, str) or name.lower() not in CACHE_TYPES:
        raise ValueError(f"{what} must be one of {', '.join(CACHE_TYPES)}, got {name!r}")
    return CACHE_TYPES[name.lower()]


def add_cache_type_args(p) -> None:
    """-ctk/--cache-type-k and -ctv/--cache-type-v on an argparse parser."""
    p.add_argument("-ctk", "--cache-type-k", default="f16", metavar="TYPE", help=HELP.format(what="keys"))
    p.add_argument("-ctv", "--cache-type-v", default="f16", metavar="TYPE", help=HELP.format(what="values"))


def check_cache_type_args(args) -> None:
    """The flags' values, checked before a model is loaded, naming the flag."""
    cache_type(args.cache_type_k, "--cache-type-k")
    cache_type(args.cache_type_v, "--cache-type-v")
