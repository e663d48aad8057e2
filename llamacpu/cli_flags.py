"""What the subcommands share about their flags.

-c/--ctx-size: the Python API's errors name its parameter n_ctx (Model, Llama,
context_fit, perplexity); a command line user typed -c, so a command that has the flag
tells those messages in its name (ctx_flag_message).
"""
from __future__ import annotations

import re

CTX_FLAG = "-c/--ctx-size"


def ctx_flag_message(message: str) -> str:
    """An API error message about n_ctx as a user of -c reads it: "n_ctx=N" -> "-c N",
    "n_ctx <= N" -> "-c N or less", any other "n_ctx" -> "-c/--ctx-size"."""
    message = re.sub(r"\bn_ctx=(\d+)", r"-c \1", message)
    message = re.sub(r"\bn_ctx <= (\d+)", r"-c \1 or less", message)
    return re.sub(r"\bn_ctx\b", CTX_FLAG, message)
